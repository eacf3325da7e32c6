"""GPU aid: sweep the adaLN kernels' launch shapes at DiT shapes, bf16, per-sample modulation.

    python -m benchmarks.sweep_adaln_launch [--jobs 12] [--rounds 20] [--out FILE] [--kinds fused_bwd,...]

For each kernel kind (ada_fwd / ada_bwd: ada_layer_norm, fused_fwd / fused_bwd: the block-boundary
fusion gated_residual_ada_layer_norm, residual_fwd / residual_bwd: gated_residual) it times every
launch shape (split rows or one padded block, ROWS per tile, num_warps) at several tiles per program
(given as programs per SM), through the launchers in kernels/ada_norm.py, so a backward includes its
partial-sum kernel. Timing is the benchmark suite's (benchmarks/harness.py: CUDA events, L2 flushed,
launch queued behind a GPU sleep, median); GB/s from the suite's minimal byte counts
(bench_adaln.bytes_moved). Each shape's outputs are checked against the reference first.

Compiling a few hundred kernel variants dominates the run: --jobs worker processes compile them in
parallel first (filling Triton's on-disk cache), then one process times them. Set LAUNCH in
kernels/ada_norm.py from the best rows (the summary at the end).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import time

import torch
import triton
from archirf_kernels import ada_norm, reference

from .bench_adaln import bytes_moved
from .harness import SESSION, host_time

SHAPES = [(64, 256, 1152), (16, 1024, 1536)]
# (split rows, ROWS, num_warps, early loads, pipelining stages)
FUSED_FWD = [(0, 4, 8, 1, 1), (0, 4, 8, 1, 2), (0, 4, 8, 1, 3), (0, 8, 16, 1, 1), (0, 2, 8, 1, 1), (0, 2, 8, 1, 3),
             (1, 1, 2, 1, 1), (1, 1, 2, 1, 3), (0, 2, 4, 1, 1), (0, 2, 4, 1, 3), (0, 4, 4, 1, 1)]
FUSED_BWD = [(1, 1, 2, 1, 1), (1, 1, 2, 1, 2), (1, 1, 2, 1, 3), (1, 1, 4, 1, 1), (1, 1, 4, 1, 3), (1, 1, 4, 0, 1),
             (1, 1, 4, 0, 3), (1, 1, 8, 1, 3), (0, 4, 8, 1, 1), (0, 4, 8, 1, 2), (0, 2, 8, 1, 2), (0, 1, 4, 1, 3)]
ADA_FWD = [(1, 1, 2, 1, 1), (1, 1, 2, 1, 3), (0, 1, 4, 1, 1), (0, 1, 4, 1, 3), (0, 2, 8, 1, 1), (0, 2, 8, 1, 3),
           (1, 1, 4, 1, 1), (1, 1, 4, 1, 3), (0, 4, 8, 1, 1), (0, 2, 4, 1, 1)]
ADA_BWD = [(1, 1, 2, 1, 1), (1, 1, 2, 1, 2), (1, 1, 2, 1, 3), (1, 1, 4, 1, 1), (1, 1, 4, 1, 3), (0, 1, 4, 1, 1),
           (0, 1, 4, 1, 3), (0, 4, 8, 1, 1), (0, 4, 8, 1, 2), (1, 1, 8, 1, 3)]
RESIDUAL_FWD = [(1, 4, 4, 1, 1), (1, 4, 4, 1, 3), (1, 2, 4, 1, 1), (1, 2, 4, 1, 3), (1, 1, 4, 1, 1), (1, 1, 4, 1, 3),
                (1, 8, 8, 1, 1), (1, 4, 8, 1, 1), (1, 4, 8, 1, 3)]
RESIDUAL_BWD = [(1, 2, 4, 1, 1), (1, 2, 4, 1, 3), (1, 4, 4, 1, 1), (1, 4, 4, 1, 3), (1, 1, 4, 1, 1), (1, 1, 4, 1, 3),
                (1, 2, 8, 1, 1), (1, 2, 8, 1, 3), (1, 4, 8, 1, 3)]
FWD_WAVES, BWD_WAVES = [1, 2, 4, 8, 0], [0.5, 1, 2]
KINDS = {  # kind: (op, pass, configs, waves of resident programs; 0 = one tile per program)
    "fused_fwd": ("gated_residual_ada_layer_norm", "fwd", FUSED_FWD, FWD_WAVES),
    "fused_bwd": ("gated_residual_ada_layer_norm", "bwd", FUSED_BWD, BWD_WAVES),
    "ada_fwd": ("ada_layer_norm", "fwd", ADA_FWD, FWD_WAVES),
    "ada_bwd": ("ada_layer_norm", "bwd", ADA_BWD, BWD_WAVES),
    "residual_fwd": ("gated_residual", "fwd", RESIDUAL_FWD, FWD_WAVES),
    "residual_bwd": ("gated_residual", "bwd", RESIDUAL_BWD, BWD_WAVES),
}
DT = torch.bfloat16


def _pick(outs, indices):
    return [outs[i] for i in indices]


class Problem:
    """Inputs of one (B, N, C), the forward outputs the backwards need, and each kind's call."""

    def __init__(self, shape):
        B, N, C = self.shape = shape
        g = torch.Generator(device="cuda").manual_seed(0)
        x, y, dh, dxn = (torch.randn(B, N, C, device="cuda", dtype=DT, generator=g) for _ in range(4))
        mod = torch.randn(B, 1, 6 * C, device="cuda", dtype=DT, generator=g).chunk(6, dim=-1)  # DiT's layout
        gate, shift, scale = mod[0], mod[1], mod[2]
        self.args = x, y, dh, dxn, gate, shift, scale
        x_new, _, mean, rstd = ada_norm._ada_norm_forward(x, y, gate, shift, scale, None, None, 1e-6, "layer")
        _, _, mean1, rstd1 = ada_norm._ada_norm_forward(x, None, None, shift, scale, None, None, 1e-6, "layer")
        self.calls = {
            "fused_fwd": lambda: ada_norm._ada_norm_forward(x, y, gate, shift, scale, None, None, 1e-6, "layer")[:2],
            "fused_bwd": lambda: ada_norm._ada_norm_backward(dxn, dh, x_new, y, gate, scale, None, None, mean, rstd,
                                                             "layer", DT)[:5],
            "ada_fwd": lambda: ada_norm._ada_norm_forward(x, None, None, shift, scale, None, None, 1e-6, "layer")[1:2],
            "ada_bwd": lambda: _pick(ada_norm._ada_norm_backward(None, dh, x, None, None, scale, None, None, mean1,
                                                                 rstd1, "layer", DT), (0, 3, 4)),
            "residual_fwd": lambda: (ada_norm._gated_residual_forward(x, y, gate),),
            "residual_bwd": lambda: ada_norm._gated_residual_backward(dxn, y, gate),
        }

    def expected(self, kind):
        """The reference's outputs (forward) or gradients (backward) of this kind, fp32 math."""
        x, y, dh, dxn, gate, shift, scale = self.args
        op, pass_ = KINDS[kind][:2]
        if op == "gated_residual_ada_layer_norm":
            leaves = [t.detach().clone().requires_grad_() for t in (x, y, gate, shift, scale)]
            outs = reference.gated_residual_ada_layer_norm(*leaves)
            if pass_ == "fwd":
                return outs
            # the kernel's backward sees x_new as stored: so does the reference's autograd (same rounding)
            return torch.autograd.grad(outs, leaves, (dxn, dh))
        if op == "ada_layer_norm":
            leaves = [t.detach().clone().requires_grad_() for t in (x, shift, scale)]
            out = reference.ada_layer_norm(*leaves)
            return (out,) if pass_ == "fwd" else torch.autograd.grad(out, leaves, dh)
        leaves = [t.detach().clone().requires_grad_() for t in (x, y, gate)]
        out = reference.gated_residual(*leaves)
        return (out,) if pass_ == "fwd" else torch.autograd.grad(out, leaves, dxn)[1:]

    def bytes(self, kind):
        op, pass_ = KINDS[kind][:2]
        return bytes_moved(op, pass_, self.shape, DT, DT)


