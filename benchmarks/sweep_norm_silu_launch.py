"""GPU aid: sweep the GroupNorm + SiLU kernels' launch shapes at the autoencoder's shapes, bf16.

    python -m benchmarks.sweep_norm_silu_launch [--rounds 30] [--budget-s 300] [--shapes 64x128x64x64,...]

For each shape and memory format it times the forward (x -> y, statistics included) and the backward
(s, dy -> dx, dweight, dbias) through the launchers of kernels/norm_silu.py, under every launch plan
listed: fused (whole groups per program: groups per program x num_warps) where the groups fit, and
split (tile elements x num_warps x reduction programs per SM), looped (channels per program x tile x
num_warps); and the channel RMSNorm + SiLU's tile and backward programs per SM. Timing is the benchmark suite's
(benchmarks/harness.py: CUDA events, L2 flushed, launch queued behind a GPU sleep, median); GB/s from
bench_norm_silu's minimal bytes (fwd 2T, bwd 3T), also as a fraction of the measured copy bandwidth.
Every plan's outputs are checked against the fp32 reference first. Set the constants at the top of
kernels/norm_silu.py from the best rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import triton
from archirf_kernels import norm_silu, reference

from .harness import SESSION

SHAPES = [(8, 128, 256, 256), (8, 256, 128, 128), (8, 512, 64, 64), (8, 512, 32, 32),
          (64, 128, 64, 64), (64, 256, 32, 32), (64, 512, 16, 16), (1, 128, 256, 256)]
GROUPS = 32
FUSED = [(1, 8), (1, 16), (2, 8), (2, 16), (4, 16)]                  # (groups per program, num_warps)
SPLIT = [(4096, 4, 4), (4096, 8, 4), (8192, 8, 4), (4096, 4, 2), (4096, 4, 8), (2048, 4, 4)]  # (tile, warps, waves)
LOOPED = [(16, 2048, 4), (16, 4096, 4), (16, 4096, 8), (32, 4096, 4), (32, 4096, 8), (32, 8192, 8),
          (64, 4096, 8), (64, 8192, 8), (8, 2048, 4)]                 # (channels per program, tile, warps)
RMS = [(4096, 0), (4096, 4), (4096, 8), (4096, 16), (8192, 8), (2048, 8), (2048, 16), (16384, 4)]  # (tile, bwd programs/SM; 0: one tile each)
FUSED_MAX = 32768                                                     # larger fused tiles are not tried


def plans(B, C, S, cl, sms):
    cg = C // GROUPS
    for gpp, warps in FUSED:
        block_s, block_c = triton.next_power_of_2(S), triton.next_power_of_2(gpp * cg)
        if gpp <= GROUPS and block_s * block_c <= FUSED_MAX:
            yield f"fused g{gpp} w{warps:<2}", norm_silu.GroupPlan(True, gpp, block_s, block_c, 1, warps)
    seen = set()
    for chans, tile, warps in LOOPED:
        gpp = min(max(chans // cg, 1), GROUPS)
        block_c = triton.next_power_of_2(gpp * cg)
        block_s = max(1, min(tile // block_c, triton.next_power_of_2(S)))
        if (gpp, block_s, warps) in seen:       # e.g. 8 and 16 channels asked, whole groups of 16 given
            continue
        seen.add((gpp, block_s, warps))
        yield (f"looped c{gpp * cg} t{tile} w{warps}",
               norm_silu.GroupPlan(False, gpp, block_s, block_c, 1, warps, True))
    for tile, warps, waves in SPLIT:
        if cl:
            block_c = min(triton.next_power_of_2(C), tile)
            block_s = max(1, min(tile // block_c, triton.next_power_of_2(S)))
        else:
            block_s = min(triton.next_power_of_2(S), tile // 4)
            block_c = max(1, min(triton.next_power_of_2(C), tile // block_s))
        s_tiles = triton.cdiv(S, block_s)
        chunks = min(max(triton.cdiv(waves * sms, B * triton.cdiv(C, block_c)), 1), s_tiles)
        yield (f"split t{tile} w{warps} x{waves}",
               norm_silu.GroupPlan(False, 1, block_s, block_c, triton.cdiv(s_tiles, chunks), warps))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sweep_rms(shapes, rounds, dev):
    """The channel RMSNorm + SiLU: tile elements per program, and the backward's programs per SM (each
    looping over tiles; 0: one tile per program)."""
    default_grid, default_per_sm = norm_silu._rms_grid, norm_silu.RMS_BWD_PROGRAMS_PER_SM
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for shape in shapes:
        for cl in (True, False):
            B, C, H, W = shape
            g = torch.Generator(device=dev).manual_seed(0)
            fmt = torch.channels_last if cl else torch.contiguous_format
            x = (0.3 + 2 * torch.randn(shape, device=dev, generator=g)).to(torch.bfloat16).contiguous(memory_format=fmt)
            dy = torch.randn(shape, device=dev, generator=g).to(torch.bfloat16).contiguous(memory_format=fmt)
            w = (1 + 0.2 * torch.randn(C, device=dev, generator=g)).to(torch.bfloat16)
            xr, wr = (t.float().detach().requires_grad_() for t in (x, w))
            y_ref = reference.channel_rms_norm_silu(xr, wr)
            dx_ref, dw_ref = torch.autograd.grad(y_ref, [xr, wr], dy.float())
            T = x.nbytes
            print(f"\n## rms {'x'.join(map(str, shape))} {'channels_last' if cl else 'nchw'}", flush=True)
            for tile, per_sm in RMS:
                block_c = triton.next_power_of_2(C)
                block_s = max(1, min(tile // block_c, triton.next_power_of_2(H * W)))
                grid = (block_s, block_c, triton.cdiv(H * W, block_s), min(max(block_s * block_c // 512, 1), 8))
                norm_silu._rms_grid = lambda *a, grid=grid: grid
                norm_silu.RMS_BWD_PROGRAMS_PER_SM = per_sm if per_sm else 1 << 20
                try:
                    y = norm_silu._rms_forward(x, w, 1e-6)
                    dx, dw = norm_silu._rms_backward(dy, x, w, 1e-6)
                    errs = rel_err(y, y_ref), rel_err(dx, dx_ref), rel_err(dw, dw_ref)
                    t_f = statistics.median(SESSION.gpu_times(lambda: norm_silu._rms_forward(x, w, 1e-6),
                                                              rounds=rounds)) * 1e6
                    t_b = statistics.median(SESSION.gpu_times(lambda: norm_silu._rms_backward(dy, x, w, 1e-6),
                                                              rounds=rounds)) * 1e6
                finally:
                    norm_silu._rms_grid, norm_silu.RMS_BWD_PROGRAMS_PER_SM = default_grid, default_per_sm
                cf, cb = 2 * T / t_f / 1e3 / SESSION.copy_gbps, 3 * T / t_b / 1e3 / SESSION.copy_gbps
                flag = "" if max(errs) < 2e-2 else f"  WRONG (rel err {errs})"
                print(f"rms t{tile:<6} bwd x{per_sm:<3} fwd {t_f:8.1f} us {cf:6.1%}   bwd {t_b:8.1f} us {cb:6.1%}   "
                      f"fwd+bwd {t_f + t_b:8.1f} us{flag}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--budget-s", type=float, default=300)
    p.add_argument("--shapes", default="")
    p.add_argument("--rms-shapes", default="64x128x64x64,64x256x32x32,64x512x16x16",
                   help="channel RMSNorm shapes to sweep first ('' for none)")
    args = p.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    dev = torch.device("cuda")
    SESSION.start(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"# {SESSION.env['gpu']}, copy {SESSION.copy_gbps:.0f} GB/s, torch {torch.__version__}, triton "
          f"{triton.__version__}; bf16, GroupNorm({GROUPS}) + SiLU with fp32 weight and bias; median of "
          f"{args.rounds} rounds; GB/s on fwd 2T, bwd 3T", flush=True)
    if args.rms_shapes:
        sweep_rms([tuple(map(int, s.split("x"))) for s in args.rms_shapes.split(",")], args.rounds, dev)
    default_plan = norm_silu._group_plan
    start = time.monotonic()
    for shape in shapes:
        for cl in (True, False):
            if time.monotonic() - start > args.budget_s:
                print("# budget spent", flush=True)
                return
            B, C, H, W = shape
            g = torch.Generator(device=dev).manual_seed(0)
            fmt = torch.channels_last if cl else torch.contiguous_format
            x = (0.3 + 2 * torch.randn(shape, device=dev, generator=g)).to(torch.bfloat16).contiguous(memory_format=fmt)
            dy = torch.randn(shape, device=dev, generator=g).to(torch.bfloat16).contiguous(memory_format=fmt)
            w = 1 + 0.2 * torch.randn(C, device=dev, generator=g)
            b = 0.2 * torch.randn(C, device=dev, generator=g)
            xr, wr, br = (t.float().detach().requires_grad_() for t in (x, w, b))
            y_ref = reference.group_norm_silu(xr, wr, br, GROUPS)
            dx_ref, = torch.autograd.grad(y_ref, [xr], dy.float())
            T = x.nbytes
            chosen = default_plan(B, C, H * W, GROUPS, cl, dev, backward=False)
            chosen_b = default_plan(B, C, H * W, GROUPS, cl, dev, backward=True)
            print(f"\n## {'x'.join(map(str, shape))} {'channels_last' if cl else 'nchw'} "
                  f"(default fwd: {chosen}; bwd: {chosen_b})", flush=True)
            for label, plan in plans(B, C, H * W, cl, sms):
                norm_silu._group_plan = lambda *a, plan=plan, **k: plan
                try:
                    _, y, mean, rstd = norm_silu._gn_forward(x, None, w, b, GROUPS, 1e-6)
                    dx, _, _ = norm_silu._gn_backward(dy, None, x, w, b, mean, rstd, GROUPS, x.dtype)
                    errs = rel_err(y, y_ref), rel_err(dx, dx_ref)
                    t_f = statistics.median(SESSION.gpu_times(
                        lambda: norm_silu._gn_forward(x, None, w, b, GROUPS, 1e-6), rounds=args.rounds)) * 1e6
                    t_b = statistics.median(SESSION.gpu_times(
                        lambda: norm_silu._gn_backward(dy, None, x, w, b, mean, rstd, GROUPS, x.dtype),
                        rounds=args.rounds)) * 1e6
                finally:
                    norm_silu._group_plan = default_plan
                cf, cb = 2 * T / t_f / 1e3 / SESSION.copy_gbps, 3 * T / t_b / 1e3 / SESSION.copy_gbps
                flag = "" if max(errs) < 2e-2 else f"  WRONG (rel err {errs[0]:.1e}, {errs[1]:.1e})"
                print(f"{label:24s} fwd {t_f:8.1f} us {cf:6.1%}   bwd {t_b:8.1f} us {cb:6.1%}   "
                      f"fwd+bwd {t_f + t_b:8.1f} us{flag}", flush=True)


if __name__ == "__main__":
    main()
