"""archirf_kernels.qk_norm_rope (kernels/rope.py): per-head RMSNorm then the interleaved rotary embedding (Flux's q
and k prep) against its float64 spec, output and every gradient (x, the weight, cos and sin); odd shapes (D = 6,
odd B, S and H, rows not a multiple of the tile), weight absent, fp32 and fp16 storage, several backward programs
looping over tiles, cos and sin constant or requiring grad; the spec against diffusers' own RMSNorm + apply_rotary_emb; torch.compile; the argument checks."""

import pytest
import torch

import archirf_kernels as K
from archirf_kernels import reference, rope
from test_kernels_adaln import DEVICE, TOL, _randn, assert_close_to_fp64


def _trig(S, D, seed, paired=True):
    """Flux's layout: each frequency's angle repeated for its pair (here random phases); paired=False: every
    column its own angle, so that a kernel mixing up a pair's even and odd entries is caught."""
    theta = _randn((S, D // 2 if paired else D), torch.float32, seed, std=3.0)
    theta = theta.repeat_interleave(2, dim=-1) if paired else theta
    return theta.cos().to(DEVICE), theta.sin().to(DEVICE)


def _check(shape, dtype, with_weight, seed=0, paired=True, trig=("cos", "sin")):
    """trig: which of cos and sin require grad (learned or scaled rotary frequencies)."""
    B, S, H, D = shape
    x = _randn(shape, dtype, seed, std=2.0, mean=0.3).to(DEVICE).requires_grad_()
    w = _randn((D,), dtype, seed + 1, std=0.3, mean=1.0).to(DEVICE).requires_grad_() if with_weight else None
    cos, sin = (t.requires_grad_(name in trig) for name, t in zip(("cos", "sin"), _trig(S, D, seed + 2, paired)))
    x64, w64, cos64, sin64 = (t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
                              for t in (x, w, cos, sin))
    out = K.qk_norm_rope(x, w, cos, sin, impl="triton")
    ref = reference.qk_norm_rope(x64, w64, cos64, sin64)
    cot = _randn(shape, torch.float64, seed + 3).to(DEVICE)
    named = [(n, t, t64) for n, t, t64 in (("x", x, x64), ("weight", w, w64), ("cos", cos, cos64), ("sin", sin, sin64))
             if t is not None and t.requires_grad]
    grads = torch.autograd.grad((out.double() * cot).sum(), [t for _, t, _ in named])
    grads64 = torch.autograd.grad((ref * cot).sum(), [t64 for *_, t64 in named])
    assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
    assert_close_to_fp64("output", out, ref, dtype, TOL[dtype])
    for (name, t, _), g, g64 in zip(named, grads, grads64):
        assert_close_to_fp64(f"grad of {name}", g, g64, t.dtype, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,with_weight", [((2, 5, 3, 6), True), ((1, 7, 2, 16), False), ((3, 4, 1, 10), True)],
                         ids=["B2-S5-H3-D6", "S7-D16-no-weight", "B3-H1-D10"])
@pytest.mark.parametrize("paired", [True, False], ids=["flux-pairs", "free-angles"])
def test_matches_float64_spec(shape, dtype, with_weight, paired):
    _check(shape, dtype, with_weight, paired=paired)


@pytest.mark.parametrize("trig", [(), ("sin",), ("cos", "sin")], ids=["constant-trig", "sin-grad", "trig-grads"])
def test_many_tiles_and_programs(monkeypatch, trig):
    # more tiles than backward programs: each program loops, its dweight partial sums several tiles
    monkeypatch.setattr(rope, "ROWS", 4)
    monkeypatch.setattr(rope, "INTERPRETER_PROGRAMS", 2)
    monkeypatch.setattr(rope, "PROGRAMS_PER_SM", 0.02)
    _check((2, 9, 3, 8), torch.float32, True, seed=5, trig=trig)


def test_constant_cos_and_sin_get_no_gradient():
    x = _randn((2, 5, 3, 6), torch.float32, 21).to(DEVICE).requires_grad_()
    cos, sin = _trig(5, 6, 22)
    sin.requires_grad_()
    K.qk_norm_rope(x, None, cos, sin, impl="triton").sum().backward()
    assert cos.grad is None and sin.grad is not None and sin.grad.shape == (5, 6)


def test_spec_is_diffusers_rmsnorm_then_rotary():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    B, S, H, D = 2, 6, 3, 8
    x = _randn((B, S, H, D), torch.float64, 7, std=2.0).cpu()        # the spec and diffusers' modules, on the CPU
    norm = RMSNorm(D, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(_randn((D,), torch.float64, 8, std=0.3, mean=1.0).cpu())
    cos, sin = (t.double().cpu() for t in _trig(S, D, 9))
    want = apply_rotary_emb(norm(x), (cos, sin), sequence_dim=1)
    # (apply_rotary_emb computes in fp32 whatever its input: fp32 rounding apart)
    torch.testing.assert_close(reference.qk_norm_rope(x, norm.weight, cos, sin), want, rtol=1e-5, atol=1e-6)


def test_compiles_fullgraph():
    x = _randn((2, 5, 2, 8), torch.float32, 11).to(DEVICE)
    w = _randn((8,), torch.float32, 12, mean=1.0).to(DEVICE)
    cos, sin = _trig(5, 8, 13)
    f = torch.compile(lambda x, w: K.qk_norm_rope(x, w, cos, sin, impl="triton"), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x, w), K.qk_norm_rope(x, w, cos, sin, impl="triton"), rtol=0, atol=0)


@pytest.mark.parametrize("args,match", [
    (lambda: (torch.randn(2, 3, 4), None, torch.ones(3, 4), torch.ones(3, 4)), r"x must be \(B, S, H, D\)"),
    (lambda: (torch.randn(1, 3, 2, 5), None, torch.ones(3, 5), torch.ones(3, 5)), "D=5 must be even"),
    (lambda: (torch.randn(1, 3, 2, 4), torch.ones(3), torch.ones(3, 4), torch.ones(3, 4)), r"weight must be \(D,\)"),
    (lambda: (torch.randn(1, 3, 2, 4), None, torch.ones(2, 4), torch.ones(3, 4)), r"cos must be \(S, D\) = \(3, 4\)"),
    (lambda: (torch.randn(1, 3, 2, 4), None, torch.ones(3, 4), torch.ones(3, 4).double()), "sin must be fp32"),
])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_argument_checks_on_both_paths(args, match, impl):
    with pytest.raises(ValueError, match=match):
        K.qk_norm_rope(*[a.to(DEVICE) if a is not None else None for a in args()], impl=impl)
