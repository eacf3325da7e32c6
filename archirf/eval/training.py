"""FID while training: every `eval.every` images, the EMA weights sample `eval.num` images sharded over the
ranks and are measured against `eval.ref` (or the training data's statistics, computed once into
RUN_DIR/eval/). Results go to metrics.jsonl (through the trainer's log line), RUN_DIR/eval.jsonl,
fid.png, and the checkpoint (the history), so a resumed run keeps its curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .evaluate import Evaluator, append_record, evaluate_model


class TrainingEval:
    def __init__(self, cfg, env, run_dir: Path, objective, *, dtype: Optional[torch.dtype], compile: bool,
                 eval_model: Optional[nn.Module], decoder=None):
        from ..models import build_model
        from .reference import EvalError, check_images

        e = cfg.eval
        self.cfg, self.env, self.run_dir, self.objective, self.dtype = cfg, env, Path(run_dir), objective, dtype
        device = env.device
        # a latent model: FID of its samples decoded by the task's decoder, against the images that were encoded
        self.decoder, self.images_cfg = decoder, (decoder.image_config if decoder is not None else cfg)
        check_images(self.images_cfg, "eval.every")
        self.evaluator = Evaluator.load(e.inception, e.dinov2, device)
        if e.ref is not None and not Path(e.ref).is_file():
            raise EvalError(f"eval.ref={e.ref}: no such file; compute it with: torchrun -m archirf.eval ref --config "
                            f"RECIPE --out {e.ref}, or set eval.ref=null to measure against the training data")
        if e.ref is not None:
            try:
                self.evaluator.check(e.ref)              # a mismatched file fails now, not after an interval
            except ValueError as err:
                raise EvalError(f"eval.ref: {err}") from None
        # Every rank samples its share, so every rank needs a whole copy: rank 0 shares the trainer's eval model
        # (both write the EMA weights into it before they sample), the others build one.
        if eval_model is None:
            torch.manual_seed(cfg.seed)
            eval_model = build_model(cfg).to(device).eval().requires_grad_(False)
        self.model = eval_model
        if compile:
            from .. import parallel

            parallel.parallelize(self.model, None, param_dtype=None, compile=True, shard=False)
        self.ref: Optional[Path] = None
        self.history: list[dict] = []

    def __call__(self, ema, training_model: nn.Module, images_seen: int) -> dict:
        """Scores of the EMA weights now ({"fid": ..., ...}); every rank calls it."""
        from ..visualize import plot_fid_curve
        from .reference import ensure_reference
        from .sampling import guidance_scale, resolve_sampler

        e, cfg, env = self.cfg.eval, self.cfg, self.env
        weights = ema.full_state_dict(keep=True)        # every rank joins the gather and keeps the result
        ema.copy_to(self.model, weights)
        from ..parallel import clean_fqn

        buffers = {clean_fqn(n): b for n, b in training_model.named_buffers()}    # (not averaged: the trained ones)
        with torch.no_grad():
            for name, own in self.model.named_buffers():
                own.copy_(buffers[clean_fqn(name)])
        if self.ref is None:
            self.ref = ensure_reference(self.images_cfg, self.evaluator, e.ref, self.run_dir / "eval", batch=e.batch,
                                        rank=env.rank, world_size=env.world_size, progress=cfg.progress)
        steps = e.steps or cfg.sample.steps
        cfg_scale = guidance_scale(cfg)
        sampler = resolve_sampler(cfg.sample.sampler, self.objective)
        result = evaluate_model(self.model, self.objective, cfg, self.evaluator, self.ref, num=e.num, batch=e.batch,
                                steps=steps, sampler=sampler, grid=cfg.sample.grid, cfg_scale=cfg_scale,
                                device=env.device, dtype=self.dtype, seed=cfg.seed, progress=False,
                                decoder=self.decoder)
        scores = {k: result[k] for k in ("fid", "fd_dinov2") if k in result}
        self.history.append({"images_seen": images_seen, **scores})
        if env.is_main:
            append_record(self.run_dir, self.evaluator, self.ref, self.dtype, weights="ema", source="training",
                          images_seen=images_seen, steps=steps, sampler=sampler, grid=cfg.sample.grid, cfg=cfg_scale,
                          seed=cfg.seed, ddim_eta=cfg.sample.ddim_eta, **result)
            plot_fid_curve(self.history, self.run_dir / "fid.png", title=self.run_dir.name)
            print(f"archirf: {', '.join(f'{k} {v:.4g}' for k, v in scores.items())} at {images_seen:,} images "
                  f"(EMA, {result['num']:,} samples, {steps} steps {sampler}, cfg {cfg_scale}; {result['seconds']:.1f} s)")
        return {**scores, "eval_seconds": result["seconds"]}

    def state_dict(self) -> dict:
        return {"history": json.dumps(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = json.loads(state["history"])


class ReconstructionEval:
    """rFID, PSNR and SSIM of an autoencoder while training: every `eval.every` images the EMA weights reconstruct
    the first `eval.num` images of the held-out folder `eval.ref` (null: of the training data), sharded over the
    ranks, measured by ReconstructionMetrics against their own originals. Results go to metrics.jsonl (through
    the trainer's log line), RUN_DIR/eval.jsonl, fid.png and the checkpoint (the history)."""

    def __init__(self, cfg, env, run_dir: Path, *, dtype: Optional[torch.dtype], eval_model: Optional[nn.Module]):
        from ..models import build_model
        from .detectors import DetectorError, load_inception
        from .reference import EvalError, check_images

        check_images(cfg, "eval.every")
        self.cfg, self.env, self.run_dir, self.dtype = cfg, env, Path(run_dir), dtype
        if cfg.eval.ref is not None and not Path(cfg.eval.ref).is_dir():
            raise EvalError(f"eval.ref={cfg.eval.ref}: no such folder; name a folder of held-out images (as "
                            f"data.root), or set eval.ref=null to reconstruct the training images")
        try:
            self.inception = load_inception(cfg.eval.inception, env.device)
        except DetectorError as err:
            raise EvalError(f"eval.inception: {err}") from None
        if eval_model is None:              # every rank reconstructs its share: a whole copy on each
            torch.manual_seed(cfg.seed)
            eval_model = build_model(cfg).to(env.device).eval().requires_grad_(False)
        self.model = eval_model
        self.history: list[dict] = []

    @torch.no_grad()
    def __call__(self, ema, images_seen: int) -> dict:
        """Scores of the EMA weights now ({"rfid", "eval_psnr", "eval_ssim", "eval_seconds"}); every rank calls it."""
        import time

        from ..visualize import plot_fid_curve
        from .recon import ReconstructionMetrics
        from .reference import dataset_images

        cfg, env, e = self.cfg, self.env, self.cfg.eval
        start = time.perf_counter()
        ema.copy_to(self.model, ema.full_state_dict(keep=True))   # every rank joins the gather and keeps it
        metrics = ReconstructionMetrics(self.inception)
        num, batches = dataset_images(cfg, e.batch, env.rank, env.world_size, limit=e.num, root=e.ref)
        device = env.device
        for _, images in batches:
            x = images.to(device).float() / 127.5 - 1
            with torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                x_hat = self.model(x, sample=False)["reconstruction"]
            metrics.update(x, x_hat.float().clamp(-1, 1))
        result = metrics.compute()
        seconds = time.perf_counter() - start
        scores = {"rfid": result["rfid"], "eval_psnr": result["psnr"], "eval_ssim": result["ssim"]}
        self.history.append({"images_seen": images_seen, "fid": result["rfid"]})
        if env.is_main:
            record = {"images_seen": images_seen, "weights": "ema", "source": "training", **scores,
                      "num": result["count"], "images": e.ref or "training data", "inception": self.inception.name,
                      "seconds": round(seconds, 3)}
            with open(self.run_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            plot_fid_curve(self.history, self.run_dir / "fid.png", title=f"{self.run_dir.name}: rFID",
                           label="rFID")
            print(f"archirf: rFID {result['rfid']:.4g}, PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} at "
                  f"{images_seen:,} images (EMA, {result['count']:,} images of {e.ref or 'the training data'}; "
                  f"{seconds:.1f} s)")
        return {**scores, "eval_seconds": seconds}

    def state_dict(self) -> dict:
        return {"history": json.dumps(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = json.loads(state["history"])
