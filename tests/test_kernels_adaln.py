"""Fused adaLN kernels (archirf_kernels.ada_norm) against the float64 spec in archirf_kernels.reference:
every output and every gradient, fp32/fp16 storage and fp16 activations with fp32 modulation,
per-sample and per-token conditioning, LayerNorm and RMSNorm with and without affine, odd C,
strided inputs, torch.compile(fullgraph=True), torch.library.opcheck, impl dispatch and errors.

On a CPU machine the kernels run in Triton's interpreter (tests/conftest.py), which computes bf16
wrongly: bf16 and DiT-sized shapes are in tests/test_kernels_gpu.py. With CUDA the same tests run
the compiled kernels on the GPU.
"""

import itertools

import pytest
import torch

import archirf_kernels as K
from archirf_kernels import ada_norm, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(2, 5, 123), (1, 3, 64), (2, 7, 40)]         # odd C; N not a multiple of the rows per program
# Max error relative to max(1, max |reference|), by the dtype of the activations: with fp16 storage,
# x_new and h are rounded to fp16 before anything downstream sees them (as in the reference run in
# fp16), so every output inherits fp16's ~5e-4 relative error.
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}
DTYPES = {                                             # (activations, modulation and affine)
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "fp16-act-fp32-mod": (torch.float16, torch.float32),
}
LAYOUTS = ["per-sample", "per-sample-B1C", "per-token"]
NORMS = [("layer", None), ("layer", "w"), ("layer", "wb"), ("rms", None), ("rms", "w")]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an element a kernel fails to write fails the test."""
    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(ada_norm, "_alloc", alloc)


def assert_close_to_fp64(name, got, want, dtype, tol):
    """got (a kernel's result, of `dtype`) within tol x max(1, max |want|) of the float64 `want`, finite."""
    assert got.dtype == dtype and got.shape == want.shape, (name, got.dtype, dtype, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten element?)"
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol * scale:.3g}"


