"""Fused EDM2 magnitude-preserving kernels (archirf_kernels.mp) against the float64 spec in
archirf_kernels.reference: every output and every gradient, fp32 and fp16 storage, NCHW, channels_last
and (M, C) rows, odd channel counts, mixed layouts and dtypes, the clip, one output of a two-output op
used, torch.compile(fullgraph=True), torch.library.opcheck, impl dispatch and errors.

On a CPU machine the kernels run in Triton's interpreter (tests/conftest.py), which computes bf16
wrongly: bf16 and EDM2-sized shapes are in tests/test_kernels_gpu_mp.py.
"""

import math

import pytest
import torch

import archirf_kernels as K
from archirf_kernels import mp, reference
from test_kernels_adaln import DEVICE, _randn, assert_compiled_matches, check_against_reference, leaf, run_opcheck

DTYPES = [torch.float32, torch.float16]
CL = torch.channels_last


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every activation buffer the launchers allocate starts as NaN: an unwritten element fails the test."""
    alloc = mp._alloc_like
    monkeypatch.setattr(mp, "_alloc_like", lambda *a, **k: alloc(*a, **k).fill_(float("nan")))


def act(shape, dtype, seed, layout="nchw", std=1.0, mean=0.0):
    """An activation: (B, C, H, W) in NCHW or channels_last, (M, C) rows, or a strided (non-dense) view."""
    if layout == "strided":
        return _randn((shape[0], shape[1] + 3, *shape[2:]), dtype, seed, std, mean)[:, 2:-1]
    t = _randn(shape, dtype, seed, std, mean)
    return t.contiguous(memory_format=CL) if layout == "cl" else t


LAYOUTS = [("nchw", (2, 37, 3, 5)), ("cl", (2, 37, 3, 5)), ("cl", (3, 8, 1, 7)), ("rows", (29, 123)),
           ("strided", (2, 19, 4, 3))]
LAYOUT_IDS = [f"{lay}-{'x'.join(map(str, s))}" for lay, s in LAYOUTS]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,shape", LAYOUTS, ids=LAYOUT_IDS)
def test_normalize(layout, shape, dtype):
    x = act(shape, dtype, 0, layout, std=2.0, mean=0.3)
    check_against_reference(lambda x: K.normalize(x, impl="triton"), lambda x: reference.normalize(x, dim=1),
                            [x], dtype)
    out = K.normalize(x, impl="triton")
    assert out.shape == x.shape and (x.dim() == 2 or layout == "nchw" or out.is_contiguous(memory_format=CL)
                                     or layout == "strided")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,shape", LAYOUTS, ids=LAYOUT_IDS)
def test_normalize_silu(layout, shape, dtype):
    x = act(shape, dtype, 1, layout, std=2.0, mean=-0.2)
    check_against_reference(lambda x: K.normalize_silu(x, eps=1e-3, impl="triton"),
                            lambda x: reference.normalize_silu(x, eps=1e-3), [x], dtype)


@pytest.mark.parametrize("used", [(0,), (1,)], ids=["only-n", "only-silu"])
def test_normalize_silu_one_output_used(used):
    x = act((2, 37, 3, 5), torch.float32, 2, "cl")
    check_against_reference(lambda x: K.normalize_silu(x, impl="triton"), reference.normalize_silu, [x],
                            torch.float32, grad_outputs=used)


def test_normalize_zero_row_is_finite():
    x = leaf(torch.zeros(3, 16, device=DEVICE))
    n = K.normalize(x, impl="triton")
    (dx,) = torch.autograd.grad((n * torch.arange(16.0, device=DEVICE)).sum(), [x])
    assert torch.equal(n, torch.zeros_like(n)) and torch.isfinite(dx).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 3, 5), (7, 123), (3, 4, 5)], ids=str)
def test_mp_silu(shape, dtype):
    x = _randn(shape, dtype, 3, std=3.0)
    check_against_reference(lambda x: K.mp_silu(x, impl="triton"), reference.mp_silu, [x], dtype)


@pytest.mark.parametrize("clip", [None, 2.5], ids=["no-clip", "clip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("cl", "cl"), ("cl", "nchw"), ("strided", "cl")],
                         ids=lambda v: "-".join(v))
def test_mp_sum(layouts, dtype, clip):
    shape = (2, 19, 4, 3)
    a, b = act(shape, dtype, 4, layouts[0], std=2.0), act(shape, dtype, 5, layouts[1], std=2.0)
    out = K.mp_sum(a, b, 0.3, clip, impl="triton")
    if clip is not None:
        assert (out.abs() == clip).any() and (out.abs() < clip).any()    # the clip is exercised both ways
    check_against_reference(lambda a, b: K.mp_sum(a, b, 0.3, clip, impl="triton"),
                            lambda a, b: reference.mp_sum(a, b, 0.3, clip), [a, b], dtype)


def test_mp_sum_mixed_dtypes():
    # fp16 stream, fp32 branch: the output (and a's gradient) in fp16, b's gradient in fp32
    a, b = _randn((2, 5, 3, 3), torch.float16, 6), _randn((2, 5, 3, 3), torch.float32, 7)
    check_against_reference(lambda a, b: K.mp_sum(a, b, 0.7, impl="triton"),
                            lambda a, b: reference.mp_sum(a, b, 0.7), [a, b], torch.float16)


@pytest.mark.parametrize("cond_dtype", [None, torch.float32], ids=["same-dtype", "fp32-cond"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,shape", [lay for lay in LAYOUTS if lay[0] != "rows"],
                         ids=[i for i, lay in zip(LAYOUT_IDS, LAYOUTS) if lay[0] != "rows"])
def test_modulated_silu(layout, shape, dtype, cond_dtype):
    y = act(shape, dtype, 8, layout, std=2.0)
    c = _randn(shape[:2], cond_dtype or dtype, 9, std=0.5, mean=1.0)
    check_against_reference(lambda y, c: K.modulated_silu(y, c, impl="triton"), reference.modulated_silu,
                            [y, c], dtype)


@pytest.mark.parametrize("t", [0.5, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layouts,ca,cb", [(("cl", "cl"), 37, 19), (("nchw", "nchw"), 5, 12),
                                           (("cl", "nchw"), 8, 8), (("rows", "rows"), 33, 7),
                                           (("strided", "cl"), 19, 6)], ids=str)
def test_mp_cat(layouts, ca, cb, dtype, t):
    spatial = () if layouts[0] == "rows" else (3, 5)
    a = act((2, ca, *spatial) if spatial else (11, ca), dtype, 10, layouts[0])
    b = act((2, cb, *spatial) if spatial else (11, cb), dtype, 11, layouts[1])
    check_against_reference(lambda a, b: K.mp_cat(a, b, t, impl="triton"),
                            lambda a, b: reference.mp_cat(a, b, t), [a, b], dtype)
    check_against_reference(lambda a, b: K.mp_cat_silu(a, b, t, impl="triton"),
                            lambda a, b: reference.mp_cat_silu(a, b, t), [a, b], dtype)
    x = K.mp_cat(a, b, t, impl="triton")
    assert x.shape[1] == ca + cb and (layouts[0] != "cl" or x.is_contiguous(memory_format=CL))


@pytest.mark.parametrize("used", [(0,), (1,)], ids=["only-cat", "only-silu"])
def test_mp_cat_silu_one_output_used(used):
    a, b = act((2, 9, 3, 5), torch.float32, 12, "cl"), act((2, 4, 3, 5), torch.float32, 13, "cl")
    check_against_reference(lambda a, b: K.mp_cat_silu(a, b, impl="triton"), reference.mp_cat_silu, [a, b],
                            torch.float32, grad_outputs=used)


@pytest.mark.parametrize("with_gain", [False, True], ids=["gain-1", "learned-gain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (9, 130), (1, 3), (4, 200, 1, 1)], ids=str)
def test_mp_weight(shape, dtype, with_gain):
    w = _randn(shape, dtype, 14, std=0.7)
    gain = _randn((1,), dtype, 15, mean=0.5) if with_gain else None
    check_against_reference(lambda w, g: K.mp_weight(w, g, impl="triton"), reference.mp_weight, [w, gain], dtype)
    w_eff = K.mp_weight(w.float(), impl="triton")        # unit-norm rows: |w' x| = |x| for a unit-RMS row
    torch.testing.assert_close(w_eff.flatten(1).norm(dim=1), torch.ones(shape[0], device=DEVICE),
                               atol=1e-3, rtol=0)


@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (9, 130), (3, 1)], ids=str)
def test_normalize_weight_in_place(shape):
    w = _randn(shape, torch.float32, 16, std=3.0)
    expected = reference.normalize(w.double(), dim=None).float()
    out = K.normalize_weight_(w, impl="triton")
    assert out is w
    torch.testing.assert_close(w, expected, atol=2e-6, rtol=2e-6)
    rms = w.flatten(1).square().mean(1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    before = w.clone()
    K.normalize_weight_(w, impl="triton")                 # idempotent up to eps
    torch.testing.assert_close(w, before, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# torch.compile, custom-op checks

class TinyBlock(torch.nn.Module):
    """An EDM2-like block on channels_last activations, built from every op (fused or reference)."""

    def __init__(self, C, impl):
        super().__init__()
        self.impl = impl
        self.w0 = torch.nn.Parameter(torch.randn(C, C, 3, 3))
        self.w1 = torch.nn.Parameter(torch.randn(C, 2 * C, 1, 1))
        self.gain = torch.nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x, skip, c):
        i = self.impl
        n, s = K.normalize_silu(x, impl=i)
        y = torch.nn.functional.conv2d(s, K.mp_weight(self.w0, impl=i), padding=1)
        y = K.modulated_silu(y, c, impl=i)
        x = K.mp_sum(n, y, 0.3, clip=4.0, impl=i)
        x, s = K.mp_cat_silu(x, skip, impl=i)
        x = K.mp_sum(torch.nn.functional.conv2d(s, K.mp_weight(self.w1, self.gain, impl=i)),
                     K.mp_silu(K.normalize(x, impl=i)[:, :x.shape[1] // 2], impl=i), impl=i)
        return K.mp_cat(x, skip, impl=i)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch-internal
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager_and_reference(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    C = 6
    block = TinyBlock(C, "triton").to(DEVICE)
    ref = TinyBlock(C, "reference").to(DEVICE)
    ref.load_state_dict(block.state_dict())
    x, skip = act((2, C, 5, 4), torch.float32, 0, "cl"), act((2, C, 5, 4), torch.float32, 1, "cl")
    c = _randn((2, C), torch.float32, 2, mean=1.0)
    assert_compiled_matches(block, (x, skip, c), backend, atol=1e-4, rtol=1e-4, eager=ref)


def test_reference_ops_are_the_papers_formulas():
    # The reference every kernel is checked against, written out from EDM2's equations (fp64): mp_silu
    # (Eq. 81), mp_sum (Eq. 88), mp_cat (Eq. 103) with unequal widths and t != 1/2, normalize (Eq. 66).
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 3, 5, 5, generator=g, dtype=torch.float64)
    b = torch.randn(64, 7, 5, 5, generator=g, dtype=torch.float64)
    t = 0.3
    share = t ** 2 / ((1 - t) ** 2 + t ** 2)                # b's share of mp_cat's energy
    torch.testing.assert_close(reference.mp_silu(a), a * torch.sigmoid(a) / 0.596)
    torch.testing.assert_close(reference.mp_sum(a, a.flip(0), t),
                               ((1 - t) * a + t * a.flip(0)) / math.sqrt((1 - t) ** 2 + t ** 2))
    scale = math.sqrt((3 + 7) / ((1 - t) ** 2 + t ** 2))
    expected = torch.cat([scale * (1 - t) / math.sqrt(3) * a, scale * t / math.sqrt(7) * b], dim=1)
    torch.testing.assert_close(reference.mp_cat(a, b, t), expected)
    cat = reference.mp_cat(a, b, t)                         # unit inputs -> unit output
    assert cat.square().mean().item() == pytest.approx(1.0, rel=0.05)
    assert cat[:, 3:].square().sum().item() / cat.square().sum().item() == pytest.approx(share, rel=0.05)
    norm = a.square().sum(dim=1, keepdim=True).sqrt()        # pixel norm: eps + |x| sqrt(1/C), eps 1e-4
    torch.testing.assert_close(reference.normalize(a), a / (1e-4 + norm * math.sqrt(1 / 3)))


def _opcheck_cases():
    ops = torch.ops.archirf_kernels
    x_cl = act((2, 6, 3, 4), torch.float32, 0, "cl")
    x = act((2, 6, 3, 4), torch.float32, 1)
    rows = _randn((5, 7), torch.float32, 2)
    c = _randn((2, 6), torch.float32, 3)
    w, gain = _randn((4, 6, 3, 3), torch.float32, 4), _randn((1,), torch.float32, 5)
    yield ops.mp_normalize.default, (x_cl, 1e-4)
    yield ops.mp_normalize.default, (rows, 1e-4)
    yield ops.mp_normalize_silu.default, (x, 1e-4)
    yield ops.mp_silu.default, (x_cl,)
    yield ops.mp_sum.default, (x_cl, x, 0.3, 1.0)
    yield ops.mp_sum.default, (x, x, 0.5, None)
    yield ops.mp_modulated_silu.default, (x_cl, c)
    yield ops.mp_cat.default, (x_cl, x_cl[:, :2], 0.5)
    yield ops.mp_cat_silu.default, (x, x[:, :3], 0.3)
    yield ops.mp_weight.default, (w, gain, 1e-4)
    yield ops.mp_weight.default, (w, None, 1e-4)
    yield ops.mp_normalize_backward.default, (x_cl, None, x_cl, 1e-4)
    yield ops.mp_cat_backward.default, (None, x_cl, x_cl, 2, 0.5, torch.float32, torch.float32)


@pytest.mark.parametrize("case", range(13))
def test_opcheck(case):
    run_opcheck(*list(_opcheck_cases())[case])


# ---------------------------------------------------------------------------------------------
# impl dispatch and errors

def test_impl_auto_uses_the_reference_off_cuda(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path ran")
    for name in ("normalize", "normalize_silu", "mp_sum", "mp_weight"):
        monkeypatch.setattr(mp, name, fail)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(K.normalize(x), reference.normalize(x), atol=0, rtol=0)
    torch.testing.assert_close(K.normalize_silu(x, impl="reference"), reference.normalize_silu(x), atol=0, rtol=0)
    torch.testing.assert_close(K.mp_sum(x, x, 0.3), reference.mp_sum(x, x, 0.3), atol=0, rtol=0)
    torch.testing.assert_close(K.mp_weight(x), reference.mp_weight(x), atol=0, rtol=0)


# The same argument checks on both paths: a call the CPU fallback accepts is one the GPU accepts.
@pytest.mark.parametrize("call,match", [
    (lambda impl: K.normalize(torch.randn(2, 3, 4), impl=impl), r"x must be \(M, C\) rows or \(B, C, H, W\)"),
    (lambda impl: K.normalize(torch.randn(2, 3).double(), impl=impl), "x dtype torch.float64 is not fp16"),
    (lambda impl: K.mp_silu(torch.arange(6), impl=impl), "mp_silu: x dtype torch.int64 is not fp16"),
    (lambda impl: K.normalize_silu(torch.ones(2, 3, 4, 4, dtype=torch.int32), impl=impl), "x dtype torch.int32"),
    (lambda impl: K.modulated_silu(torch.randn(2, 3, 4, 4), torch.randn(2, 4), impl=impl),
     r"c must be \(B, C\) = \(2, 3\)"),
    (lambda impl: K.modulated_silu(torch.randn(2, 3, 4, 4), torch.ones(2, 3, dtype=torch.long), impl=impl),
     "c dtype torch.int64"),
    (lambda impl: K.mp_sum(torch.randn(2, 3), torch.randn(3, 2), impl=impl), "differ in shape"),
    (lambda impl: K.mp_sum(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.long), impl=impl), "b dtype torch.int64"),
    (lambda impl: K.mp_sum(torch.randn(2, 3), torch.randn(2, 3), clip=0.0, impl=impl), "clip must be > 0"),
    (lambda impl: K.mp_sum(torch.randn(2, 3), torch.randn(2, 3, device="meta"), impl=impl), "b is on meta, a on cpu"),
    (lambda impl: K.mp_weight(torch.randn(5, 3), torch.ones((), device="meta"), impl=impl), "gain is on meta"),
    (lambda impl: K.mp_cat(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5), impl=impl),
     "must agree in every dim but the channels"),
    (lambda impl: K.mp_cat_silu(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4).long(), impl=impl),
     "mp_cat_silu: b dtype torch.int64"),
    (lambda impl: K.mp_weight(torch.randn(5), impl=impl), ">= 2 dims"),
    (lambda impl: K.mp_weight(torch.randn(5, 3), torch.randn(2), impl=impl), "gain must hold one number"),
    (lambda impl: K.normalize_weight_(torch.ones(5, 3, dtype=torch.long), impl=impl),
     "normalize_weight_: w dtype torch.int64"),
])
@pytest.mark.parametrize("impl", ["triton", "auto"])
def test_errors(call, match, impl):
    if DEVICE == "cuda":
        pytest.skip("the calls build CPU tensors")
    with pytest.raises(ValueError, match=match):
        call(impl)


def test_triton_row_limit():
    if DEVICE == "cuda":
        pytest.skip("the call builds CPU tensors")
    with pytest.raises(ValueError, match="exceed the fused row limit"):
        K.normalize(torch.randn(2, 20000), impl="triton")


def test_needs_cuda_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(mp, "INTERPRETED", False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        mp.normalize(torch.randn(2, 3))
