"""Training metrics that stay on the device until log time.

`Metrics.step()` runs every optimizer step and only issues device ops (no `.item()`, no host
sync); `Metrics.log()` is the one place per log interval where numbers leave the GPU. Throughput
is counted in images, like every schedule in ArchiRF. MFU follows DESIGN.md §4: training FLOPs =
6 x forward multiply-adds (forward = 2 x MACs, backward = 2 x forward), over the GPU's peak bf16
dense matmul rate.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from .checkpoint import write_atomic

# Dense bf16 FLOP/s per GPU, matched against torch.cuda.get_device_name() by substring, first
# match wins (so more specific names come first).
_PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),   # datasheet (dense, no sparsity)
    ("H100 NVL", 835e12),    # datasheet
    ("H100", 771e12),        # measured: bf16 matmul 8192^3 on our H100 80GB SXM (shared/ANCHORS.md)
    ("H200", 771e12),        # same GH100 die and clocks as H100 SXM; the measured H100 value
    ("H800", 771e12),        # H100 SXM with cut interconnect; the measured H100 value
    ("GH200", 771e12),       # same GH100 die; the measured H100 value
    ("B200", 2250e12),       # datasheet
    ("A100", 312e12),        # datasheet
    ("A800", 312e12),        # datasheet
    ("L40S", 362e12),        # datasheet
    ("L40", 181e12),         # datasheet
    ("L4", 121e12),          # datasheet
    ("A10G", 70e12),         # datasheet (AWS)
    ("A10", 125e12),         # datasheet
    ("RTX 4090", 165e12),    # datasheet (fp32 accumulate)
    ("RTX 3090", 71e12),     # datasheet (fp32 accumulate)
    ("V100", 125e12),        # datasheet fp16 (V100 has no bf16; autocast would fall back)
]


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device; None when unknown (MFU is then omitted).

    ARCHIRF_PEAK_TFLOPS overrides the table (and works on any device, CPU included).
    """
    override = os.environ.get("ARCHIRF_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _json_safe(value):
    """NaN/inf are not JSON; write them as null so every line stays parseable."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor):
        return _json_safe(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


_now = time.perf_counter  # module-level so tests can substitute a fake clock


class Metrics:
    """On-device loss/grad-norm accumulators, throughput, MFU, metrics.jsonl and a progress bar.

    `images` passed to step() and `img_per_s` are global (all ranks together); `img_per_s_per_gpu`
    and MFU are per GPU (per rank), and `scaling_efficiency` is img_per_s_per_gpu over
    `reference_img_per_s` (the one-GPU rate of the same recipe) when that is given. `reduce(t)`
    must return the sum of the 1-D tensor `t` over ranks (e.g. an all_reduce SUM); it is called by every rank inside log() and nonfinite_count(), so all ranks must call
    those together. The default (identity) is right for one process.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_images: int,                       # the run's length in images (progress bar total)
        start_images: int,                       # images already seen (non-zero on resume)
        flops_per_image: int | None,             # forward multiply-adds per image (model.flops_per_image())
        device: torch.device,
        is_main: bool = True,                    # only the main rank writes jsonl and shows the bar
        progress: bool = True,
        world_size: int = 1,
        reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
        reference_img_per_s: float | None = None,  # one-GPU img/s of this recipe: enables scaling_efficiency
    ):
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.device = torch.device(device)
        self.flops_per_image = flops_per_image
        self.is_main = is_main
        self.world_size = world_size
        self.reduce = reduce
        self.reference_img_per_s = reference_img_per_s
        self.peak_flops = peak_flops(self.device)
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

        # Device accumulators, reset at every log: [loss sum, grad-norm sum, finite steps].
        # Non-finite steps are left out of the means (one NaN would otherwise hide the window).
        self._sums = torch.zeros(3, dtype=torch.float32, device=self.device)
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)  # whole process
        # Host accumulators: plain Python numbers, no sync needed.
        self._window_steps = 0
        self._window_images = 0
        self._window_data_wait_s = 0.0
        self._paused_s = 0.0
        self._start_time = _now()
        self._window_start = self._start_time

        self._bar = None
        if is_main and progress:
            interactive = sys.stderr.isatty()
            self._bar = tqdm(
                total=total_images,
                initial=start_images,
                unit="img",
                unit_scale=True,
                dynamic_ncols=True,
                smoothing=0.05,
                # Off a terminal (SLURM logs, CI) every refresh is a new line: refresh rarely.
                mininterval=1.0 if interactive else 60.0,
            )

    def step(
        self,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        images: int,
        data_wait_s: float,
        finite: torch.Tensor | None = None,
    ) -> None:
        """Accumulate one optimizer step. Device ops only: never syncs with the host.

        loss, grad_norm: 0-dim detached device tensors. finite: optional 0-dim bool saying the
        step counts (default: loss is finite); non-finite steps are counted, not averaged.
        """
        loss = loss.detach().float()
        grad_norm = grad_norm.detach().float()
        if finite is None:
            finite = torch.isfinite(loss)
        values = torch.stack([loss, grad_norm, torch.ones_like(loss)])
        self._sums.add_(torch.where(finite, values, 0.0))
        self._nonfinite.add_((~finite).long())
        self._window_steps += 1
        self._window_images += images
        self._window_data_wait_s += data_wait_s
        if self._bar is not None:
            self._bar.update(images)

    @property
    def pending_steps(self) -> int:
        """Steps accumulated since the last line (a stop between log boundaries flushes them)."""
        return self._window_steps

    def nonfinite_count(self) -> int:
        """Non-finite steps so far in this process, summed over ranks."""
        return int(self.reduce(self._nonfinite.clone().reshape(1))[0].item())  # note: CPU-GPU sync point

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside (checkpointing, sampling grids) out of img/s and MFU."""
        self._synchronize()  # queued training work belongs to the window, not to the pause
        t0 = _now()
        try:
            yield
        finally:
            self._synchronize()
            self._paused_s += _now() - t0

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def log(self, images_seen: int, lr: float, extra: dict | None = None) -> dict:
        """Read the accumulators (the one sync per interval), write a jsonl line, reset."""
        self._synchronize()  # so the wall time below covers the GPU work, not just its launch
        now = _now()
        wall_s = max(now - self._window_start - self._paused_s, 1e-9)

        totals = torch.cat([self._sums, self._nonfinite.to(self._sums.dtype).reshape(1)])
        loss_sum, grad_sum, finite_steps, nonfinite = self.reduce(totals).tolist()  # note: CPU-GPU sync point

        img_per_s = self._window_images / wall_s
        record = {
            "images_seen": images_seen,
            "loss": loss_sum / finite_steps if finite_steps else None,
            "grad_norm": grad_sum / finite_steps if finite_steps else None,
            "lr": lr,
            "img_per_s": img_per_s,
            "img_per_s_per_gpu": img_per_s / self.world_size,
            "steps": self._window_steps,
            "nonfinite": int(nonfinite),
            "data_wait_frac": min(self._window_data_wait_s / wall_s, 1.0),
            "paused_s": self._paused_s,        # checkpoints, sample grids, evaluation: outside img/s and MFU
            "time": time.time(),
            "elapsed_s": now - self._start_time,
        }
        if self.reference_img_per_s:
            record["scaling_efficiency"] = img_per_s / self.world_size / self.reference_img_per_s
        if self.flops_per_image is not None:
            flops_per_gpu = 6 * self.flops_per_image * img_per_s / self.world_size
            record["tflops_per_gpu"] = flops_per_gpu / 1e12
            if self.peak_flops is not None:
                record["mfu"] = flops_per_gpu / self.peak_flops
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if extra:
            record.update(extra)
        record = _json_safe(record)

        if self.is_main:
            # Append and close each time: a crash loses at most the line being written.
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        if self._bar is not None:
            loss = record["loss"]
            self._bar.set_postfix(
                loss="nan" if loss is None else f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:,.0f}"
            )

        self._sums.zero_()
        self._window_steps = 0
        self._window_images = 0
        self._window_data_wait_s = 0.0
        self._paused_s = 0.0
        self._window_start = now
        return record

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def set_aside_after(jsonl_path: str | Path, images_seen: int) -> Path | None:
    """On resume: moves the lines logged past `images_seen` (by a process killed after the checkpoint resumed
    from; they are about to be logged again) and any line cut short to metrics.orphaned-<images>.jsonl beside
    it, so the log holds one line per interval. Returns the new file, or None when nothing moved."""
    path = Path(jsonl_path)
    if not path.exists():
        return None
    keep, later = [], []
    for line in path.read_text().splitlines():
        try:
            kept = json.loads(line)["images_seen"] <= images_seen
        except (ValueError, KeyError, TypeError):
            kept = False
        (keep if kept else later).append(line + "\n")
    if not later:
        return None
    n, aside = 1, path.with_name(f"{path.stem}.orphaned-{images_seen}.jsonl")
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.stem}.orphaned-{images_seen}-{n}.jsonl")
    aside.write_text("".join(later))
    write_atomic(path, "".join(keep))
    return aside
