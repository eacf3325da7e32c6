"""fp8 numerics over a real run: the same recipe, seed and data trained under bf16 and under each fp8 recipe, loss
curves compared.

    python -m benchmarks.fp8_convergence --out DIR [--images 256000] [--precisions bf16,fp8-tensorwise,fp8-rowwise]
        [--config configs/digits.yaml] [--tolerance 0.02] [key=value ...]

Default: DiT-B/2 (`model.preset=DiT-B/2`) on the embedded digits at 32 px, batch 128, rectified flow: 2,000 steps
per precision. Each run goes through archirf.train in this process (run dirs under
DIR/<precision>). The comparison: each precision's mean loss over the last quarter of the run against bf16's,
relative; within `--tolerance` passes. Every aligned per-token GEMM is converted (torchao's size rule, a speed
pick that converts little of DiT-B/2, is off unless --size-filter). Writes DIR/fp8_convergence.json (per-precision
curves, means, the layers fp8 converted) and DIR/fp8_loss.png (the curves, smoothed). Needs an fp8 GPU, or ARCHIRF_FP8_EMULATE=1 for a dry run
on a CPU (tests/test_fp8.py runs one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DEFAULTS = ["model.name=dit", "model.preset=DiT-B/2", "data.resolution=32", "global_batch=128",
            "optim.lr=1e-4", "optim.warmup_images=25600", "sample_every=0", "checkpoint_every=0", "progress=false"]


def run(out: Path, precisions: list[str], images: int, config: str | None, overrides: list[str],
        all_layers: bool = True) -> tuple[dict, dict]:
    from archirf import fp8

    curves, converted = {}, {}
    saved, fp8.SIZE_FILTER = fp8.SIZE_FILTER, not all_layers    # the numerics of every aligned per-token GEMM
    try:
        _train_each(out, precisions, images, config, overrides, curves, converted)
    finally:
        fp8.SIZE_FILTER = saved
    return curves, converted


def _train_each(out, precisions, images, config, overrides, curves, converted) -> None:
    from archirf import fp8
    from archirf.config import load_config
    from archirf.models import build_model
    from archirf.trainer import train

    for precision in precisions:
        torch._dynamo.reset()
        log_every = max(images // 100, 1)
        cfg = load_config(config, DEFAULTS + overrides + [
            f"run_dir={out / precision}", f"precision={precision}", f"total_images={images}",
            f"log_every={log_every}", "resume=none"])
        if fp8.recipe(precision):
            with torch.device("meta"):
                converted[precision] = fp8.plan(build_model(cfg).blocks, precision).convert
        run_dir = train(cfg)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        curves[precision] = [(r["images_seen"], r["loss"]) for r in rows if "loss" in r]


def compare(curves: dict, tolerance: float) -> dict:
    def tail_mean(c):
        tail = c[len(c) * 3 // 4:] or c
        return sum(v for _, v in tail) / len(tail)

    base = tail_mean(curves["bf16"])
    out = {}
    for precision, c in curves.items():
        mean = tail_mean(c)
        rel = (mean - base) / base
        out[precision] = {"tail_mean_loss": mean, "relative_to_bf16": rel, "within": abs(rel) <= tolerance}
    return out


def plot(curves: dict, path: Path) -> None:
    """Left: each precision's loss (running mean over 5 % of the points, log scale). Right: each fp8 curve's
    running mean relative to bf16's at the same images (the curves overlap on the left when they agree)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(c):
        xs, ys = zip(*c)
        k = max(len(ys) // 20, 1)
        return list(xs), [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]

    fig, (ax, rel) = plt.subplots(1, 2, figsize=(12, 4))
    base_x, base_y = smooth(curves["bf16"])
    base = dict(zip(base_x, base_y))
    for precision, c in curves.items():
        xs, ys = smooth(c)
        ax.plot(xs, ys, label=precision)
        if precision != "bf16":
            pairs = [(x, 100 * (y - base[x]) / base[x]) for x, y in zip(xs, ys) if x in base]
            if pairs:
                rel.plot(*zip(*pairs), label=precision)
    if all(v > 0 for c in curves.values() for _, v in c):      # (a loss that can be negative: a linear axis)
        ax.set_yscale("log")
    ax.set_xlabel("images seen")
    ax.set_ylabel("training loss (running mean)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    rel.axhline(0, color="grey", lw=0.8)
    rel.set_xlabel("images seen")
    rel.set_ylabel("relative to bf16 (%)")
    rel.legend()
    rel.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=256_000)
    ap.add_argument("--precisions", default="bf16,fp8-tensorwise,fp8-rowwise")
    ap.add_argument("--config", default=None, help="a recipe (default: the built-in digits defaults)")
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--size-filter", action="store_true",
                    help="convert only the layers torchao's size rule picks (as a training run does); default: every "
                         "aligned per-token layer, so that each recipe's numerics are tested")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    precisions = args.precisions.split(",")
    if "bf16" not in precisions:
        raise SystemExit("--precisions must include bf16: the other curves are compared with it")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves, converted = run(out, precisions, args.images, args.config, args.overrides, not args.size_filter)
    verdict = compare(curves, args.tolerance)
    (out / "fp8_convergence.json").write_text(json.dumps(
        {"images": args.images, "overrides": args.overrides, "tolerance": args.tolerance, "device":
         torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
         "size_filter": args.size_filter, "converted": converted, "curves": curves, "verdict": verdict}, indent=1))
    plot(curves, out / "fp8_loss.png")     # after the JSON: a plotting failure loses no run
    for precision, v in verdict.items():
        print(f"{precision:16s} last-quarter mean loss {v['tail_mean_loss']:.5f}  vs bf16 {v['relative_to_bf16']:+.2%}"
              f"  {'within' if v['within'] else 'OUTSIDE'} ±{args.tolerance:.0%}")
    return 0 if all(v["within"] for v in verdict.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
