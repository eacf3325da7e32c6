"""Host time of one optimizer step, phase by phase, through the trainer's own pieces (any world size).

    torchrun --nproc_per_node=2 -m benchmarks.host_overhead [--config configs/dit_xl2_latent.yaml] \
        [--tiny] [--steps 20] [--compile on|off] [--cprofile FILE] [--profile DIR] [key=value ...]

The step is the trainer's under optim.fused_update=false (the unfused update, whatever the setting: the
one-pass update is timed by benchmarks/bench_optim.py and train_step_variants' *_fu): lr, gradient sync,
micro-batch seeding, the loader (synthetic data), the objective loss and backward, parallel.clip_grad_norm_,
the optimizer of optim.build_optimizer, zero_grad, EMA.update and Metrics.step, on the model of
parallel.build_training_model (FSDP2 on several ranks, the plain module on one unless
parallel.shard_single_rank=true). Each phase's host time is read with time.perf_counter and no device sync,
so on a GPU it is the time the host needs to issue the work: when it exceeds the GPU's busy time the step
is host-bound.

--tiny keeps the recipe's depth (DiT-XL/2: 28 blocks, so the same number of hooks, parameters and
kernel launches per step) at a negligible width (hidden 64, 2 heads, 8x8 latents, batch 2): time per
step is then almost all host overhead, measurable on a CPU. On CUDA the script also profiles three
steps and reports the GPU's busy time per step (the union of its kernels' intervals) next to the
host time. Prints one JSON line (rank 0): ms per step, ms per phase, img/s per rank; `--variants`
runs several settings in one process, separated by ';': `base` (the trainer's step as it is),
`torch_step` (the baseline: torch's own AdamW step and clip_grad_norm_, on DTensors under FSDP2),
or key=value overrides joined by '+' (optionally with +torch_step), e.g.
--variants "torch_step;base;parallel.reshard_after_forward=false".
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import pstats
import time
from collections import defaultdict
from pathlib import Path

import torch

from archirf import parallel
from archirf.config import batch_split, load_config
from archirf.data import build_loader
from archirf.ema import EMA
from archirf.metrics import Metrics
from archirf.objectives import build_objective
from archirf.optim import build_optimizer, lr_at
from archirf.sample import autocast_model_fn

TINY_DATA = ["data.resolution=8", "data.channels=4", "data.synthetic_size=256", "micro_batch=2"]
TINY_MODEL = {  # per family: a small width, the recipe's number of blocks (transformers)
    "transformer": ["model.preset=null", "model.patch_size=2", "model.hidden_size=64", "model.num_heads=2"],
    "unet": ["model.preset=null", "model.channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
             "model.attn_resolutions=[4]"],
}
PHASES = ("forward_backward", "clip", "optimizer_step", "zero_grad", "ema", "other")


class Step:
    """The trainer's optimizer step (trainer._train's loop body) with a host timer around each phase."""

    def __init__(self, cfg, env, compile_: bool, run_dir: Path, torch_step: bool = False):
        self.cfg, self.env = cfg, env
        self.micro, self.accum = batch_split(cfg, env.world_size)
        device = env.device
        self.dtype = torch.bfloat16 if device.type == "cuda" and cfg.precision != "fp32" else None
        self.loader = build_loader(cfg, self.micro, device, env.rank, env.world_size)
        self.objective = build_objective(cfg)
        self.model, _ = parallel.build_training_model(cfg, env, param_dtype=self.dtype, compile=compile_)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim, device)
        self.clip = parallel.clip_grad_norm_
        if torch_step:  # the baseline: torch's own AdamW step and clipping, DTensor dispatch and all
            defaults = {k: v for k, v in self.optimizer.defaults.items() if k != "decoupled_weight_decay"}
            self.optimizer = torch.optim.AdamW(self.params, **defaults)
            self.clip = torch_clip_grad_norm_
        self.ema = EMA(self.model, half_life_images=cfg.ema.half_life_images, decay=cfg.ema.decay,
                       sigma_rel=cfg.ema.sigma_rel, start_images=cfg.ema.start_images)
        self.model_fn = autocast_model_fn(self.model, device, self.dtype)
        self.metrics = Metrics(run_dir, total_images=10**12, start_images=0, flops_per_image=None, device=device,
                               is_main=False, progress=False, world_size=env.world_size,
                               reduce=parallel.all_reduce_sum)
        self.images = 0
        self.host = defaultdict(float)  # phase -> seconds, summed over the timed steps

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.host[name] += time.perf_counter() - t0

    def __call__(self) -> None:
        cfg, model = self.cfg, self.model
        with self.phase("other"):
            lr = lr_at(cfg.optim, self.images, 10**12)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=self.env.device)
        for k in range(self.accum):
            with self.phase("other"):
                parallel.set_gradient_sync(model, k == self.accum - 1)
                parallel.seed_micro_batch(cfg.seed, self.loader, self.env.rank, self.micro)
                x, y = next(self.loader)
            with self.phase("forward_backward"):
                loss = self.objective.loss(self.model_fn, x, y).mean()
                (loss / self.accum).backward()
            with self.phase("other"):
                loss_sum += loss.detach() / self.accum
        with self.phase("clip"):
            grad_norm = self.clip(self.params, cfg.optim.grad_clip)
        with self.phase("optimizer_step"):
            self.optimizer.step()
        with self.phase("zero_grad"):
            self.optimizer.zero_grad(set_to_none=True)
        self.images += cfg.global_batch
        with self.phase("ema"):
            self.ema.update(model, self.images, cfg.global_batch)
        with self.phase("other"):
            self.metrics.step(loss_sum, grad_norm, cfg.global_batch, 0.0,
                              finite=torch.isfinite(loss_sum) & torch.isfinite(grad_norm))


def torch_clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ as is: on DTensor gradients through DTensor dispatch."""
    from torch.distributed.tensor import DTensor

    total = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    return total.full_tensor() if isinstance(total, DTensor) else total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_busy_ms(step: Step, steps: int = 3) -> float:
    """The GPU's busy time per step: the union of all its kernels' intervals over `steps` profiled steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(step.env.device)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # microseconds
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / steps / 1e3


def measure(name: str, cfg, env, args, run_dir: Path, torch_step: bool) -> dict:
    device = env.device
    compile_ = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    step = Step(cfg, env, compile_, run_dir, torch_step=torch_step)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    sync(device)
    step.host.clear()
    profiler = cProfile.Profile() if args.cprofile and env.is_main else None
    if profiler:
        profiler.enable()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    wall = (time.perf_counter() - t0) / args.steps
    if profiler:
        profiler.disable()
        with open(f"{args.cprofile}.{name}.txt", "w") as f:
            pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(60)
            pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(80)
    host = {k: step.host[k] / args.steps * 1e3 for k in PHASES}
    out = {"variant": name, "world_size": env.world_size, "fsdp": parallel.uses_fsdp(cfg, env),
           "compile": args.compile, "micro_batch": step.micro, "ms_per_step": wall * 1e3,
           "host_ms_per_step": sum(host.values()), "img_per_s_per_rank": cfg.global_batch / env.world_size / wall,
           "first_step_s": first, **{f"{k}_ms": v for k, v in host.items()}}
    if device.type == "cuda":
        out["gpu_busy_ms_per_step"] = gpu_busy_ms(step)
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                step()
            sync(device)
        if env.is_main:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=60, max_name_column_width=80)
            (Path(args.profile) / f"host_{name}_rank0.txt").write_text(table)
    return out


def tiny_size(cfg, world_size: int) -> list[str]:
    """Overrides that shrink the recipe's network and data but keep its number of blocks (transformers)."""
    m = cfg.model
    if m.name in ("dit", "mmdit"):
        depth = [f"model.depth={m.depth}"] + ([f"model.depth_single_blocks={m.depth_single_blocks}"]
                                             if m.name == "mmdit" else [])
        model = [*TINY_MODEL["transformer"], *depth]
    else:
        model = TINY_MODEL["unet"]
    return [*model, *TINY_DATA, f"global_batch={2 * world_size}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/dit_xl2_latent.yaml")
    ap.add_argument("--tiny", action="store_true", help="the recipe's depth at a negligible width (default on CPU)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on CUDA only")
    ap.add_argument("--variants", default="base", help="';'-separated; each 'base' or key=value[+key=value]")
    ap.add_argument("--cprofile", default=None, help="rank 0 writes cProfile tables to FILE.<variant>.txt")
    ap.add_argument("--profile", default=None, help="rank 0 writes torch.profiler tables to this dir")
    ap.add_argument("--run-dir", default="runs/host_overhead")
    ap.add_argument("--out", default=None, help="rank 0 appends the JSON lines to this file")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    base = load_config(args.config, list(args.overrides))
    tiny = args.tiny or not torch.cuda.is_available()
    with parallel.distributed(base) as env:
        size = tiny_size(base, env.world_size) if tiny else []
        results = []
        for variant in args.variants.split(";"):
            extra = [] if variant in ("base", "torch_step") else variant.split("+")
            torch_step = "torch_step" in extra or variant == "torch_step"
            extra = [e for e in extra if e != "torch_step"]
            cfg = load_config(args.config, [*size, *args.overrides, *extra])
            torch._dynamo.reset()
            gc.collect()
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(env.device)
            out = measure(variant, cfg, env, args, Path(args.run_dir), torch_step)
            results.append(out)
            if env.is_main:
                line = json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()})
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
