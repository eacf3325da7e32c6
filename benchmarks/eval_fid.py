"""Evaluation throughput on one GPU: FID sampling of DiT-XL/2 against the model's pure forward rate, the
feature network alone, and reference statistics of a folder of JPEGs.

    python -m benchmarks.eval_fid --out results.md [--num 1536] [--batch 256] [--ref-images 50000]

1. DiT-XL/2 (random weights), 32 Heun steps (63 model calls) with guidance (conditional and unconditional
   rows in one batch of 2B), compiled per block, bf16 autocast: `archirf.eval.evaluate_model` on `num`
   samples (after one warm-up batch), against the same compiled model's forward at batch 2B timed alone
   (CUDA events): the sampling loop's samples/s over num-forwards/s / 63. The model samples 32x32 RGB
   images (256 tokens, DiT-XL/2's latent token count; a latent model adds its decoder, not timed here);
   features are NVlabs' Inception at 299 px.
2. The Inception network alone on uint8 batches (contiguous and channels-last input).
3. `archirf.eval ref` over `ref_images` JPEGs (384x320, made here) at 256 px: decode in DataLoader workers,
   ADM's resize and crop, Inception; images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _forward_rate(model, batch: int, device, reps: int = 10) -> float:
    """Model forwards per second at batch `batch` (bf16 autocast), CUDA events, after warm-up."""
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.rand(batch, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(x, t, y)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            model(x, t, y)
        end.record()
        torch.cuda.synchronize()
    return reps / (start.elapsed_time(end) / 1e3)


def _write_jpegs(folder: Path, n: int, size: tuple[int, int] = (320, 384)) -> None:
    """n textured JPEGs of size (height, width) in folder."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_jpeg_chunk, [(str(folder), s, min(s + 1000, n), size) for s in range(0, n, 1000)]))


def _jpeg_chunk(job) -> None:
    from PIL import Image

    folder, start, stop, (height, width) = job
    rng = np.random.default_rng(start)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(start, stop):
        a, b, c = rng.uniform(0.005, 0.05, 3)
        img = np.stack([np.sin(a * xx + i), np.cos(b * yy - i), np.sin(c * (xx + yy))], -1) * 100 + 128
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(f"{folder}/{i:06d}.jpg", quality=90)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--num", type=int, default=1536)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ref-images", type=int, default=50_000)
    ap.add_argument("--inception", default=None)
    args = ap.parse_args()

    from archirf import parallel
    from archirf.config import load_config
    from archirf.eval import Evaluator, FeatureStats, evaluate_model, load_inception, save_statistics
    from archirf.eval.reference import compute_reference
    from archirf.models import build_model
    from archirf.objectives import build_objective

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    record = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    evaluator = Evaluator(load_inception(args.inception, device))
    record["inception"] = evaluator.inception.name

    # 2. the feature network alone
    u8 = torch.randint(0, 256, (args.batch, 3, 256, 256), dtype=torch.uint8, device=device)
    net = evaluator.inception
    rates = {}
    for layout in ("contiguous", "channels_last"):
        with torch.no_grad():
            prep = net.preprocess(u8)
            if layout == "channels_last":
                prep = prep.contiguous(memory_format=torch.channels_last)
            for _ in range(2):
                net.network(prep)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                out = net.network(prep)
            torch.cuda.synchronize()
            rates[layout] = 5 * args.batch / (time.perf_counter() - t0)
            if layout == "contiguous":
                first = out.float()
            else:
                record["channels_last_max_abs_diff"] = (out.float() - first).abs().max().item()
    record["inception_img_per_s"] = rates
    t0 = time.perf_counter()
    for _ in range(5):
        net(u8)
    torch.cuda.synchronize()
    record["inception_with_resize_img_per_s"] = 5 * args.batch / (time.perf_counter() - t0)

    # 1. DiT-XL/2 sampling for FID vs its pure forward rate
    cfg = load_config("configs/dit_xl2_latent.yaml", [
        "data.source=folder", "data.root=/nonexistent", "data.channels=3", "data.resolution=32",
        "sample.steps=32", "sample.sampler=heun", "sample.cfg_scale=1.5"])
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval().requires_grad_(False)
    parallel.parallelize(model, None, param_dtype=None, compile=True, shard=False)
    objective = build_objective(cfg)
    stats = FeatureStats(net.dim)
    stats.add(torch.randn(4096, net.dim, dtype=torch.float64))
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref.npz"
        save_statistics(ref, {"inception": stats}, {"networks": evaluator.networks})
        kwargs = dict(batch=args.batch, steps=32, sampler="heun", grid="uniform", cfg_scale=1.5, device=device,
                      dtype=torch.bfloat16, progress=False)
        t0 = time.perf_counter()
        evaluate_model(model, objective, cfg, evaluator, ref, num=args.batch, **kwargs)          # compile, warm-up
        record["warmup_s"] = time.perf_counter() - t0
        result = evaluate_model(model, objective, cfg, evaluator, ref, num=args.num, **kwargs)
        fwd = _forward_rate(model, 2 * args.batch, device)
        nfe = 2 * 32 - 1
        implied = fwd * args.batch / nfe
        record.update(num=args.num, batch=args.batch, nfe=nfe, samples_per_s=result["samples_per_s"],
                      eval_seconds=result["sampling_seconds"], score_seconds=result["score_seconds"],
                      feature_seconds=result["feature_seconds"],
                      forwards_per_s_at_2b=fwd, implied_samples_per_s=implied,
                      ratio_to_pure_forward=result["samples_per_s"] / implied,
                      fid50k_minutes=50_000 / result["samples_per_s"] / 60)
        del model
        torch.cuda.empty_cache()

        if not args.ref_images:
            record.update(ref_images=0, ref_img_per_s=float("nan"), jpeg_write_s=0.0)
            return _report(args, record)
        # 3. reference statistics of a folder of JPEGs at 256 px
        folder = Path(tmp) / "jpegs" / "all"
        t0 = time.perf_counter()
        _write_jpegs(folder, args.ref_images)
        record["jpeg_write_s"] = time.perf_counter() - t0
        rcfg = load_config(None, ["data.source=folder", f"data.root={folder.parent}", "data.channels=3",
                                  "data.resolution=256", "data.num_classes=0",
                                  f"data.num_workers={min(16, os.cpu_count() or 1)}"])
        t0 = time.perf_counter()
        info = compute_reference(rcfg, evaluator, Path(tmp) / "ref256.npz", batch=args.batch, rank=0, world_size=1,
                                 progress=False)
        record["ref_images"] = info["images"] - info["skipped_images"]
        record["ref_img_per_s"] = record["ref_images"] / (time.perf_counter() - t0)

    return _report(args, record)