def jobs(kinds):
    """Every (kind, shape, (split, ROWS, num_warps, early, stages), waves) to time."""
    return [(kind, shape, cfg, waves) for kind in kinds
            for shape, cfg, waves in itertools.product(SHAPES, KINDS[kind][2], KINDS[kind][3])]


_DEFAULT_LAUNCH = ada_norm._launch_config
_PLAN = ada_norm._plan
PLAN = []


def _plan(*args, **kwargs):
    PLAN.append(out := _PLAN(*args, **kwargs))
    return out


ada_norm._plan = _plan
_RESIDENT_PROGRAMS = ada_norm._resident_programs
LAST = {}


def _resident_programs(*args, **kwargs):
    LAST["resident"] = n = _RESIDENT_PROGRAMS(*args, **kwargs)
    return n


ada_norm._resident_programs = _resident_programs


def configure(kind, cfg, waves):
    """Launch `kind` with this shape; every other kind as the defaults."""
    split, rows, warps, early, stages = cfg

    def launch_config(k, B, N, C, device):
        if k != kind:
            return _DEFAULT_LAUNCH(k, B, N, C, device)
        return ada_norm.Launch(bool(split), rows, warps, stages, waves=waves)

    ada_norm._launch_config = launch_config
    ada_norm.EARLY_LOADS = bool(early)
    LAST.clear()


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def flush_check(prob, rounds=30):
    """How the L2 flush before each round affects small kernels: the suite's flush (zeroing 256 MB)
    leaves up to an L2 of dirty lines that the timed kernel then writes back; reading the buffer after
    zeroing leaves L2 clean. Default launch shapes, and plain copies of the same traffic."""
    ada_norm._launch_config, ada_norm.EARLY_LOADS = _DEFAULT_LAUNCH, True
    buf = SESSION.flush_buffer
    flushes = {"zero (suite)": buf.zero_, "zero+read": lambda: (buf.zero_(), buf.sum()), "read": buf.sum}
    x = prob.args[0]
    x2 = torch.cat([x, prob.args[1]])
    cases = [("fused_fwd", prob.calls["fused_fwd"], prob.bytes("fused_fwd")),
             ("ada_fwd", prob.calls["ada_fwd"], prob.bytes("ada_fwd")),
             ("fused_bwd", prob.calls["fused_bwd"], prob.bytes("fused_bwd")),
             ("copy 2x37.7MB", lambda: torch.empty_like(x).copy_(x), 2 * x.nbytes),
             ("copy 2x75.5MB", lambda: torch.empty_like(x2).copy_(x2), 2 * x2.nbytes)]
    out = ["", (f"L2 flush check, {'x'.join(map(str, prob.shape))}, default launch shapes "
                "(us, and % of the suite's copy bandwidth):")]
    for name, fn, nbytes in cases:
        host_s = host_time(fn)
        cycles = int(min(1.5 * host_s + 50e-6, 0.05) * SESSION.cycles_per_s)
        cols = []
        for label, flush in flushes.items():
            times = []
            for i in range(rounds + 3):
                flush()
                torch.cuda._sleep(cycles)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end) * 1e3)
            us = statistics.median(times)
            cols.append(f"{label} {us:6.1f} us {nbytes / us / 1e3 / SESSION.copy_gbps:6.1%}")
        out.append(f"  {name:<14} " + " | ".join(cols))
    return out


