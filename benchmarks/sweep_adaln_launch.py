"""GPU aid: sweep the adaLN kernels' launch heuristics at DiT shapes, bf16.

    python benchmarks/sweep_adaln_launch.py

For each (programs per SM, num_warps) it times the fused block-boundary op's forward and backward
kernels (backward includes the torch.sum of the partial rows) with triton.testing.do_bench (median)
and prints GB/s from the minimal byte counts: forward reads x, y and writes x_new, h (8 B/element in
bf16); backward reads dx_new, dh, x_new, y and writes dx, dy (12 B/element). Also ada_layer_norm
(4 / 6 B/element) and, for context, torch.compile of the reference (fwd, fwd+bwd). Per-sample
(B, C) modulation, as DiT. Set FWD_PROGRAMS_PER_SM / BWD_PROGRAMS_PER_SM / _num_warps in
kernels/ada_norm.py from the best rows.
"""

import torch
import triton.testing

from archirf_kernels import ada_norm, reference

SHAPES = [(64, 256, 1152), (16, 1024, 1536)]
PROGRAMS_PER_SM = [1, 2, 4, 8, 16, 64]
NUM_WARPS = [4, 8, 16]


def gbps(nbytes, ms):
    return nbytes / ms / 1e6


def main():
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    default_warps = ada_norm._num_warps
    for B, N, C in SHAPES:
        dt = torch.bfloat16
        x, y, dh, dxn = (torch.randn(B, N, C, device="cuda", dtype=dt) for _ in range(4))
        mod = torch.randn(B, 1, 6 * C, device="cuda", dtype=dt).chunk(6, dim=-1)
        gate, shift, scale = mod[0], mod[1], mod[2]
        elems = B * N * C
        print(f"\n(B, N, C) = ({B}, {N}, {C}) bf16, per-sample modulation; "
              f"default warps {default_warps(triton.next_power_of_2(C))}")
        print(f"{'prog/SM':>7} {'warps':>5} {'rows':>8} | {'fused fwd':>15} {'fused bwd':>15} | "
              f"{'adaLN fwd':>15} {'adaLN bwd':>15}")
        for pps in PROGRAMS_PER_SM:
            for warps in NUM_WARPS:
                ada_norm.FWD_PROGRAMS_PER_SM = ada_norm.BWD_PROGRAMS_PER_SM = pps
                ada_norm._num_warps = lambda block_c, w=warps: w
                x_new, _, mean, rstd = ada_norm._ada_norm_forward(x, y, gate, shift, scale, None, None, 1e-6, "layer")
                _, _, mean1, rstd1 = ada_norm._ada_norm_forward(x, None, None, shift, scale, None, None, 1e-6, "layer")
                cols = []
                for fn, nbytes in [
                    (lambda: ada_norm._ada_norm_forward(x, y, gate, shift, scale, None, None, 1e-6, "layer"), 8),
                    (lambda: ada_norm._ada_norm_backward(dxn, dh, x_new, y, gate, scale, None, None, mean, rstd,
                                                         "layer", dt), 12),
                    (lambda: ada_norm._ada_norm_forward(x, None, None, shift, scale, None, None, 1e-6, "layer"), 4),
                    (lambda: ada_norm._ada_norm_backward(None, dh, x, None, None, scale, None, None, mean1, rstd1,
                                                         "layer", dt), 6),
                ]:
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100)
                    cols.append(f"{ms * 1e3:6.1f}us {gbps(nbytes * elems, ms):5.0f}GB/s")
                rows = ada_norm._rows_per_program(B, N, x.device, pps)
                print(f"{pps:>7} {warps:>5} {rows:>8} | " + " ".join(cols))
        ada_norm._num_warps = default_warps

        # context: torch.compile of the reference, same inputs
        def ref_fused(x, y, gate, shift, scale):
            return reference.gated_residual_ada_layer_norm(x, y, gate, shift, scale)
        compiled = torch.compile(ref_fused)
        leaves = [t.detach().clone().requires_grad_() for t in (x, y, gate, shift, scale)]
        ms_f = triton.testing.do_bench(lambda: compiled(*leaves), warmup=25, rep=100)

        def fwd_bwd():
            a, b = compiled(*leaves)
            torch.autograd.backward((a, b), (dxn, dh))
        ms_fb = triton.testing.do_bench(fwd_bwd, warmup=25, rep=100, grad_to_none=leaves)
        print(f"compiled reference fused op: fwd {ms_f * 1e3:.1f}us ({gbps(8 * elems, ms_f):.0f} GB/s at 8 B/el), "
              f"fwd+bwd {ms_fb * 1e3:.1f}us")


if __name__ == "__main__":
    main()
