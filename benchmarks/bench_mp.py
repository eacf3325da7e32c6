"""EDM2 magnitude-preserving ops (archirf_kernels.mp) at EDM2-S shapes: fwd, bwd and fwd+bwd.

Cases: the tensors an EDM2-S block sees at 64x64 (its widest level: 192 channels) on 64x64x4 latents,
batch 64, bf16, channels_last as the UNet runs them; the attention's per-head q/k/v normalisation at
16x16 (576 channels, 9 heads of 64: rows of 64); a 3x3 MPConv weight of the 16x16 level (576 x 576 x 9).

Baselines, same process and inputs: the eager reference (`archirf_kernels.reference`, the spec) and
`torch.compile(reference)` (default mode, static shapes, fullgraph). "bwd" times
`torch.autograd.grad(outputs, inputs, grads)` on a fresh graph per round (see bench_adaln.py);
every implementation's first fwd+bwd is reported as first_call_s and checked against the reference.

Bytes that must move (T = the activation's bytes, M = B*C of the modulation, W = the weight's bytes),
weighted by each tensor's element size:

  normalize        fwd: x -> n                          2T    bwd: x, dn -> dx              3T
  normalize_silu   fwd: x -> n, s                       3T    bwd: x, dn, ds -> dx          4T
  mp_silu          fwd: x -> y                          2T    bwd: x, dy -> dx              3T
  mp_sum (clip)    fwd: a, b -> out                     3T    bwd: dout, out -> da, db      4T
  modulated_silu   fwd: y, c -> out                  2T + M   bwd: dout, y, c -> dy, dc  3T + 2M
  mp_cat_silu      fwd: a, b -> x, s (T = x's)          3T    bwd: dx, ds, x -> da, db      4T
  mp_weight        fwd: w, gain -> w'                   2W    bwd: dw', w -> dw, dgain      3W
  fwd+bwd = fwd + bwd.
"""

from __future__ import annotations

import functools

import pytest
import torch

import archirf_kernels
from archirf_kernels import reference

from .harness import SMOKE, as_tuple, fwd_bwd_once, pass_target, rel_err

pytestmark = pytest.mark.cuda

SUITE = "mp"
bf16 = torch.bfloat16
B, C, R = 64, 192, 64            # batch, channels and side of EDM2-S's 64x64 level
ATTN_ROWS = 64 * 256 * 3 * 9     # q, k, v of 9 heads at 16x16 (256 pixels), batch 64
SMOKE_SCALE = {"B": 2, "C": 24, "R": 8, "rows": 96, "w": 16}
PASSES = ("fwd", "bwd", "fwd_bwd")
IMPLS = ("ours", "compiled", "eager")


def _sizes():
    if SMOKE:
        s = SMOKE_SCALE
        return s["B"], s["C"], s["R"], s["rows"], s["w"]
    return B, C, R, ATTN_ROWS, 576


KWARGS = {"mp_sum": {"t": 0.3, "clip": 256.0}, "mp_cat_silu": {"t": 0.5}}     # EDM2's res_balance, clip


def make_inputs(op: str, device: torch.device):
    """(positional tensor inputs, shape for the table) of one op."""
    b, c, r, rows, w_ch = _sizes()
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=bf16, mean=0.0, cl=True):
        t = (mean + torch.randn(shape, device=device, dtype=torch.float32, generator=gen)).to(dtype)
        if cl and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_()

    act = (b, c, r, r)
    if op == "normalize":
        return (randn(rows, 64),), [rows, 64]
    if op in ("normalize_silu", "mp_silu"):
        return (randn(*act),), list(act)
    if op == "mp_sum":
        return (randn(*act), randn(*act)), list(act)
    if op == "modulated_silu":
        return (randn(*act), randn(b, c, mean=1.0)), list(act)
    if op == "mp_cat_silu":
        return (randn(*act), randn(*act)), [b, 2 * c, r, r]
    if op == "mp_weight":
        return (randn(w_ch, w_ch, 3, 3, cl=False), randn(1, dtype=torch.float32, mean=1.0)), [w_ch, w_ch, 3, 3]
    raise ValueError(op)