def worker(index, count, kinds):
    """Compile (and run once) every index-th job: fills Triton's cache for the timing process."""
    problems = {shape: Problem(shape) for shape in SHAPES}
    for i, (kind, shape, cfg, waves) in enumerate(jobs(kinds)):
        if i % count != index:
            continue
        configure(kind, cfg, waves)
        problems[shape].calls[kind]()
    torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=12, help="parallel compile processes (0: compile while timing)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--out", help="also write the full table here (line by line)")
    p.add_argument("--compile-only", action="store_true", help="only the parallel compile (fill the cache)")
    p.add_argument("--defaults", action="store_true", help="also time every kind with the launch defaults (LAUNCH)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    kinds = args.kinds.split(",")
    if args.worker:
        index, count = map(int, args.worker.split("/"))
        worker(index, count, kinds)
        return

    t0 = time.time()
    if args.jobs:
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.sweep_adaln_launch", "--kinds", args.kinds,
                                   "--worker", f"{i}/{args.jobs}"]) for i in range(args.jobs)]
        codes = [proc.wait() for proc in procs]
        print(f"compiled in {time.time() - t0:.0f} s (worker exit codes {codes})", flush=True)
    if args.compile_only:
        return

    SESSION.start(torch.device("cuda"))
    name = torch.cuda.get_device_name()
    lines = [(f"{name}, torch {torch.__version__}, triton {triton.__version__}; copy bandwidth "
              f"{SESSION.copy_gbps:.0f} GB/s; bf16, per-sample modulation; median of {args.rounds} rounds "
              "(CUDA events, L2 flushed)"), ""]
    lines.append(f"{'kind':<13} {'shape':<15} {'split':>5} {'rows':>4} {'warps':>5} {'early':>5} {'stages':>6} "
                 f"{'waves':>5} {'resident/SM':>11} {'tiles':>5} {'programs':>8} | "
                 f"{'us':>7} {'GB/s':>6} {'%copy':>6}  check")
    out = open(args.out, "w", buffering=1) if args.out else None
    if out:
        out.write("\n".join(lines) + "\n")
    results = {}
    problems = {shape: Problem(shape) for shape in SHAPES}
    checked = set()
    for kind, shape, cfg, waves in jobs(kinds):
        split, rows, warps, early, stages = cfg
        prob = problems[shape]
        configure(kind, cfg, waves)
        check = ""
        if (kind, shape, cfg) not in checked:  # outputs vs the reference, once per compiled variant
            checked.add((kind, shape, cfg))
            errs = [rel_err(g, w) for g, w in zip(prob.calls[kind](), prob.expected(kind))]
            check = f"max rel err {max(errs):.1e}" + ("  ** WRONG **" if max(errs) > 2e-2 else "")
        ms = statistics.median(SESSION.gpu_times(prob.calls[kind], rounds=args.rounds, warmup=2)) * 1e3
        gbps = prob.bytes(kind) / ms / 1e6
        num_row_blocks, tiles, _ = PLAN[-1]
        programs, resident = shape[0] * num_row_blocks, LAST.get("resident", 0)
        results.setdefault((kind, shape), []).append((ms, cfg, waves, resident, tiles, programs))
        lines.append(f"{kind:<13} {'x'.join(map(str, shape)):<15} {split:>5d} {rows:>4} {warps:>5} {early:>5d} "
                     f"{stages:>6} {waves:>5} {resident:>11} {tiles:>5} {programs:>8} | {ms * 1e3:7.1f} {gbps:6.0f} "
                     f"{gbps / SESSION.copy_gbps:6.1%}  {check}")
        if out:
            out.write(lines[-1] + "\n")

    summary = []
    if args.defaults:
        summary += ["", "launch defaults (LAUNCH in kernels/ada_norm.py):"]
        for kind, shape in itertools.product(KINDS, SHAPES):
            ada_norm._launch_config, ada_norm.EARLY_LOADS = _DEFAULT_LAUNCH, True
            LAST.clear()
            prob = problems[shape]
            errs = [rel_err(g, w) for g, w in zip(prob.calls[kind](), prob.expected(kind))]
            ms = statistics.median(SESSION.gpu_times(prob.calls[kind], rounds=args.rounds, warmup=2)) * 1e3
            gbps = prob.bytes(kind) / ms / 1e6
            launch = _DEFAULT_LAUNCH(kind, *shape, torch.device("cuda"))
            num_row_blocks, tiles, _ = PLAN[-1]
            summary.append(f"  {kind:<13} {'x'.join(map(str, shape)):<15} {launch} resident={LAST.get('resident', 0)} "
                           f"tiles={tiles} programs={shape[0] * num_row_blocks}: {ms * 1e3:6.1f} us {gbps:5.0f} GB/s "
                           f"{gbps / SESSION.copy_gbps:6.1%}  max rel err {max(errs):.1e}")
    summary += ["", "best three per kind and shape:"]
    for (kind, shape), rows_ in results.items():
        rows_.sort()
        nbytes = problems[shape].bytes(kind)
        for ms, (split, rows, warps, early, stages), waves, resident, tiles, programs in rows_[:3]:
            gbps = nbytes / ms / 1e6
            summary.append(f"  {kind:<13} {'x'.join(map(str, shape)):<15} split={split:d} rows={rows} warps={warps} "
                           f"early={early:d} stages={stages} waves={waves} resident={resident} "
                           f"tiles={tiles:<3} programs={programs:<5} {ms * 1e3:6.1f} us {gbps:5.0f} GB/s "
                           f"{gbps / SESSION.copy_gbps:6.1%}")
    summary += flush_check(problems[SHAPES[0]])
    summary.append(f"total {time.time() - t0:.0f} s")
    print("\n".join(summary))
    if out:
        out.write("\n".join(summary) + "\n")
        out.close()


if __name__ == "__main__":
    main()
