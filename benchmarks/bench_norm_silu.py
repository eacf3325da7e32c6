"""The autoencoder's norm + SiLU (archirf_kernels.norm_silu) at its own shapes: fwd, bwd and fwd+bwd.

Cases, bf16 activations (fp32 weight and bias, as the model's parameters), NCHW and channels_last:
  kl-f8   LDM's KL-f8 autoencoder on 256 x 256 images, batch 8: the (B, C, H, W) its ResnetBlocks'
          norms see, (8, 128, 256, 256), (8, 256, 128, 128), (8, 512, 64, 64), (8, 512, 32, 32)
  seed    the seed autoencoder on 64 x 64 images, batch 64: (64, 128, 64, 64), (64, 256, 32, 32),
          (64, 512, 16, 16)
group_norm_silu is GroupNorm(32, eps 1e-6) + SiLU at every shape; group_norm_silu_residual the same with
the skip's add fused in front (one shape per autoencoder, channels_last); channel_rms_norm_silu (the seed's
norm) at the seed's shapes.

Baselines, same process and inputs: the eager reference (`archirf_kernels.reference`, the spec) and
`torch.compile(reference)` (default mode, static shapes, fullgraph). "bwd" times
`torch.autograd.grad(outputs, inputs, grads)` on a fresh graph per round (see bench_adaln.py); every
implementation's first fwd+bwd is reported as first_call_s and checked against the reference.

Bytes that must move (T = the activation's bytes; the (C,) parameters and their gradients left out):

  group_norm_silu            fwd: x -> y               2T    bwd: x, dy -> dx                  3T
  group_norm_silu_residual   fwd: x, r -> s, y         4T    bwd: s, dy, ds -> dx (= dr)       4T
  channel_rms_norm_silu      fwd: x -> y               2T    bwd: x, dy -> dx                  3T
  fwd+bwd = fwd + bwd.

GroupNorm's statistics span a whole group, so where a group does not fit one program (the split
reduction, see kernels/norm_silu.py) x is read twice in the forward (3T) and x, dy twice in the
backward (5T): the fwd target (>= 85% of copy bandwidth, on the minimal bytes above) is then reachable
only where the second read hits L2.
"""

from __future__ import annotations

import functools

import pytest
import torch

import archirf_kernels
from archirf_kernels import reference

from .harness import SMOKE, as_tuple, fwd_bwd_once, pass_target, rel_err

pytestmark = pytest.mark.cuda

SUITE = "norm_silu"
bf16 = torch.bfloat16
GROUPS = 32
SHAPES = {"kl-f8": [(8, 128, 256, 256), (8, 256, 128, 128), (8, 512, 64, 64), (8, 512, 32, 32)],
          "seed": [(64, 128, 64, 64), (64, 256, 32, 32), (64, 512, 16, 16)]}
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
PASSES = ("fwd", "bwd", "fwd_bwd")
IMPLS = ("ours", "compiled", "eager")


def _cases() -> list[tuple[str, str, tuple[int, ...], str]]:
    """(op, autoencoder, shape, layout) of every benchmarked call."""
    if SMOKE:       # the harness on CPU: one tiny shape per op
        return [("group_norm_silu", "smoke", (2, 64, 8, 8), "channels_last"),
                ("group_norm_silu_residual", "smoke", (2, 64, 8, 8), "nchw"),
                ("channel_rms_norm_silu", "smoke", (2, 64, 8, 8), "channels_last")]
    out = [("group_norm_silu", ae, s, lay) for ae, shapes in SHAPES.items() for s in shapes for lay in LAYOUTS]
    out += [("group_norm_silu_residual", ae, shapes[0], "channels_last") for ae, shapes in SHAPES.items()]
    out += [("channel_rms_norm_silu", "seed", s, lay) for s in SHAPES["seed"] for lay in LAYOUTS]
    return out


def make_inputs(op: str, shape: tuple[int, ...], layout: str, device: torch.device) -> tuple:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size, dtype=bf16, mean=0.0, std=1.0):
        t = (mean + std * torch.randn(size, device=device, dtype=torch.float32, generator=gen)).to(dtype)
        if t.dim() == 4:
            t = t.contiguous(memory_format=LAYOUTS[layout])
        return t.requires_grad_()

    C = shape[1]
    weight = randn(C, dtype=torch.float32, mean=1.0, std=0.2)
    if op == "channel_rms_norm_silu":
        return randn(*shape), weight
    x, bias = randn(*shape, mean=0.3, std=2.0), randn(C, dtype=torch.float32, std=0.2)
    return (x, randn(*shape), weight, bias) if op == "group_norm_silu_residual" else (x, weight, bias)