def _report(args, r: dict) -> int:
    lines = [
        f"# Evaluation throughput ({r['gpu']}, torch {r['torch']})", "",
        f"Inception: {r['inception']} (TorchScript, fp32, TF32 on). Command: `python -m benchmarks.eval_fid "
        f"--num {r['num']} --batch {r['batch']} --ref-images {args.ref_images}`.", "",
        "| what | value |", "|---|---|",
        f"| DiT-XL/2 FID sampling (32 Heun steps = {r['nfe']} calls, CFG batched, batch {r['batch']}, bf16, compiled) "
        f"| **{r['samples_per_s']:.2f} samples/s** ({r['num']} samples in {r['eval_seconds']:.1f} s; then the "
        f"Fréchet distance, once: {r['score_seconds']:.1f} s on the CPU) |",
        f"| the same compiled model's forward alone at batch {2 * r['batch']} | {r['forwards_per_s_at_2b']:.3f} "
        f"forwards/s = {r['implied_samples_per_s']:.2f} samples/s |",
        f"| sampling loop / pure forward | **{r['ratio_to_pure_forward']:.3f}** (target ≥ 0.9) |",
        f"| time in the feature network | {r['feature_seconds']:.2f} s of {r['eval_seconds']:.1f} s "
        f"({100 * r['feature_seconds'] / r['eval_seconds']:.2f} %) |",
        f"| FID-50k at this rate | {r['fid50k_minutes']:.1f} min on one GPU |",
        f"| Inception alone, batch {r['batch']}, 299 px input | {r['inception_img_per_s']['contiguous']:.0f} img/s "
        f"(channels-last: {r['inception_img_per_s']['channels_last']:.0f}, max |Δ| "
        f"{r['channels_last_max_abs_diff']:.2e}) |",
        f"| Inception with the 256 → 299 resize | {r['inception_with_resize_img_per_s']:.0f} img/s |",
        f"| reference statistics, {r['ref_images']:,} JPEGs 384×320 → 256 px, {min(16, os.cpu_count() or 1)} "
        f"decode workers | **{r['ref_img_per_s']:.0f} img/s** |", ""]
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(r, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
