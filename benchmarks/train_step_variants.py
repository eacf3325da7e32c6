"""Where a training step's time goes: the same recipe's step under different wrappings, one process.

    python -m benchmarks.train_step_variants [--config configs/dit_xl2_latent.yaml] \
        [--variants fsdp,plain,whole,fsdp_ref] [--batch 64] [--steps 15] [--rounds R] [--profile DIR] [key=value ...]

Variants (each: objective loss -> backward -> clip -> fused AdamW -> EMA, batch `--batch`, bf16
autocast on CUDA, synthetic data already on the device):
  fsdp      the trainer's multi-rank path on one rank: per-block compile + FSDP2 (bf16 params)
  plain     the trainer's one-rank path: per-block compile, plain module (fp32 weights, autocast)
  whole     torch.compile of the whole plain model (what a user's own compiled script does)
  eager     no compile
  graph     the trainer's cuda_graph=on with compile=off: the plain one-rank module, uncompiled, its forward and
            backward captured as one CUDA graph at the first step and replayed (archirf/step_graph.py's StepGraph;
            clip, AdamW and the EMAs after each replay, as the trainer runs them); graph_compiled captures the
            per-block compiled module (cuda_graph=on compile=on), graph_mat the same compiled in max-autotune-
            no-cudagraphs; CUDA only. Unlike the trainer's small captured step, model.kernels and
            model.attn_impl stay as given (auto: the fused ops run eagerly inside the graph; graph_ref still
            runs the Triton QK-norm and joint attention ops where the model has them; graph_plain is the
            trainer's small captured step)
  *_ref     the same with model.kernels=reference (no fused adaLN, norm or EDM2 ops; attention as given)
  graph_plain   graph with the config the trainer builds its eager captured step from (archirf/trainer.py's
            _plain_ops, for this one-rank step of --batch images): within SMALL_STEP_MACS, model.kernels=auto ->
            reference, model.attn_impl=auto -> sdpa where model.attn_backend allows, optim.fused_update ->
            false unless _fu; refused where it resolves nothing (a larger step: the trainer keeps the fused ops)
  *_tri     the same with model.kernels=triton (every fused op, inside compiled code too, where auto leaves
            the adaLN and EDM2 ops to inductor)
  *_fp8t, *_fp8r   the same with precision=fp8-tensorwise / fp8-rowwise (archirf/fp8.py's layers; "whole"
            converts the same layers before compiling), e.g. plain_fp8t
  *_fu      the same with optim.fused_update (clip scale + AdamW + EMA in one kernel: the trainer's default on
            CUDA for these models), e.g. plain_fp8t_fu; without it, torch's fused AdamW and one lerp per EMA
  *_cg, *_mat   the same compiled in inductor's mode reduce-overhead (CUDA graphs; the step starts with
            torch.compiler.cudagraph_mark_step_begin) or max-autotune-no-cudagraphs (Triton GEMM templates
            with fused epilogues), per block (fsdp, plain, graph) or whole; the suffix goes last, e.g. plain_fu_cg
  *_compiled  graph only: its blocks compiled in the default mode, e.g. graph_ref_compiled
Prints one JSON line per variant (ms per step, img/s, MFU at 6 x forward MACs, peak memory,
first-step seconds incl. compilation); peak_mem_gib is the peak of allocated memory over the timed steps, for
graph rows from the build on, the capture included (a replay allocates nothing: the activations are allocated
during the capture, in the graph's pool, which keeps them); --profile writes torch.profiler tables per variant.
--rounds R keeps every variant alive and times them in R interleaved rounds (median; each line lists its rounds' ms).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from archirf import fp8, parallel
from archirf.config import load_config
from archirf.ema import EMA
from archirf.metrics import peak_flops
from archirf.models import build_model
from archirf.objectives import build_objective
from archirf.optim import build_optimizer
from archirf.sample import autocast_model_fn
from archirf.step_graph import StepGraph
from archirf.trainer import _plain_ops


FP8_SUFFIXES = {"_fp8t": "fp8-tensorwise", "_fp8r": "fp8-rowwise"}
MODE_SUFFIXES = {"_cg": "reduce-overhead", "_mat": "max-autotune-no-cudagraphs", "_compiled": "default"}
KINDS = ("fsdp", "plain", "whole", "eager", "graph")


class Variant:
    """One variant's training step, built and warmed up (first step timed, with its compilation, and 3 more)."""

    def __init__(self, name, cfg, model, device, dtype, batch, graphs=False, capture=False):
        self.name, self.cfg, self.model, self.device, self.batch = name, cfg, model, device, batch
        self.capture = capture
        objective = build_objective(cfg)
        optimizer = build_optimizer(model, cfg.optim, device)
        ema = EMA(model, half_life_images=1e6)
        model_fn = autocast_model_fn(model, device, dtype, cache=not capture)     # (a capture keeps no cast weights)
        params = [p for p in model.parameters() if p.requires_grad]
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(batch, cfg.data.channels, cfg.data.resolution, cfg.data.resolution, device=device,
                        generator=gen)
        y = torch.randint(0, max(cfg.data.num_classes, 1), (batch,), device=device, generator=gen)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        fused = self.fused = cfg.optim.fused_update
        names = {p: parallel.clean_fqn(n) for n, p in model.named_parameters()}
        ema_map = {p: ema.shadow[names[p]] for p in params}
        seen = [0]
        self.fused_steps = self.steps = 0

        def loss_and_backward(x, y):
            loss = objective.loss(model_fn, x, y).mean()
            loss.backward()
            return loss

        # capture: GenerativeTask's cuda_graph path; the gradients are the graph's tensors, never unset
        forward_backward = StepGraph(loss_and_backward, params, list(model.buffers())) if capture else \
            loss_and_backward
        zero_grad = (lambda: None) if capture else (lambda: optimizer.zero_grad(set_to_none=True))

        def step():
            seen[0] += batch
            self.steps += 1
            if graphs:          # a new iteration: the CUDA graphs may reuse the last one's output memory
                torch.compiler.cudagraph_mark_step_begin()
            forward_backward(x, y)
            if fused:       # what GenerativeTask.clip / apply do under optim.fused_update
                scale = parallel.clip_coefficient(parallel.clip_grad_norm_(params, 0.0), 1.0)
                rate = ema.rate(seen[0], batch)
                if rate is not None and optimizer.fused_update(scale, [ema_map], [rate]):
                    zero_grad()
                    self.fused_steps += 1
                    return
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
            else:
                parallel.clip_grad_norm_(params, 1.0)
            optimizer.step()
            zero_grad()
            ema.update(model, seen[0], batch)

        self.step, self.ema = step, ema
        t0 = time.perf_counter()
        step()
        self.sync()
        self.first_s = time.perf_counter() - t0
        for _ in range(3):
            step()
        self.sync()

    def time(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return (time.perf_counter() - t0) / steps

    def result(self, sec: float, **extra) -> dict:
        if self.fused and self.fused_steps < self.steps - 1:    # (the first step creates the state: unfused)
            raise SystemExit(f"variant {self.name}: the fused update ran {self.fused_steps} of {self.steps} steps "
                             f"(AdamW.fused_update declined the rest); the row would time the unfused step")
        peak = peak_flops(self.device)
        flops = 6 * model_flops(self.cfg)
        out = {"variant": self.name, "ms": sec * 1e3, "img_per_s": self.batch / sec,
               "mfu": flops * self.batch / sec / peak if peak else None, "first_step_s": self.first_s, **extra}
        if self.fused:
            out["fused_steps"] = f"{self.fused_steps}/{self.steps}"
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}), flush=True)
        return out

    def profile(self, profile_dir) -> None:
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                self.step()
            self.sync()
        table = prof.key_averages()
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        (Path(profile_dir) / f"profile_{self.name}.txt").write_text(
            table.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40,
                        max_name_column_width=70)
            + table.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70))