OPS = ("normalize_silu", "modulated_silu", "mp_sum", "mp_cat_silu", "mp_silu", "normalize", "mp_weight")
FWD_BYTES = {"normalize": 2, "normalize_silu": 3, "mp_silu": 2, "mp_sum": 3, "modulated_silu": 2,
             "mp_cat_silu": 3, "mp_weight": 2}
BWD_BYTES = {"normalize": 3, "normalize_silu": 4, "mp_silu": 3, "mp_sum": 4, "modulated_silu": 3,
             "mp_cat_silu": 4, "mp_weight": 3}


def bytes_moved(op: str, pass_: str, inputs) -> int:
    main = inputs[0].nbytes * (2 if op == "mp_cat_silu" else 1)
    extra = {"fwd": 0, "bwd": 0}
    if op == "modulated_silu":                        # c read (fwd); c read and dc written (bwd)
        extra = {"fwd": inputs[1].nbytes, "bwd": 2 * inputs[1].nbytes}
    fwd, bwd = FWD_BYTES[op] * main + extra["fwd"], BWD_BYTES[op] * main + extra["bwd"]
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[pass_]


def targets(pass_: str) -> list[dict]:
    out = [{"metric": "vs_compiled_best", "min": 1.0, "label": "≥ 1.0× compiled"}]
    if pass_ == "fwd":
        out.append({"metric": "copy_bw_fraction", "min": 0.8, "label": "≥ 80% of copy BW"})
    return out


_COMPILED: dict[str, object] = {}
_FIRST_CALL: dict[tuple[str, str], float] = {}


def implementation(op: str, impl: str, device: torch.device):
    kwargs = KWARGS.get(op, {})
    ref = functools.partial(getattr(reference, op), **(kwargs if op != "normalize" else {"dim": 1}))
    if impl == "ours":
        return functools.partial(getattr(archirf_kernels, op), impl="triton" if device.type == "cuda" else "auto",
                                 **kwargs)
    if impl == "eager":
        return ref
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(ref, dynamic=False, fullgraph=True)
    return _COMPILED[op]


def first_call(op: str, impl: str, fn, inputs, grads) -> float:
    if (op, impl) not in _FIRST_CALL:
        _FIRST_CALL[op, impl], outs, dins = fwd_bwd_once(fn, inputs, grads)
        if impl != "eager":
            ref = implementation(op, "eager", inputs[0].device)
            ref_outs = as_tuple(ref(*inputs))
            ref_dins = torch.autograd.grad(ref_outs, inputs, grads)
            for i, (got, want) in enumerate(zip((*outs, *dins), (*ref_outs, *ref_dins))):
                err = rel_err(got, want)
                assert err < 2e-2, f"{impl} {op}: output/grad {i} relative error {err:.3g} vs the reference"
    return _FIRST_CALL[op, impl]


@pytest.mark.parametrize("op,pass_,impl", [pytest.param(o, p, i, id=f"{o}-{p.replace('_', '')}-{i}")
                                           for o in OPS for p in PASSES for i in IMPLS])
def test_mp(bench, device, op, pass_, impl):
    inputs, shape = make_inputs(op, device)
    fn = implementation(op, impl, device)
    probe = as_tuple(implementation(op, "eager", device)(*inputs))
    gen = torch.Generator(device=device).manual_seed(1)
    grads = tuple(torch.randn(o.shape, device=device, dtype=torch.float32, generator=gen).to(o.dtype)
                  .contiguous(memory_format=torch.channels_last if o.dim() == 4 and op != "mp_weight"
                              else torch.contiguous_format) for o in probe)
    first_s = first_call(op, impl, fn, inputs, grads)

    target, prepare = pass_target(pass_, fn, inputs, grads)

    bench.benchmark.group = f"{op} {pass_.replace('_', '+')}"
    bench.run(target, prepare=prepare, bytes_moved=bytes_moved(op, pass_, inputs), info={
        "suite": SUITE, "op": op, "pass": pass_.replace("_", "+"), "case": "edm2-s", "impl": impl,
        "shape": shape, "shape_label": "as listed", "dtype": str(inputs[0].dtype).removeprefix("torch."),
        "layout": "channels_last" if inputs[0].dim() == 4 and op != "mp_weight" else "rows",
        "first_call_s": first_s, "targets": targets(pass_) if impl == "ours" else [],
    })
