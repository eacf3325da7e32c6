"""Image loading throughput: the PIL loader (DataLoader workers) against DALI, same images, same run.

    python scripts/photo_folder.py --out /tmp/jpegs --count 20000 --size 500x375 --format jpg
    python -m benchmarks.bench_data --root /tmp/jpegs --out benchmarks/results/<gpu> [--resolution 256]
        [--batch 256] [--workers 16] [--seconds 20] [--loaders torch,dali] [--sources folder,shards]

Each loader yields batches of (B, 3, R, R) float32 in [-1, 1] on the GPU, the way the trainer takes them;
after a warm-up (workers started, DALI's decoder buffers grown) it is timed for --seconds with a device
synchronise at the end. Reported: images/s, and the CPU cores the loader kept busy (the CPU time of this
process and of its worker processes over the wall time, from /proc). Writes data_loading.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from archirf.config import load_config
from archirf.data import build_loader


def _cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and of all its descendants still alive, in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        stats[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0.0)
        todo += children.get(p, [])
    return total


def measure(cfg, batch: int, device: torch.device, seconds: float, warmup: int) -> dict:
    loader = build_loader(cfg, batch, device)
    for _ in range(warmup):
        next(loader)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    cpu0, t0, n = _cpu_seconds(os.getpid()), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        x, _ = next(loader)
        n += len(x)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    wall = time.perf_counter() - t0
    cores = (_cpu_seconds(os.getpid()) - cpu0) / wall
    if hasattr(loader, "close"):
        loader.close()
    return {"img_per_s": n / wall, "cpu_cores": cores, "images": n, "seconds": wall,
            "class": type(loader).__name__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="an ImageFolder of JPEGs (scripts/photo_folder.py --format jpg)")
    ap.add_argument("--shards", help="the same images as tar shards (default: ROOT-shards, written if missing)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=16, help="DataLoader workers (torch) and DALI CPU threads")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=int, default=8, help="batches before timing")
    ap.add_argument("--loaders", default="torch,dali")
    ap.add_argument("--sources", default="folder")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = len([d for d in os.listdir(args.root) if os.path.isdir(os.path.join(args.root, d))])
    shards = args.shards or args.root.rstrip("/") + "-shards"
    sources = args.sources.split(",")
    if "shards" in sources and not os.path.isdir(shards):
        from archirf.prepare import main as prepare

        prepare(["shards", "--out", shards, "--no-progress", "data.source=folder", f"data.root={args.root}"])
    rows = []
    for source in sources:
        for kind in args.loaders.split(","):
            cfg = load_config(None, [f"data.source={source}", f"data.root={args.root if source == 'folder' else shards}",
                                     f"data.resolution={args.resolution}", "data.channels=3",
                                     f"data.num_classes={classes}", "data.random_flip=true",
                                     f"data.num_workers={args.workers}", f"data.loader={kind}"])
            result = measure(cfg, args.batch, device, args.seconds, args.warmup)
            rows.append({"source": source, "loader": kind, **result})
            print(f"{source:7s} {kind:6s} {result['img_per_s']:9,.0f} img/s  {result['cpu_cores']:5.1f} CPU cores",
                  flush=True)
    base = {r["source"]: r["img_per_s"] for r in rows if r["loader"] == "torch"}
    for r in rows:
        r["vs_torch"] = r["img_per_s"] / base[r["source"]] if r["source"] in base else None
    import nvidia.dali as dali

    meta = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "cpus": os.cpu_count(),
            "torch": torch.__version__, "dali": dali.__version__, "python": platform.python_version(),
            "resolution": args.resolution, "batch": args.batch, "workers": args.workers, "seconds": args.seconds,
            "images": sum(len(f) for _, _, f in os.walk(args.root)), "root": args.root,
            "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_loading.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Image loading: PIL DataLoader workers vs DALI ({meta['gpu']}, {meta['date']})", "",
             f"{meta['images']:,} JPEGs (scripts/photo_folder.py, 500x375, quality 90) -> {args.resolution} px, batch "
             f"{args.batch}, flips on, {args.workers} DataLoader workers / DALI CPU threads, {meta['cpus']} CPU cores; "
             f"torch {meta['torch']}, DALI {meta['dali']}, Python {meta['python']}; timed {args.seconds:.0f} s "
             f"after {args.warmup} batches.", "",
             "| source | loader | img/s | CPU cores busy | vs torch |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["vs_torch"] is None else f"{r['vs_torch']:.2f}x"
        lines.append(f"| {r['source']} | {r['loader']} | {r['img_per_s']:,.0f} | {r['cpu_cores']:.1f} | {ratio} |")
    (out / "data_loading.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