def measure(variant: Variant, steps: int, profile_dir) -> dict:
    """One variant alone: `steps` timed steps after its warm-up, its own peak memory (a captured variant's from
    before its capture: its replays allocate nothing)."""
    cuda = variant.device.type == "cuda"
    if cuda and not variant.capture:
        torch.cuda.reset_peak_memory_stats()
    sec = variant.time(steps)
    out = variant.result(sec, peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    if profile_dir:
        variant.profile(profile_dir)
    return out


def measure_rounds(variants: list[Variant], steps: int, rounds: int) -> list[dict]:
    """Every variant kept alive and timed in `rounds` interleaved rounds of `steps` steps (each round starting
    one variant later, so no variant always runs first), the median per variant: differences of a few percent
    told apart from drift over the run. Memory: only the process's peak, all variants together
    (process_peak_gib); first_step_s of a variant built after another of the same code reuses its compilation."""
    times = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            times[v.name].append(v.time(steps))
    cuda = variants[0].device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return [v.result(statistics.median(times[v.name]), process_peak_gib=peak,
                     round_ms=[round(t * 1e3, 3) for t in times[v.name]]) for v in variants]


def model_flops(cfg) -> int:
    """Forward multiply-adds per image (a meta-device model: no memory, no init)."""
    with torch.device("meta"):
        return build_model(cfg).flops_per_image()


def parse_variant(name: str, base, device) -> tuple:
    """name -> (its config, kind, inductor mode or None):
    kind[_ref|_tri|_plain][_fp8t|_fp8r][_fu][_cg|_mat|_compiled]."""
    cfg = copy.deepcopy(base)
    core, mode = name, None
    for suffix, m in MODE_SUFFIXES.items():
        if core.endswith(suffix):
            core, mode = core.removesuffix(suffix), m
            break
    cfg.optim.fused_update = core.endswith("_fu")     # without _fu: torch's fused AdamW + lerps (the baseline)
    core = core.removesuffix("_fu")
    for suffix, precision in FP8_SUFFIXES.items():
        if core.endswith(suffix):
            core, cfg.precision = core.removesuffix(suffix), precision
            fp8.check(precision, cfg.model.name, device)
    kind, kernels = core, None
    for suffix, choice in (("_ref", "reference"), ("_tri", "triton"), ("_plain", "plain")):
        if core.endswith(suffix):
            kind, kernels = core.removesuffix(suffix), choice
    if kind not in KINDS:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(KINDS)}, then in this order _ref, "
                         f"_tri or _plain (graph only), _fp8t or _fp8r, _fu, _cg or _mat (_compiled: graph only) "
                         f"(e.g. plain_ref_fp8t_fu_cg)")
    if kernels == "plain":
        if kind != "graph" or mode:
            raise SystemExit(f"variant {name}: _plain is the trainer's eager captured step: graph_plain[_fu], "
                             f"uncompiled")
        cfg, resolved = _plain_ops(cfg, parallel.Env(device=device), step_graph=True, use_compile=False)
        if not resolved:
            raise SystemExit(f"variant {name}: the trainer resolves nothing here (a step above SMALL_STEP_MACS "
                             f"keeps the fused ops, and explicit choices stay): it would time {kind}"
                             f"{name.removeprefix(kind).removeprefix('_plain')}")
    elif kernels:
        if cfg.model.kernels is None:
            raise SystemExit(f"variant {name}: model.name={cfg.model.name} has no model.kernels to set to "
                             f"{kernels}; drop the {name.removeprefix(kind)[:4]} variants")
        cfg.model.kernels = kernels
    if mode and kind == "eager":
        raise SystemExit(f"variant {name}: eager compiles nothing; a mode suffix needs fsdp, plain, whole or graph")
    if name.endswith("_compiled") and kind != "graph":
        raise SystemExit(f"variant {name}: _compiled picks a compiled graph variant; {kind} sets its compilation "
                         f"by its kind (a mode suffix: _cg or _mat)")
    if mode in parallel.CUDAGRAPH_MODES and kind in ("fsdp", "graph"):
        raise SystemExit(f"variant {name}: " + ("CUDA graphs run on one rank without FSDP2 (the trainer's rule); use "
                                                "plain_cg or whole_cg" if kind == "fsdp" else
                                                "the captured step and compile_mode=reduce-overhead both replay CUDA "
                                                "graphs (the trainer refuses both at once); use graph_compiled"))
    if kind == "graph" and device.type != "cuda":
        raise SystemExit(f"variant {name}: the step's capture (cuda_graph) replays a CUDA graph, and this run is on "
                         f"{device.type}: run it on a GPU, or drop the graph variants")
    if mode and kind in ("fsdp", "plain", "graph"):
        cfg.compile_mode = mode          # the trainer's per-block compile takes it from the config
    return cfg, kind, mode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/dit_xl2_latent.yaml")
    ap.add_argument("--variants", default="fsdp,plain,whole,fsdp_ref")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--profile", default=None, help="write torch.profiler tables here")
    ap.add_argument("--rounds", type=int, default=1,
                    help="R > 1: build every variant first, keep them all alive, and time them in R interleaved "
                         "rounds of --steps steps (median); needs the memory of all of them at once")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1 (got {args.rounds})")
    if args.rounds > 1 and args.profile:
        raise SystemExit("--profile profiles one variant at a time: use it without --rounds")
    torch._dynamo.config.cache_size_limit = 64  # several wrappings of the same block code in one process
    base = load_config(args.config, [f"global_batch={args.batch}", f"micro_batch={args.batch}", *args.overrides])
    results = []
    with parallel.distributed(base) as env:
        device = env.device
        dtype = torch.bfloat16 if device.type == "cuda" and base.precision != "fp32" else None
        names = args.variants.split(",")
        if len(set(names)) != len(names):
            raise SystemExit(f"--variants names a variant twice: {args.variants}")
        plans = {name: parse_variant(name, base, device) for name in names}   # every name checked before a build
        kept = []
        for name in names:
            if args.rounds == 1:     # (kept variants keep their compiled code: no reset between them)
                torch._dynamo.reset()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()    # a graph row's peak counts its capture (measure)
            cfg, kind, mode = plans[name]
            if kind in ("fsdp", "plain", "graph"):
                cfg.parallel.shard_single_rank = kind == "fsdp"
                model, _ = parallel.build_training_model(cfg, env, param_dtype=dtype,
                                                         compile=kind != "graph" or mode is not None)
            elif kind in ("whole", "eager"):
                torch.manual_seed(cfg.seed)
                model = build_model(cfg).to(device)
                if fp8.recipe(cfg.precision):
                    fp8.convert(model.blocks, cfg.precision)
                if kind == "whole":
                    model = torch.compile(model, **({"mode": mode} if mode else {}))
            variant = Variant(name, cfg, model.train(), device, dtype, args.batch,
                              graphs=mode in parallel.CUDAGRAPH_MODES and device.type == "cuda",
                              capture=kind == "graph")
            if args.rounds == 1:
                results.append(measure(variant, args.steps, args.profile))
            else:
                kept.append(variant)
            del model, variant
        if kept:
            results = measure_rounds(kept, args.steps, args.rounds)
    print("SUMMARY " + json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
