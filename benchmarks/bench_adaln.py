"""adaLN: `ada_layer_norm`, `gated_residual` and their block-boundary fusion
`gated_residual_ada_layer_norm`; fwd, bwd and fwd+bwd, per-sample (B, C) modulation.

Baselines, same process and inputs: the eager reference (`archirf_kernels.reference`, the spec),
`torch.compile(reference)` (default mode; also max-autotune-no-cudagraphs on the headline case),
and Liger-Kernel / apex layer norm followed by the eager modulation (and, for the fusion, the eager
gated residual before it) where installed; neither has an equivalent of `gated_residual` alone.

"fwd" is the training forward (inputs require grad, so it also saves what the backward needs);
"bwd" times `torch.autograd.grad(out, inputs, grad_out)`, each round on a fresh graph whose forward
ran untimed before it (not one graph with retain_graph=True: torch.compile's backward donates its
saved buffers and refuses retain_graph, and a fresh graph is what training runs); "fwd+bwd" times
both. Every implementation's first fwd+bwd (compile, JIT, autotune) is made before
timing, reported as first_call_s, and checked against the eager reference (a sanity check against
timing a wrong kernel; the numerics tests live in tests/).

Bytes that must move (T = B·N·C activation elements, M = B·C per modulation tensor, S = 8 bytes per
row for the fp32 mean and rstd the backward reads), weighted by each tensor's element size:

  ada_layer_norm                 fwd: x, h; shift, scale; S                                        2T + 2M + S
                                 bwd: dh, x, dx; scale, dshift, dscale; S                          3T + 3M + S
  gated_residual                 fwd: x, y, out; gate                                              3T + M
                                 bwd: dout, y, dy; gate, dgate (dx is dout itself)                 3T + 2M
  gated_residual_ada_layer_norm  fwd: x, y, x_new, h; gate, shift, scale; S                        4T + 3M + S
                                 bwd: dh, dx_new, x_new, y, dx, dy; gate, scale, dgate, dshift,    6T + 5M + S
                                      dscale; S
  fwd+bwd = fwd + bwd.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import archirf_kernels
from archirf_kernels import reference

from .harness import SMOKE, as_tuple, fwd_bwd_once, note_baseline, pass_target, rel_err

pytestmark = pytest.mark.cuda

SUITE = "adaln"
bf16, fp32 = torch.bfloat16, torch.float32
CASES = {  # name: ((B, N, C), activation dtype, modulation dtype)
    "dit-bf16": ((64, 256, 1152), bf16, bf16),  # DiT-XL/2 at 256² (32×32 latents, patch 2), batch 64
    "mmdit-bf16": ((16, 1024, 1536), bf16, bf16),  # MMDiT-like: 1024 tokens, width 1536
    "dit-bf16-fp32mod": ((64, 256, 1152), bf16, fp32),  # bf16 activations, fp32 modulation
}
SMOKE_SHAPE = (2, 16, 96)  # ARCHIRF_BENCH_SMOKE=1: every case at this shape
OPS = ("ada_layer_norm", "gated_residual_ada_layer_norm", "gated_residual")
PASSES = ("fwd", "bwd", "fwd_bwd")
IMPLS = ("ours", "compiled", "eager", "liger", "apex")
# max-autotune-no-cudagraphs costs an autotuned compile: by default only on the target case.
MAX_AUTOTUNE = os.environ.get("ARCHIRF_BENCH_MAX_AUTOTUNE", "headline")  # headline | all | off
HEADLINE = {("gated_residual_ada_layer_norm", "dit-bf16")}
ARGS = {  # positional tensor arguments of each op, in the API's order
    "ada_layer_norm": ("x", "shift", "scale"),
    "gated_residual": ("x", "y", "gate"),
    "gated_residual_ada_layer_norm": ("x", "y", "gate", "shift", "scale"),
}
STATS_BYTES = 8  # fp32 mean + rstd per row (LayerNorm)


def targets(op: str, pass_: str) -> list[dict]:
    """The issue's targets (ANCHORS.md), attached to ours' rows; benchmarks/record.py checks them."""
    out = []
    if pass_ == "fwd":
        out.append({"metric": "copy_bw_fraction", "min": 0.85, "label": "≥ 85% of copy BW"})
    if pass_ == "fwd_bwd" and op != "gated_residual":
        out.append({"metric": "vs_compiled_best", "min": 1.3, "label": "≥ 1.3× compiled"})
    return out


def bytes_moved(op: str, pass_: str, shape, dtype: torch.dtype, mod_dtype: torch.dtype) -> int:
    """Minimal HBM traffic of one call (see the module docstring)."""
    b, n, c = shape
    T = b * n * c * dtype.itemsize
    M = b * c * mod_dtype.itemsize
    S = b * n * STATS_BYTES
    fwd = {
        "ada_layer_norm": 2 * T + 2 * M + S,
        "gated_residual": 3 * T + M,
        "gated_residual_ada_layer_norm": 4 * T + 3 * M + S,
    }
    bwd = {
        "ada_layer_norm": 3 * T + 3 * M + S,
        "gated_residual": 3 * T + 2 * M,
        "gated_residual_ada_layer_norm": 6 * T + 5 * M + S,
    }
    return {"fwd": fwd[op], "bwd": bwd[op], "fwd_bwd": fwd[op] + bwd[op]}[pass_]


def _params():
    for case in CASES:
        for op in OPS:
            for pass_ in PASSES:
                impls = list(IMPLS)
                if MAX_AUTOTUNE == "all" or (MAX_AUTOTUNE == "headline" and (op, case) in HEADLINE):
                    impls.insert(2, "compiled-max-autotune")
                for impl in impls:
                    yield pytest.param(case, op, pass_, impl, id=f"{case}-{op}-{pass_.replace('_', '')}-{impl}")


# -- implementations ------------------------------------------------------------------------------

_COMPILED: dict[tuple[str, str], object] = {}  # (op, mode) -> compiled reference, reused across cases
_FIRST_CALL: dict[tuple[str, str, str], float] = {}  # (op, impl, case) -> seconds of the first fwd+bwd


def _compiled(op: str, mode: str | None):
    if (op, mode) not in _COMPILED:
        cfg = torch._dynamo.config  # one static specialisation per (shape, dtype) case: allow them all
        if hasattr(cfg, "recompile_limit"):
            cfg.recompile_limit = max(cfg.recompile_limit, 64)
        else:
            cfg.cache_size_limit = max(cfg.cache_size_limit, 64)
        _COMPILED[op, mode] = torch.compile(getattr(reference, op), mode=mode, dynamic=False, fullgraph=True)
    return _COMPILED[op, mode]


def _external_layer_norm(impl: str, c: int, device, dtype):
    """Liger / apex LayerNorm without affine (weight 1, bias 0), or skip with the reason."""
    if impl == "liger":
        try:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        except ImportError:
            note_baseline(SUITE, "liger", "liger-kernel not installed")
        w, b = torch.ones(c, device=device, dtype=dtype), torch.zeros(c, device=device, dtype=dtype)
        return lambda x, eps: LigerLayerNormFunction.apply(x, w, b, eps)
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm
    except ImportError:
        note_baseline(SUITE, "apex", "apex not installed")
    return lambda x, eps: fused_layer_norm(x, (x.shape[-1],), eps)


def _composite(op: str, impl: str, c: int, device, dtype):
    """An external LayerNorm kernel + the eager modulation (and gated residual): the same math as
    the reference, as a user of Liger / apex would write it."""
    if op == "gated_residual":
        note_baseline(SUITE, impl, "no equivalent of gated_residual alone")
    layer_norm = _external_layer_norm(impl, c, device, dtype)

    def per_token(t):  # (B, C) -> (B, 1, C); (B, N, C) as is
        return t.unsqueeze(1) if t.dim() == 2 else t

    def ada(x, shift, scale, eps=1e-6):
        h = layer_norm(x, eps)
        return (h.float() * (1 + per_token(scale).float()) + per_token(shift).float()).to(x.dtype)

    if op == "ada_layer_norm":
        return ada

    def fused(x, y, gate, shift, scale, eps=1e-6):
        x_new = (x.float() + per_token(gate).float() * y.float()).to(x.dtype)
        return x_new, ada(x_new, shift, scale, eps)

    return fused


def implementation(op: str, impl: str, shape, dtype, device: torch.device):
    if not hasattr(reference, op):
        pytest.skip(f"archirf_kernels.reference.{op} not implemented yet")
    if impl == "ours":
        fn = getattr(archirf_kernels, op, None)
        if fn is None:
            pytest.skip(f"archirf_kernels.{op} not implemented yet")
        # Explicit Triton: a silent fallback to the reference must not pass for our kernel.
        return functools.partial(fn, impl="triton" if device.type == "cuda" else "auto")
    if impl == "eager":
        return getattr(reference, op)
    if impl == "compiled":
        return _compiled(op, None)
    if impl == "compiled-max-autotune":
        return _compiled(op, "max-autotune-no-cudagraphs")
    return _composite(op, impl, shape[-1], device, dtype)


# -- inputs and checks ----------------------------------------------------------------------------


def make_inputs(op: str, shape, dtype, mod_dtype, device):
    """Random (never zero) leaves requiring grad, and random output gradients."""
    b, n, c = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def leaf(name):
        size, dt = ((b, n, c), dtype) if name in ("x", "y") else ((b, c), mod_dtype)
        return torch.randn(size, device=device, dtype=dt, generator=gen).requires_grad_()

    inputs = tuple(leaf(name) for name in ARGS[op])
    n_out = 2 if op == "gated_residual_ada_layer_norm" else 1
    grads = tuple(torch.randn((b, n, c), device=device, dtype=dtype, generator=gen) for _ in range(n_out))
    return inputs, grads


def first_call(op, impl, case, fn, inputs, grads) -> float:
    """Seconds of this implementation's first fwd+bwd on this case (compile / JIT / autotune),
    once per (op, impl, case); its outputs and gradients are checked against the eager reference."""
    key = (op, impl, case)
    if key not in _FIRST_CALL:
        _FIRST_CALL[key], outs, dins = fwd_bwd_once(fn, inputs, grads)
        if impl != "eager":
            ref_outs = as_tuple(getattr(reference, op)(*inputs))
            ref_dins = torch.autograd.grad(ref_outs, inputs, grads)
            tol = 2e-2 if inputs[0].dtype in (torch.bfloat16, torch.float16) else 1e-4
            names = [f"out{i}" for i in range(len(outs))] + [f"d{n}" for n in ARGS[op]]
            for name, got, want in zip(names, (*outs, *dins), (*ref_outs, *ref_dins)):
                err = rel_err(got, want)
                assert err < tol, f"{impl} {op} {case}: {name} relative error {err:.3g} vs the reference (tol {tol})"
    return _FIRST_CALL[key]


# -- the benchmark --------------------------------------------------------------------------------


@pytest.mark.parametrize("case,op,pass_,impl", list(_params()))
def test_adaln(bench, device, case, op, pass_, impl):
    shape, dtype, mod_dtype = CASES[case]
    shape = SMOKE_SHAPE if SMOKE else shape
    fn = implementation(op, impl, shape, dtype, device)
    inputs, grads = make_inputs(op, shape, dtype, mod_dtype, device)
    first_s = first_call(op, impl, case, fn, inputs, grads)

    target, prepare = pass_target(pass_, fn, inputs, grads)

    bench.benchmark.group = f"{op} {pass_.replace('_', '+')} {case}"
    bench.run(
        target,
        prepare=prepare,
        bytes_moved=bytes_moved(op, pass_, shape, dtype, mod_dtype),
        info={
            "suite": SUITE,
            "op": op,
            "pass": pass_.replace("_", "+"),
            "case": case,
            "impl": impl,
            "shape": list(shape),
            "dtype": str(dtype).removeprefix("torch."),
            "mod_dtype": str(mod_dtype).removeprefix("torch."),
            "modulation": "per-sample (B, C)",
            "first_call_s": first_s,
            "targets": targets(op, pass_) if impl == "ours" else [],
        },
    )