def _randn(shape, dtype, seed, std=1.0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    return (mean + std * torch.randn(shape, generator=g)).to(device=DEVICE, dtype=dtype)


def conditioning(layout, B, N, C, dtype, seed):
    """shift/scale/gate-like tensor: (B, C), a (B, 1, C) chunk of a wider vector (DiT's layout), or (B, N, C)."""
    if layout == "per-sample":
        return _randn((B, C), dtype, seed, std=0.5)
    if layout == "per-sample-B1C":
        return _randn((B, 1, 3 * C), dtype, seed, std=0.5)[..., C:2 * C]      # strided over B
    return _randn((B, N, C), dtype, seed, std=0.5)


def affine(kind, C, dtype, seed):
    weight = _randn((C,), dtype, seed, std=0.3, mean=1.0) if kind and "w" in kind else None
    bias = _randn((C,), dtype, seed + 1, std=0.3) if kind and "b" in kind else None
    return weight, bias


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def check_against_reference(triton_fn, reference_fn, inputs, act_dtype, seed=0, grad_outputs="all"):
    """Runs both, backpropagates the same random cotangents, compares outputs and every input gradient.

    The reference runs on float64 copies of the inputs. grad_outputs: "all" or the indices of the
    outputs the loss uses (the others get no gradient)."""
    tol = TOL[act_dtype]
    ins = [leaf(t) for t in inputs]
    ins64 = [leaf(t.double()) if t is not None else None for t in inputs]
    outs, refs = triton_fn(*ins), reference_fn(*ins64)
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = refs if isinstance(refs, tuple) else (refs,)
    used = range(len(outs)) if grad_outputs == "all" else grad_outputs
    cots = {i: _randn(outs[i].shape, torch.float64, seed + 100 + i) for i in used}
    loss = sum((outs[i].double() * cots[i]).sum() for i in used)
    loss64 = sum((refs[i] * cots[i]).sum() for i in used)
    leaves = [t for t in ins if t is not None]
    # x_new alone does not depend on shift, scale, weight, bias: their gradients are then zero
    grads = torch.autograd.grad(loss, leaves, materialize_grads=True)
    grads64 = torch.autograd.grad(loss64, [t for t in ins64 if t is not None], materialize_grads=True)

    for i, (o, r) in enumerate(zip(outs, refs)):
        assert_close_to_fp64(f"output {i}", o, r, act_dtype, tol)
    for i, (t, g, g64) in enumerate(zip(leaves, grads, grads64)):
        assert_close_to_fp64(f"grad of input {i}", g, g64, t.dtype, tol)


def case_ids(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


# Every (dtype, layout, norm/affine) combination, cycling the shapes so that each shape meets each kind.
GRID = [(dt, lay, nm, SHAPES[i % len(SHAPES)])
        for i, (dt, lay, nm) in enumerate(itertools.product(DTYPES, LAYOUTS, NORMS))]


@pytest.mark.parametrize("dtypes,layout,norm_affine,shape", GRID, ids=case_ids)
def test_ada_layer_norm(dtypes, layout, norm_affine, shape):
    (act, mod), (norm, kind), (B, N, C) = DTYPES[dtypes], norm_affine, shape
    weight, bias = affine(kind, C, mod, seed=5)
    inputs = [_randn((B, N, C), act, 0, std=2.0, mean=0.5),
              conditioning(layout, B, N, C, mod, 1), conditioning(layout, B, N, C, mod, 2), weight, bias]
    check_against_reference(
        lambda x, sh, sc, w, b: K.ada_layer_norm(x, sh, sc, w, b, eps=1e-6, norm=norm, impl="triton"),
        lambda x, sh, sc, w, b: reference.ada_layer_norm(x, sh, sc, w, b, eps=1e-6, norm=norm),
        inputs, act)


@pytest.mark.parametrize("dtypes,layout,norm_affine,shape", GRID, ids=case_ids)
def test_gated_residual_ada_layer_norm(dtypes, layout, norm_affine, shape):
    (act, mod), (norm, kind), (B, N, C) = DTYPES[dtypes], norm_affine, shape
    weight, bias = affine(kind, C, mod, seed=5)
    # the gate's layout varies independently of shift/scale's
    gate_layout = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]
    inputs = [_randn((B, N, C), act, 0, std=2.0, mean=0.5), _randn((B, N, C), act, 3),
              conditioning(gate_layout, B, N, C, mod, 4),
              conditioning(layout, B, N, C, mod, 1), conditioning(layout, B, N, C, mod, 2), weight, bias]
    check_against_reference(
        lambda *a: K.gated_residual_ada_layer_norm(*a, eps=1e-5, norm=norm, impl="triton"),
        lambda *a: reference.gated_residual_ada_layer_norm(*a, eps=1e-5, norm=norm),
        inputs, act)


@pytest.mark.parametrize("used", [(0,), (1,)], ids=["only-x_new", "only-h"])
@pytest.mark.parametrize("layout", ["per-sample", "per-token"])
def test_gated_residual_ada_layer_norm_one_output_used(used, layout):
    # The backward gets a gradient for only one of (x_new, h); the other is absent (or zeros).
    B, N, C = 2, 5, 123
    inputs = [_randn((B, N, C), torch.float32, 0), _randn((B, N, C), torch.float32, 3),
              conditioning(layout, B, N, C, torch.float32, 4), conditioning(layout, B, N, C, torch.float32, 1),
              conditioning(layout, B, N, C, torch.float32, 2), *affine("wb", C, torch.float32, 5)]
    check_against_reference(lambda *a: K.gated_residual_ada_layer_norm(*a, impl="triton"),
                            reference.gated_residual_ada_layer_norm, inputs, torch.float32, grad_outputs=used)


@pytest.mark.parametrize("dtypes,layout,shape",
                         [(dt, lay, SHAPES[i % len(SHAPES)])
                          for i, (dt, lay) in enumerate(itertools.product(DTYPES, LAYOUTS))], ids=case_ids)
def test_gated_residual(dtypes, layout, shape):
    (act, mod), (B, N, C) = DTYPES[dtypes], shape
    inputs = [_randn((B, N, C), act, 0), _randn((B, N, C), act, 3), conditioning(layout, B, N, C, mod, 4)]
    check_against_reference(lambda *a: K.gated_residual(*a, impl="triton"), reference.gated_residual,
                            inputs, act)


# Launch shapes the GPU heuristics may pick: one-row tiles (scalar row sums, unmasked main block) or
# several rows; a row split into main + tail blocks, or one padded block; one or several tiles per
# program, pipelined or not; the fusion's backward loading y and dx_new early or late.
# (split rows, ROWS, tiles per program, pipelining stages, early loads)
LAUNCHES = [(True, 1, 1, 1, True), (True, 1, 3, 2, True), (True, 4, 2, 1, False), (False, 1, 2, 3, True),
            (False, 2, 1, 1, False), (True, 8, 1, 1, True)]


@pytest.mark.parametrize("split,rows,tiles,stages,early", LAUNCHES, ids=lambda v: str(v))
@pytest.mark.parametrize("layout,norm_affine", [("per-sample", ("layer", "wb")), ("per-token", ("rms", "w"))])
def test_launch_shapes(monkeypatch, split, rows, tiles, stages, early, layout, norm_affine):
    launch = ada_norm.Launch(split, rows, num_warps=4, num_stages=stages, tiles=tiles)
    monkeypatch.setattr(ada_norm, "_launch_config", lambda kind, B, N, C, device: launch)
    monkeypatch.setattr(ada_norm, "EARLY_LOADS", early)
    (norm, kind), (B, N, C) = norm_affine, (2, 7, 40)       # 40 = 32 + a tail of 8; 7 tokens: short tiles
    mod = [conditioning(layout, B, N, C, torch.float32, s) for s in (1, 2, 4)]
    x, y = _randn((B, N, C), torch.float32, 0, std=2.0, mean=0.5), _randn((B, N, C), torch.float32, 3)
    check_against_reference(lambda *a: K.gated_residual_ada_layer_norm(*a, norm=norm, impl="triton"),
                            lambda *a: reference.gated_residual_ada_layer_norm(*a, norm=norm),
                            [x, y, mod[2], mod[0], mod[1], *affine(kind, C, torch.float32, 5)], torch.float32)
    check_against_reference(lambda *a: K.ada_layer_norm(*a, norm=norm, impl="triton"),
                            lambda *a: reference.ada_layer_norm(*a, norm=norm),
                            [x, mod[0], mod[1], *affine(kind, C, torch.float32, 5)], torch.float32)
    check_against_reference(lambda *a: K.gated_residual(*a, impl="triton"), reference.gated_residual,
                            [x, y, mod[2]], torch.float32)


def test_strided_views_need_no_copy_and_match():
    # DiT passes x[:, :num_patches] (strided over B) and modulation chunks of one (B, 6C) vector.
    B, N, C = 2, 5, 40
    big = _randn((B, N + 3, C), torch.float32, 0)
    mod = _randn((B, 6 * C), torch.float32, 1).unsqueeze(1).chunk(6, dim=-1)      # (B, 1, C) each
    y = _randn((B, N + 3, C), torch.float32, 2)[:, 3:]
    inputs = [big[:, :N], y, mod[2], mod[0], mod[1]]
    assert not inputs[0].is_contiguous() and not inputs[3].is_contiguous()
    check_against_reference(lambda *a: K.gated_residual_ada_layer_norm(*a, impl="triton"),
                            reference.gated_residual_ada_layer_norm, inputs, torch.float32)


def test_one_token_and_empty_batch():
    x, shift, scale = _randn((3, 1, 17), torch.float32, 0), _randn((3, 17), torch.float32, 1), _randn((3, 17), torch.float32, 2)
    check_against_reference(lambda *a: K.ada_layer_norm(*a, impl="triton"), reference.ada_layer_norm,
                            [x, shift, scale], torch.float32)
    empty = leaf(torch.zeros(2, 0, 8, device=DEVICE))
    mod = leaf(torch.zeros(2, 8, device=DEVICE))
    x_new, h = K.gated_residual_ada_layer_norm(empty, empty, mod, mod, mod, impl="triton")
    assert x_new.shape == h.shape == (2, 0, 8)
    (dmod,) = torch.autograd.grad(h.sum() + x_new.sum(), [mod])
    assert torch.equal(dmod, torch.zeros_like(mod))


# ---------------------------------------------------------------------------------------------
# torch.compile, custom-op checks

class TinyBlock(torch.nn.Module):
    """A DiT-like block boundary built from the three ops and the two modules."""

    def __init__(self, C):
        super().__init__()
        self.norm1 = K.AdaLayerNorm(C, elementwise_affine=True, impl="triton")
        self.norm2 = K.GatedResidualAdaLayerNorm(C, norm="rms", elementwise_affine=True, impl="triton")
        self.proj = torch.nn.Linear(C, C)
        self.ada = torch.nn.Linear(C, 6 * C)

    def forward(self, x, c):
        s1, c1, g1, s2, c2, g2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x, s1, c1)
        x, h = self.norm2(x, self.proj(h), g1, s2, c2)
        return K.gated_residual(x, self.proj(h), g2, impl="triton")


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch-internal
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = TinyBlock(40).to(DEVICE)
    x, c = _randn((2, 7, 40), torch.float32, 0), _randn((2, 40), torch.float32, 1)
    assert_compiled_matches(block, (x, c), backend, atol=1e-5, rtol=1e-5)