def _reference(op: str):
    if op == "channel_rms_norm_silu":
        return reference.channel_rms_norm_silu
    if op == "group_norm_silu_residual":
        return lambda x, r, w, b: reference.group_norm_silu(x, w, b, GROUPS, residual=r)
    return lambda x, w, b: reference.group_norm_silu(x, w, b, GROUPS)


def _ours(op: str, impl: str):
    if op == "channel_rms_norm_silu":
        return functools.partial(archirf_kernels.channel_rms_norm_silu, impl=impl)
    if op == "group_norm_silu_residual":
        return lambda x, r, w, b: archirf_kernels.group_norm_silu(x, w, b, GROUPS, residual=r, impl=impl)
    return lambda x, w, b: archirf_kernels.group_norm_silu(x, w, b, GROUPS, impl=impl)


FWD_BYTES = {"group_norm_silu": 2, "group_norm_silu_residual": 4, "channel_rms_norm_silu": 2}
BWD_BYTES = {"group_norm_silu": 3, "group_norm_silu_residual": 4, "channel_rms_norm_silu": 3}


def bytes_moved(op: str, pass_: str, x: torch.Tensor) -> int:
    fwd, bwd = FWD_BYTES[op] * x.nbytes, BWD_BYTES[op] * x.nbytes
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[pass_]


def targets(pass_: str) -> list[dict]:
    if pass_ == "fwd":
        return [{"metric": "copy_bw_fraction", "min": 0.85, "label": "≥ 85% of copy BW"}]
    if pass_ == "fwd_bwd":
        return [{"metric": "vs_compiled_best", "min": 1.3, "label": "≥ 1.3× compiled"}]
    return []


_COMPILED: dict[tuple, object] = {}
_FIRST_CALL: dict[tuple, float] = {}


def implementation(op: str, impl: str, device: torch.device, key: tuple):
    if impl == "ours":
        return _ours(op, "triton" if device.type == "cuda" else "auto")
    if impl == "eager":
        return _reference(op)
    if key not in _COMPILED:        # one compiled function per shape and layout (static shapes)
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 64)
        _COMPILED[key] = torch.compile(_reference(op), dynamic=False, fullgraph=True)
    return _COMPILED[key]


def first_call(key: tuple, impl: str, fn, inputs, grads) -> float:
    if (key, impl) not in _FIRST_CALL:
        _FIRST_CALL[key, impl], outs, dins = fwd_bwd_once(fn, inputs, grads)
        if impl != "eager":
            ref_outs = as_tuple(_reference(key[0])(*inputs))
            ref_dins = torch.autograd.grad(ref_outs, inputs, grads)
            for i, (got, want) in enumerate(zip((*outs, *dins), (*ref_outs, *ref_dins))):
                err = rel_err(got, want)
                assert err < 2e-2, f"{impl} {key}: output/grad {i} relative error {err:.3g} vs the reference"
    return _FIRST_CALL[key, impl]


def _id(op, ae, shape, layout, pass_, impl):
    return f"{op}-{ae}-{'x'.join(map(str, shape))}-{'cl' if layout == 'channels_last' else 'nchw'}-" \
           f"{pass_.replace('_', '')}-{impl}"


@pytest.mark.parametrize("op,ae,shape,layout,pass_,impl", [
    pytest.param(*c, p, i, id=_id(*c, p, i)) for c in _cases() for p in PASSES for i in IMPLS])
def test_norm_silu(bench, device, op, ae, shape, layout, pass_, impl):
    key = (op, shape, layout)
    inputs = make_inputs(op, shape, layout, device)
    fn = implementation(op, impl, device, key)
    probe = as_tuple(_reference(op)(*inputs))
    gen = torch.Generator(device=device).manual_seed(1)
    grads = tuple(torch.randn(o.shape, device=device, dtype=torch.float32, generator=gen).to(o.dtype)
                  .contiguous(memory_format=LAYOUTS[layout]) for o in probe)
    first_s = first_call(key, impl, fn, inputs, grads)

    target, prepare = pass_target(pass_, fn, inputs, grads)

    shape_str = "x".join(map(str, shape))
    bench.benchmark.group = f"{op} {shape_str} {layout} {pass_.replace('_', '+')}"
    bench.run(target, prepare=prepare, bytes_moved=bytes_moved(op, pass_, inputs[0]), info={
        "suite": SUITE, "op": op, "pass": pass_.replace("_", "+"), "case": f"{ae} {shape_str} {layout}",
        "impl": impl, "shape": [*shape[:-1], f"{shape[-1]}, {layout}"],   # the table's shape cell names the layout
        "shape_label": "B×C×H×W", "dtype": "bfloat16", "layout": layout,
        "first_call_s": first_s, "targets": targets(pass_) if impl == "ours" else [],
    })
