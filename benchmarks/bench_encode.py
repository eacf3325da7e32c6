"""Encoding a dataset and decoding samples on one GPU: `archirf.encode`'s img/s for the seed's 64 px autoencoder
and KL-f8c4 at 256 px, and the decoder's img/s (what a latent model's decoded sample grids and FID cost).

    python -m benchmarks.bench_encode --out DIR [--cases seed64,kl256] [--images 20000] [--batch 256]

Per case, an autoencoder of the preset with random weights (the cost is the network's) saved as a snapshot
with its recipe's config (configs/ae_seed_64px.yaml, ae_kl_f8c4_256px.yaml), and a folder of JPEGs made here
(64 px: 64 x 64 files, as a prepared ImageNet-64 folder; 256 px: 384 x 320 files, resized and cropped as
ImageNet's). Rows:
- "encode": the whole command, `archirf.encode.encode(snapshot, out, [data.root=FOLDER])` (decode workers,
  the compiled bf16 encoder, part files, the joined latents file), images / wall second of the encode loop as
  the command reports it, and the command's wall time from start to the written file;
- "encoder": the compiled bf16 encoder alone on GPU-resident batches (CUDA events): the ceiling of the first;
- "decoder": the compiled bf16 decoder alone on GPU-resident latents, as archirf.decoding.LatentDecoder runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = {"seed64": ("configs/ae_seed_64px.yaml", 64, (64, 64)), "kl256": ("configs/ae_kl_f8c4_256px.yaml", 256, (320, 384))}


def _events_rate(fn, x: torch.Tensor, iters: int) -> float:
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return iters * len(x) / (start.elapsed_time(end) / 1e3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default="seed64,kl256")
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    args = p.parse_args(argv)
    from archirf.checkpoint import save_snapshot
    from archirf.config import load_config, to_yaml
    from archirf.encode import encode
    from archirf.models import build_model
    from benchmarks.eval_fid import _write_jpegs

    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="encode_bench_"))
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "images": args.images,
               "batch": args.batch, "workers": args.workers, "cases": {}}
    for name in args.cases.split(","):
        recipe, res, size = CASES[name]
        folder = tmp / f"jpegs_{name}"
        _write_jpegs(folder, args.images, size)
        overrides = [f"data.root={folder}", "data.num_classes=0", f"data.num_workers={args.workers}"]
        cfg = load_config(recipe, overrides)
        torch.manual_seed(0)
        model = build_model(cfg)
        run = tmp / f"ae_{name}"
        snap = save_snapshot(run, 0, model.state_dict(), to_yaml(cfg))
        t0 = time.perf_counter()
        encode(snap, tmp / f"{name}.safetensors", overrides, batch=args.batch, progress=False)
        wall = time.perf_counter() - t0
        case = {"recipe": recipe, "resolution": res, "jpeg_size": list(size), "latent": list(model.latent_shape),
                "command_wall_s": wall, "command_img_per_s": args.images / wall}
        model = model.cuda().eval().requires_grad_(False)
        model.encoder.compile(dynamic=False)
        model.decoder.compile(dynamic=False)
        x = torch.rand(args.batch, 3, res, res, device="cuda") * 2 - 1
        z = torch.randn(args.batch, *model.latent_shape, device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            case["encoder_img_per_s"] = _events_rate(model.encode, x, 20)
            case["decoder_img_per_s"] = _events_rate(model.decode, z, 20)
        print(f"{name}: archirf.encode {case['command_img_per_s']:,.0f} img/s over {args.images:,} images "
              f"({wall:.1f} s incl. start-up and compile); encoder alone {case['encoder_img_per_s']:,.0f} img/s, "
              f"decoder alone {case['decoder_img_per_s']:,.0f} img/s (batch {args.batch}, bf16, compiled)",
              flush=True)
        results["cases"][name] = case
        del model
        torch.cuda.empty_cache()
    (out / "encode.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