def assert_compiled_matches(block, args, backend, atol, rtol, eager=None):
    """torch.compile(block, fullgraph=True) on args gives the output and parameter gradients (of
    out.square().sum()) of `eager` (default: block itself, uncompiled), within atol / rtol."""
    eager = block if eager is None else eager
    out = eager(*args)
    grads = torch.autograd.grad(out.square().sum(), list(eager.parameters()))
    out_c = torch.compile(block, fullgraph=True, backend=backend)(*args)
    grads_c = torch.autograd.grad(out_c.square().sum(), list(block.parameters()))
    torch.testing.assert_close(out_c, out, atol=atol, rtol=rtol)
    for g_c, g in zip(grads_c, grads):
        torch.testing.assert_close(g_c, g, atol=atol, rtol=rtol)


def _opcheck_cases():
    B, N, C = 2, 3, 40
    x, y = _randn((B, N, C), torch.float32, 0), _randn((B, N, C), torch.float32, 1)
    sample, token = _randn((B, C), torch.float32, 2), _randn((B, N, C), torch.float32, 3)
    w, b = affine("wb", C, torch.float32, 4)
    ops = torch.ops.archirf_kernels
    yield ops.ada_layer_norm.default, (x, sample, sample, w, b, 1e-6, "layer")
    yield ops.ada_layer_norm.default, (x, token, token, w, None, 1e-6, "rms")
    yield ops.gated_residual.default, (x, y, sample)
    yield ops.gated_residual_ada_layer_norm.default, (x, y, token, sample, sample, None, None, 1e-6, "layer")
    yield ops.ada_layer_norm_backward.default, (y, x, sample, w, b, *K.ada_norm._ada_layer_norm_op(
        x, sample, sample, w, b, 1e-6, "layer")[1:], "layer", torch.float32)
    yield ops.gated_residual_backward.default, (y, x, token)


