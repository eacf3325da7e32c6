"""Pictures of a run: sample grids (PNG), sampling trajectories (GIF) and loss curves.

Every file is written atomically (temp name in the same directory, then os.replace), so a crash
or a reader polling the run dir never sees half a picture.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image


def _atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temp file next to `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX when both names are on one filesystem
    finally:
        tmp.unlink(missing_ok=True)
    return path


def make_grid(images: torch.Tensor, nrow: int, pad: int = 2, upscale: int = 1, pad_value: int = 128) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one (H', W', 3) uint8 picture.

    nrow images per row (as in torchvision); grey (C=1) becomes RGB; `upscale` repeats pixels
    (nearest) so that 16-px digits are visible; `pad` pixels of grey `pad_value` separate tiles,
    which tells tiles apart on both black and white backgrounds. Latents (any other C) are shown
    as a preview: see latent_preview.
    """
    if images.ndim != 4 or images.shape[1] < 1:
        raise ValueError(f"make_grid wants (N, C, H, W) images, got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        images = latent_preview(images)
    if nrow < 1 or upscale < 1 or pad < 0:
        raise ValueError(f"make_grid: need nrow >= 1, upscale >= 1, pad >= 0 (got {nrow}, {upscale}, {pad})")
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).cpu().numpy()                               # (N, H, W, C)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)                                      # (N, H, W, 3)
    if upscale > 1:
        x = x.repeat(upscale, axis=1).repeat(upscale, axis=2)             # (N, H*u, W*u, 3)

    n, h, w, _ = x.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / nrow)
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), pad_value, dtype=np.uint8)
    for i in range(n):
        top = pad + (i // nrow) * (h + pad)
        left = pad + (i % nrow) * (w + pad)
        grid[top : top + h, left : left + w] = x[i]
    return grid


def latent_preview(latents: torch.Tensor, std_range: float = 2.0) -> torch.Tensor:
    """(N, C, H, W) latents -> (N, 3 or 1, H, W) in [-1, 1]: the first three channels as RGB (the
    first one as grey when C = 2), +-std_range standard deviations of the batch mapped to +-1 per
    channel. A look at structure, not the decoded image (decode with the autoencoder for that).
    """
    x = latents.detach().float()[:, :3] if latents.shape[1] >= 3 else latents.detach().float()[:, :1]
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6) if x.numel() > x.shape[1] else torch.ones(1)
    return (x - x.mean(dim=(0, 2, 3), keepdim=True)) / (std_range * std)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, upscale: int = 1, pad: int = 2) -> Path:
    """Write a sample grid as PNG; returns the path."""
    picture = Image.fromarray(make_grid(images, nrow, pad=pad, upscale=upscale))
    return _atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_gif(
    frames: list[torch.Tensor],
    path: str | Path,
    nrow: int,
    duration_ms: int = 80,
    upscale: int = 1,
    hold_last_ms: int = 1500,
    pad: int = 2,
) -> Path:
    """Animate a sampling trajectory [x_T, ..., x_0] (each (N, C, H, W)) as a looping GIF.

    The last frame (the samples) is held for hold_last_ms so the eye can rest on the result.
    """
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    # GIF is paletted: quantize each frame to its own 256-colour palette (exact for grey digits).
    pictures = [Image.fromarray(make_grid(f, nrow, pad=pad, upscale=upscale)).quantize(256) for f in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [hold_last_ms]

    def write(tmp: Path) -> None:
        pictures[0].save(
            tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0
        )

    return _atomic_write(path, write)


def _read_metrics(metrics_jsonl: Path) -> tuple[list[dict], list[int]]:
    """Records in training order, and the images_seen at which a resumed run took over.

    A resumed run restarts from its checkpoint, which may be older than the last logged line:
    its lines supersede the earlier run's lines at or past its first images_seen. A torn last
    line (crash mid-write) is skipped.
    """
    records: list[dict] = []
    resumes: list[int] = []
    last_elapsed = -math.inf
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "images_seen" not in record:
            continue
        seen = record["images_seen"]
        elapsed = record.get("elapsed_s", math.inf)
        if (records and seen <= records[-1]["images_seen"]) or elapsed < last_elapsed:
            resumes.append(seen)
        while records and records[-1]["images_seen"] >= seen:
            records.pop()
        records.append(record)
        last_elapsed = elapsed
    return records, resumes


def plot_loss_curve(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Loss (log y) and learning rate (twin axis) against images seen, from metrics.jsonl."""
    # Lazy: matplotlib is slow to import and only needed here. The Agg canvas renders
    # off-screen without touching pyplot's global backend (safe in notebooks and threads).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    metrics_jsonl = Path(metrics_jsonl)
    records, resumes = _read_metrics(metrics_jsonl)
    loss_points = [(r["images_seen"], r["loss"]) for r in records if r.get("loss") is not None]
    lr_points = [(r["images_seen"], r["lr"]) for r in records if r.get("lr") is not None]

    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    marker = "o" if len(loss_points) < 30 else None  # a lone point must still be visible
    if loss_points:
        xs, ys = zip(*loss_points)
        ax.plot(xs, ys, color="tab:blue", marker=marker, markersize=3, linewidth=1.2, label="loss")
        if min(ys) > 0:
            ax.set_yscale("log")
    for seen in resumes:
        ax.axvline(seen, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("images seen")
    ax.set_ylabel("loss", color="tab:blue")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.grid(True, which="major", alpha=0.3)

    if lr_points:
        ax_lr = ax.twinx()
        xs, ys = zip(*lr_points)
        ax_lr.plot(xs, ys, color="tab:orange", marker=marker, markersize=2, linewidth=1.0, alpha=0.8)
        ax_lr.set_ylabel("learning rate", color="tab:orange")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    title = metrics_jsonl.parent.name or "run"
    if resumes:
        title += f"  ({len(resumes)} resume{'s' if len(resumes) > 1 else ''}, dotted)"
    ax.set_title(title)
    fig.tight_layout()
    return _atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))


def plot_metric_panels(metrics_jsonl: str | Path, out_png: str | Path,
                       panels: list[tuple[str, tuple[str, ...], tuple[str, ...]]]) -> Path:
    """Curves of metrics.jsonl's scalar keys against images seen, one panel per (title, keys on the left axis,
    keys on the twin right axis, dashed) that has a logged key; keys the run did not log are left out. A left axis
    of positive values over more than a decade is logarithmic; resumes are dotted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    metrics_jsonl = Path(metrics_jsonl)
    records, resumes = _read_metrics(metrics_jsonl)

    logged = {k: [(r["images_seen"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
              for _, left, right in panels for k in (*left, *right)}          # (None: a non-finite value)
    curves = [(title, [(k, logged[k]) for k in left if logged[k]], [(k, logged[k]) for k in right if logged[k]])
              for title, left, right in panels]
    curves = [c for c in curves if c[1] or c[2]] or [("no metrics logged yet", [], [])]
    fig = Figure(figsize=(4.5 * len(curves), 3.8), dpi=120)
    FigureCanvasAgg(fig)
    marker = "o" if len(records) < 30 else None  # a lone point must still be visible
    colour = 0
    for i, (title, left, right) in enumerate(curves):
        ax = fig.add_subplot(1, len(curves), i + 1)
        lines = []
        for axis, keys in ((ax, left), (ax.twinx() if right else None, right)):
            for key, pts in keys:
                xs, ys = zip(*pts)
                lines += axis.plot(xs, ys, color=f"C{colour}", marker=marker, markersize=3, linewidth=1.2,
                                   label=key, linestyle="-" if axis is ax else "--")
                colour += 1
            if keys:
                axis.set_ylabel(", ".join(k for k, _ in keys))
        values = [y for _, pts in left for _, y in pts]
        if values and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")
        for seen in resumes:
            ax.axvline(seen, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("images seen")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(title)
        if lines:
            ax.legend(handles=lines, fontsize=7)
    fig.suptitle(metrics_jsonl.parent.name or "run")
    fig.tight_layout()
    return _atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))


def plot_fid_curve(history: list[dict], out_png: str | Path, title: str = "run", label: str = "FID") -> Path:
    """FID (or another distance named `label`, under the key "fid"; FD-DINOv2 on a twin axis) against images
    seen, from the evaluation history."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = [(h["images_seen"], h["fid"]) for h in history if h.get("fid") is not None]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, color="tab:green", marker="o", markersize=3, linewidth=1.2)
        best = min(points, key=lambda p: p[1])
        ax.annotate(f"{best[1]:.3g}", best, textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("images seen")
    ax.set_ylabel(label, color="tab:green")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.grid(True, which="major", alpha=0.3)
    dino = [(h["images_seen"], h["fd_dinov2"]) for h in history if h.get("fd_dinov2") is not None]
    if dino:
        ax2 = ax.twinx()
        xs, ys = zip(*dino)
        ax2.plot(xs, ys, color="tab:purple", marker="s", markersize=3, linewidth=1.0)
        ax2.set_ylabel("FD-DINOv2", color="tab:purple")
    ax.set_title(title)
    fig.tight_layout()
    return _atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))
