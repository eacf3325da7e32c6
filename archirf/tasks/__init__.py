"""Tasks: what one training loop trains. A task owns its networks, optimizers, loss, EMA and pictures; the loop
(trainer.py) owns the data, the schedule, checkpoints, metrics and signals.

    task = build_task(cfg, env, run_dir, dtype=..., compile=...)

The generative task (flow / diffusion objectives, generative.py) and the autoencoder task
(autoencoder.py: reconstruction, LPIPS, PatchGAN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


# run-dir entries tasks write besides checkpoints/, snapshots/ and metrics.jsonl: resume=none moves them aside too
TASK_OUTPUTS = ("posthoc", "eval.jsonl", "fid.png", "reconstructions.png", "losses.png")


def build_task(cfg, env, run_dir: Path, *, dtype: Optional[torch.dtype], compile: bool, cuda_graph: bool = False,
               compile_eval: Optional[bool] = None):
    """The autoencoder task for model.name=autoencoder (tasks/autoencoder.py), else the generative one (cuda_graph:
    each micro batch's passes replay as one CUDA graph; compile_eval: whether the generative task's evaluation
    copy and latent decoder compile, by default as `compile`)."""
    if cfg.model.name == "autoencoder":
        from .autoencoder import AutoencoderTask

        return AutoencoderTask(cfg, env, run_dir, dtype=dtype, compile=compile, cuda_graph=cuda_graph)
    from .generative import GenerativeTask

    return GenerativeTask(cfg, env, run_dir, dtype=dtype, compile=compile, cuda_graph=cuda_graph,
                          compile_eval=compile_eval)