def run_opcheck(op, args) -> None:
    """torch.library.opcheck of op on args, tensors made fresh leaves (a backward op's inputs kept as
    they are: they are gradients and saved tensors, not inputs to differentiate)."""
    args = [leaf(a) if isinstance(a, torch.Tensor) and "backward" not in str(op) else a for a in args]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    run_opcheck(*list(_opcheck_cases())[case])


# ---------------------------------------------------------------------------------------------
# impl dispatch and errors

def test_impl_auto_and_reference_use_the_reference_off_cuda(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path ran")
    monkeypatch.setattr(ada_norm, "ada_layer_norm", fail)
    x, mod = torch.randn(2, 3, 8), torch.randn(2, 8)
    expected = reference.ada_layer_norm(x, mod, mod)
    torch.testing.assert_close(K.ada_layer_norm(x, mod, mod, impl="reference"), expected, atol=0, rtol=0)
    torch.testing.assert_close(K.ada_layer_norm(x, mod, mod), expected, atol=0, rtol=0)   # auto, CPU tensor


def test_impl_errors(monkeypatch):
    x, mod = torch.randn(2, 3, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="unknown impl 'cuda'.*auto, reference, triton"):
        K.gated_residual(x, x, mod, impl="cuda")
    monkeypatch.setattr(ada_norm, "INTERPRETED", False)          # as on a machine without the interpreter
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        K.ada_layer_norm(x, mod, mod, impl="triton")
    monkeypatch.setattr(K, "HAS_TRITON", False)
    with pytest.raises(ValueError, match="triton is not installed"):
        K.gated_residual(x, x, mod, impl="triton")


@pytest.mark.parametrize("bad,match", [
    (dict(shift=torch.randn(2, 5)), r"shift must be per sample \(B, C\) = \(2, 8\)"),
    (dict(scale=torch.randn(2, 3, 8)), r"shift \(2, 8\) and scale \(2, 3, 8\) must have the same layout"),
    (dict(x=torch.randn(6, 8)), r"x must be \(B, N, C\)"),
    (dict(weight=torch.randn(7)), r"weight must be \(C,\) = \(8,\)"),
    (dict(norm="batch"), "unknown norm 'batch'"),
    (dict(norm="rms", bias=torch.randn(8)), "norm='rms' has no bias"),
    (dict(x=torch.randn(2, 3, 8, dtype=torch.float64)), "dtype torch.float64 is not fp16, bf16 or fp32"),
    (dict(x=torch.ones(2, 3, 8, dtype=torch.long)), "x dtype torch.int64 is not fp16"),
    (dict(shift=torch.randn(8)), r"shift must be per sample"),                    # would broadcast in the spec
    (dict(shift=torch.randn(1, 8), scale=torch.randn(1, 8)), r"shift must be per sample \(B, C\) = \(2, 8\)"),
    (dict(bias=torch.ones(8, dtype=torch.long)), "bias dtype torch.int64"),
])
@pytest.mark.parametrize("impl", ["triton", "auto"])      # the same checks on the CPU fallback
def test_launcher_checks(bad, match, impl):
    if impl == "auto" and DEVICE == "cuda":
        pytest.skip("auto runs the kernels on CUDA")
    args = dict(x=torch.randn(2, 3, 8), shift=torch.randn(2, 8), scale=torch.randn(2, 8), weight=None,
                bias=None, norm="layer")
    args.update(bad)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        K.ada_layer_norm(**args, impl=impl)


@pytest.mark.parametrize("impl", ["triton", "auto"])
def test_gated_residual_checks_on_both_paths(impl):
    if impl == "auto" and DEVICE == "cuda":
        pytest.skip("auto runs the kernels on CUDA")
    x, mod = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="y dtype torch.int64"):
        K.gated_residual(x, x.long(), mod, impl=impl)
    with pytest.raises(ValueError, match=r"gate must be per sample"):
        K.gated_residual(x, x, mod[:1], impl=impl)                               # (1, C) would broadcast
    with pytest.raises(ValueError, match=r"y has shape \(2, 1, 8\)"):
        K.gated_residual_ada_layer_norm(x, x[:, :1], mod, mod, mod, impl=impl)


def test_modules():
    m = K.AdaLayerNorm(8, norm="rms", elementwise_affine=True)
    assert m.weight.shape == (8,) and m.bias is None                 # RMSNorm has no bias
    assert K.AdaLayerNorm(8, elementwise_affine=True).bias.shape == (8,)
    assert K.AdaLayerNorm(8).weight is None
    with pytest.raises(ValueError, match="unknown impl"):
        K.GatedResidualAdaLayerNorm(8, impl="fast")
    x, mod = torch.randn(2, 3, 8), torch.randn(2, 8)
    x_new, h = K.GatedResidualAdaLayerNorm(8, eps=1e-5)(x, x, mod, mod, mod)
    ref = reference.gated_residual_ada_layer_norm(x, x, mod, mod, mod, eps=1e-5)
    torch.testing.assert_close((x_new, h), ref, atol=0, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's strictness (tests/conftest.py)")
def test_interpreted_launch_rejects_undeclared_constexprs():
    import triton
    import triton.language as tl

    @triton.jit
    def copy(X, Y, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs))

    x = torch.arange(16.0)
    y = torch.empty_like(x)
    copy[(1,)](x, y, BLOCK=16)
    assert torch.equal(x, y)
    with pytest.raises(TypeError, match=r"does not declare: \['NORM'\]"):
        copy[(1,)](x, y, BLOCK=16, NORM=True)


def test_ops_are_custom_ops_where_they_cannot_be_traced():
    # kernels/registry.py: triton_ops only with real Triton kernels and a CUDA device. In the interpreter (this
    # suite) and on a machine without CUDA the ops are custom ops, and importing the library never imports
    # inductor (torch.library.triton_op's scan for kernels would: about 1.5 s per import).
    import os
    import subprocess
    import sys

    from archirf_kernels import mp, registry, rope

    # outside any trace a launcher gets the kernel itself, on every machine (no traced-path dispatch per launch)
    assert registry.launch(rope._fwd_kernel, rope.INTERPRETED) is rope._fwd_kernel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    assert not registry.tracing()
    with FunctionalTensorMode():
        assert registry.tracing()       # what torch.compile's trace of a triton_op looks like to a launcher
    with FakeTensorMode(), FlopCounterMode(display=False):
        assert not registry.tracing()   # other modes see eager launches (a FlopCounterMode would skip a wrapped one)
    if torch.cuda.is_available():       # a GPU machine: the real kernels, traceable
        assert registry.traceable(ada_norm.INTERPRETED) and registry.traceable(mp.INTERPRETED)
        return
    assert not registry.traceable(ada_norm.INTERPRETED) and not registry.traceable(mp.INTERPRETED)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = ("import sys, archirf_kernels.ada_norm as a, archirf_kernels.registry as r; "
             "assert not a.INTERPRETED, 'interpreted'; assert not r.traceable(False); "
             "assert 'torch._inductor' not in sys.modules, 'inductor imported'")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
