"""Fused GroupNorm + SiLU and channel RMSNorm + SiLU (archirf_kernels.norm_silu) against the float64 spec
in archirf_kernels.reference: every output and every gradient (x, residual, weight, bias), fp32 and fp16
storage, NCHW and channels_last, both launch shapes of the GroupNorm (whole groups per program, and the
split reduction with its chunk loops), odd shapes (3 channels a group, 1x7 images, B = 1), weight and
bias absent, the residual form with one output used, mixed dtypes, statistics of a large mean,
torch.compile(fullgraph=True), torch.library.opcheck, impl dispatch and errors; and the spec against the
autoencoder's own norms.

On a CPU machine the kernels run in Triton's interpreter (tests/conftest.py), which computes bf16
wrongly: bf16 and the autoencoder's shapes are in tests/test_kernels_gpu_norm_silu.py.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import archirf_kernels as K
from archirf_kernels import norm_silu, reference
from test_kernels_adaln import (DEVICE, _randn, assert_close_to_fp64, assert_compiled_matches,
                                check_against_reference, leaf, run_opcheck)
from test_kernels_mp import act

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the launchers allocate (activations, statistics, partial sums) starts as NaN."""
    alloc = norm_silu._alloc_like
    monkeypatch.setattr(norm_silu, "_alloc_like", lambda *a, **k: alloc(*a, **k).fill_(float("nan")))


@pytest.fixture
def path(request, monkeypatch):
    """Force the GroupNorm's launch shape: "fused" (whole groups per program, in registers), "looped"
    (whole groups per program, looping over pixel tiles) or "split" (the reduction spread over programs)."""
    fused = 1 << 30 if request.param == "fused" else 0
    if DEVICE == "cuda":
        monkeypatch.setattr(norm_silu, "FUSED_FWD_ELEMENTS", fused)
        monkeypatch.setattr(norm_silu, "FUSED_BWD_ELEMENTS", fused)
        monkeypatch.setattr(norm_silu, "_sm_count", lambda device: 1)
        monkeypatch.setattr(norm_silu, "LOOPED_WAVES", 0)
        monkeypatch.setattr(norm_silu, "LOOPED_CHANNELS", 16 if request.param == "looped" else 0)
    else:
        monkeypatch.setitem(norm_silu.INTERPRETER, "fused_elements", fused)
        monkeypatch.setitem(norm_silu.INTERPRETER, "looped", request.param == "looped")
    return request.param


def affine(kind, C, dtype, seed):
    weight = _randn((C,), dtype, seed, std=0.3, mean=1.0) if "w" in kind else None
    bias = _randn((C,), dtype, seed + 1, std=0.3) if "b" in kind else None
    return weight, bias


def gn_call(groups, eps=1e-6, with_residual=False, impl="triton"):
    """(kernel fn, reference fn) over inputs [x, residual, weight, bias] or [x, weight, bias]."""
    if with_residual:
        return (lambda x, r, w, b: K.group_norm_silu(x, w, b, groups, eps, residual=r, impl=impl),
                lambda x, r, w, b: reference.group_norm_silu(x, w, b, groups, eps, residual=r))
    return (lambda x, w, b: K.group_norm_silu(x, w, b, groups, eps, impl=impl),
            lambda x, w, b: reference.group_norm_silu(x, w, b, groups, eps))


# (shape, groups): 3 channels a group; 5 a group, one 1x7 image; 4 a group, 6 groups (channels_last
# programs hold 4 groups: the second block is half empty)
SHAPES = [((2, 96, 3, 5), 32), ((1, 40, 1, 7), 8), ((3, 24, 5, 3), 6)]
AFFINES = ["wb", "w", "", "b"]
# every (dtype, layout, residual, path) combination, cycling shapes and affine kinds; in the interpreter
# a fused program holds 4 groups (one in test_fused_one_group_per_program, as NCHW on a GPU)
GRID = [(dt, lay, res, p, *SHAPES[i % len(SHAPES)], AFFINES[i % len(AFFINES)])
        for i, (dt, lay, res, p) in enumerate(itertools.product(DTYPES, ["nchw", "cl"], [False, True],
                                                                ["fused", "looped", "split"]))]


def case_id(v):
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    if isinstance(v, bool):
        return "residual" if v else "plain"
    return str(v).removeprefix("torch.") if v != "" else "no-affine"


@pytest.mark.parametrize("dtype,layout,with_residual,path,shape,groups,kind", GRID, ids=case_id,
                         indirect=["path"])
def test_group_norm_silu(dtype, layout, with_residual, path, shape, groups, kind):
    x = act(shape, dtype, 0, layout, std=2.0, mean=0.5)
    weight, bias = affine(kind, shape[1], dtype, 5)
    inputs = [x, act(shape, dtype, 1, layout), weight, bias] if with_residual else [x, weight, bias]
    check_against_reference(*gn_call(groups, with_residual=with_residual), inputs, dtype)
    out = gn_call(groups, with_residual=with_residual)[0](*inputs)
    for t in (out if with_residual else (out,)):
        assert t.is_contiguous(memory_format=CL if layout == "cl" else torch.contiguous_format)


@pytest.mark.parametrize("path", ["fused", "looped", "split"], indirect=True)
@pytest.mark.parametrize("used", [(0,), (1,)], ids=["only-s", "only-y"])
def test_group_norm_silu_residual_one_output_used(used, path):
    x, r = act((2, 40, 3, 5), torch.float32, 2, "cl"), act((2, 40, 3, 5), torch.float32, 3, "cl")
    check_against_reference(*gn_call(8, with_residual=True), [x, r, *affine("wb", 40, torch.float32, 4)],
                            torch.float32, grad_outputs=used)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_fused_one_group_per_program(monkeypatch, layout):
    monkeypatch.setitem(norm_silu.INTERPRETER, "groups_per_program", 1)
    x, r = act((2, 24, 3, 5), torch.float32, 4, layout, std=2.0), act((2, 24, 3, 5), torch.float32, 5, layout)
    check_against_reference(*gn_call(6, with_residual=True), [x, r, *affine("wb", 24, torch.float32, 6)],
                            torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_split_reduction_loops(monkeypatch, layout):
    # several chunks of a sample's pixels, each of several tiles (the last chunk and tile short), several
    # channel blocks, and the combine kernels looping over the chunks in blocks of 2
    monkeypatch.setattr(norm_silu, "INTERPRETER", {"fused_elements": 0, "groups_per_program": 4, "tile": 16,
                                                   "programs": 16, "looped": False, "looped_channels": 8})
    monkeypatch.setattr(norm_silu, "_combine_plan", lambda C, G, chunks, device: (4, 2, 32, 4))  # 20 of 32 channels
    shape = (2, 20, 5, 7)
    plan = norm_silu._group_plan(2, 20, 35, 4, layout == "cl", torch.device(DEVICE), backward=False)
    if DEVICE == "cpu":
        s_tiles = -(-35 // plan.block_s)
        assert not plan.fused and 1 < plan.chunk_tiles < s_tiles and s_tiles % plan.chunk_tiles
        assert plan.block_c < 20 and (35 % plan.block_s if layout == "nchw" else 20 % plan.block_c)
    x, r = act(shape, torch.float32, 4, layout, std=2.0, mean=-1.0), act(shape, torch.float32, 5, layout)
    check_against_reference(*gn_call(4, with_residual=True), [x, r, *affine("wb", 20, torch.float32, 6)],
                            torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape,groups", [((2, 20, 5, 7), 4), ((3, 16, 3, 5), 8)], ids=case_id)
def test_looped_pixel_loops(monkeypatch, layout, shape, groups):
    # whole groups per program (one of 5 channels in a block of 8; four of 2 channels) looping over many
    # pixel tiles, the last one short, forward and backward, with the residual's s read back
    monkeypatch.setattr(norm_silu, "INTERPRETER", {"fused_elements": 0, "groups_per_program": 4, "tile": 16,
                                                   "programs": 16, "looped": True, "looped_channels": 8})
    if DEVICE == "cuda":            # the same plan on a GPU: 8 channels a program, tiles of 16 elements
        for name, value in [("FUSED_FWD_ELEMENTS", 0), ("FUSED_BWD_ELEMENTS", 0), ("LOOPED_CHANNELS", 8),
                            ("LOOPED_WAVES", 0), ("TILE_ELEMENTS", 16)]:
            monkeypatch.setattr(norm_silu, name, value)
    C, S = shape[1], shape[2] * shape[3]
    for backward in (False, True):
        plan = norm_silu._group_plan(shape[0], C, S, groups, layout == "cl", torch.device(DEVICE), backward)
        assert plan.looped and not plan.fused and S % plan.block_s and S // plan.block_s > 1
    x, r = act(shape, torch.float32, 4, layout, std=2.0, mean=40.0), act(shape, torch.float32, 5, layout)
    check_against_reference(*gn_call(groups, with_residual=True), [x, r, *affine("wb", C, torch.float32, 6)],
                            torch.float32)


@pytest.mark.parametrize("path", ["fused", "looped", "split"], indirect=True)
@pytest.mark.parametrize("shape", [(2, 8, 1, 2), (3, 4, 1, 1)], ids=case_id)
def test_group_norm_silu_one_channel_groups(path, shape):
    # C == groups, one or two pixels: a group of 1 or 2 elements (on a GPU, integer arguments equal to 1 are
    # compile-time constants)
    x = act(shape, torch.float32, 14, "cl", std=2.0)
    check_against_reference(*gn_call(shape[1]), [x, *affine("wb", shape[1], torch.float32, 15)], torch.float32)


@pytest.mark.parametrize("path", ["fused", "looped", "split"], indirect=True)
def test_group_norm_statistics_of_a_large_mean(path):
    # var = E[(x - mean)^2] with mean 300, std 1: E[x^2] - E[x]^2 in fp32 would lose ~3 of 7 digits
    x = act((2, 16, 8, 8), torch.float32, 6, "cl", std=1.0, mean=300.0)
    out = K.group_norm_silu(x, None, None, 4, impl="triton")
    assert_close_to_fp64("output", out, reference.group_norm_silu(x.double(), None, None, 4), torch.float32, 1e-4)


@pytest.mark.parametrize("path", ["fused", "looped", "split"], indirect=True)
def test_group_norm_silu_mixed_dtypes_and_layouts(path):
    # fp16 channels_last stream, fp32 NCHW residual and fp32 affine: s and y in fp16 and channels_last, the
    # residual's gradient in fp32
    x, r = act((2, 24, 3, 5), torch.float16, 7, "cl"), act((2, 24, 3, 5), torch.float32, 8, "nchw")
    s, y = K.group_norm_silu(x, None, None, 6, residual=r, impl="triton")
    assert s.dtype == y.dtype == torch.float16 and s.is_contiguous(memory_format=CL) and y.is_contiguous(memory_format=CL)
    check_against_reference(*gn_call(6, with_residual=True), [x, r, *affine("wb", 24, torch.float32, 9)],
                            torch.float16)


def test_group_norm_silu_empty_batch():
    x = leaf(torch.randn(0, 8, 3, 3, device=DEVICE))
    w, b = leaf(torch.ones(8, device=DEVICE)), leaf(torch.zeros(8, device=DEVICE))
    s, y = K.group_norm_silu(x, w, b, 4, residual=x, impl="triton")
    dx, dw, db = torch.autograd.grad(y.sum() + s.sum(), [x, w, b])
    assert y.shape == x.shape and dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,shape", [("nchw", (2, 37, 3, 5)), ("cl", (2, 37, 3, 5)), ("cl", (1, 8, 1, 7)),
                                          ("rows", (29, 123)), ("strided", (2, 19, 4, 3))], ids=case_id)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
def test_channel_rms_norm_silu(layout, shape, dtype, with_weight):
    x = act(shape, dtype, 10, layout, std=2.0, mean=0.3)
    weight = _randn((shape[1],), dtype, 11, std=0.3, mean=1.0) if with_weight else None
    check_against_reference(lambda x, w: K.channel_rms_norm_silu(x, w, impl="triton"),
                            reference.channel_rms_norm_silu, [x, weight], dtype)


def test_channel_rms_norm_zero_pixel_is_finite():
    # a pixel whose norm is below eps is scaled by 1 / eps (F.normalize's clamp): finite, its gradient too
    x = act((2, 6, 2, 2), torch.float32, 12, "cl")
    x[0, :, 1, 1] = 0.0
    check_against_reference(lambda x, w: K.channel_rms_norm_silu(x, w, eps=1e-3, impl="triton"),
                            lambda x, w: reference.channel_rms_norm_silu(x, w, eps=1e-3),
                            [x, _randn((6,), torch.float32, 13, mean=1.0)], torch.float32)


def test_reference_is_the_autoencoders_norm_then_silu():
    # The spec against archirf's autoencoder layers: its ChannelRMSNorm bit for bit (fp32), GroupNorm(32, eps 1e-6)
    from archirf.models.autoencoder import ChannelRMSNorm

    torch.manual_seed(0)
    rms, gn = ChannelRMSNorm(96), torch.nn.GroupNorm(32, 96, eps=1e-6)
    with torch.no_grad():
        for p in (rms.weight, gn.weight, gn.bias):
            p.normal_()
    x = torch.randn(2, 96, 5, 3)
    for t in (x, x.contiguous(memory_format=CL)):
        assert torch.equal(reference.channel_rms_norm_silu(t, rms.weight.detach()), F.silu(rms(t)))
        torch.testing.assert_close(reference.group_norm_silu(t, gn.weight.detach(), gn.bias.detach(), 32),
                                   F.silu(gn(t)), atol=1e-6, rtol=1e-6)
    s, y = reference.group_norm_silu(x, None, None, 32, residual=2 * x)
    torch.testing.assert_close(s, 3 * x)
    torch.testing.assert_close(y, F.silu(F.group_norm(3 * x, 32, eps=1e-6)))


# ---------------------------------------------------------------------------------------------
# torch.compile, custom-op checks

class TinyResnetBlocks(torch.nn.Module):
    """Two LDM ResnetBlocks, channels_last: GroupNorm blocks joined by the fused residual add, then an RMSNorm one."""

    def __init__(self, C, impl):
        super().__init__()
        self.impl = impl
        self.conv = torch.nn.ModuleList(torch.nn.Conv2d(C, C, 3, padding=1) for _ in range(3))
        self.norm_w = torch.nn.ParameterList(torch.nn.Parameter(1 + 0.1 * torch.randn(C)) for _ in range(3))
        self.norm_b = torch.nn.ParameterList(torch.nn.Parameter(0.1 * torch.randn(C)) for _ in range(2))

    def forward(self, x):
        i = self.impl
        h = self.conv[0](K.group_norm_silu(x, self.norm_w[0], self.norm_b[0], 4, impl=i))
        x, h = K.group_norm_silu(h, self.norm_w[1], self.norm_b[1], 4, residual=x, impl=i)    # x = x + h
        return x + self.conv[2](K.channel_rms_norm_silu(self.conv[1](h), self.norm_w[2], impl=i))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch-internal
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager_and_reference(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = TinyResnetBlocks(8, "triton").to(DEVICE).to(memory_format=CL)
    ref = TinyResnetBlocks(8, "reference").to(DEVICE).to(memory_format=CL)
    ref.load_state_dict(block.state_dict())
    x = act((2, 8, 5, 4), torch.float32, 0, "cl")
    assert_compiled_matches(block, (x,), backend, atol=1e-4, rtol=1e-4, eager=ref)


def _opcheck_cases():
    ops = torch.ops.archirf_kernels
    x_cl, x = act((2, 8, 3, 4), torch.float32, 0, "cl"), act((2, 8, 3, 4), torch.float32, 1)
    w, b = affine("wb", 8, torch.float32, 2)
    y, mean, rstd = ops.group_norm_silu(x_cl, w, b, 4, 1e-6)
    yield ops.group_norm_silu.default, (x_cl, w, b, 4, 1e-6)
    yield ops.group_norm_silu.default, (x, None, b, 2, 1e-5)
    yield ops.group_norm_silu_residual.default, (x_cl, x, w, None, 4, 1e-6)
    yield ops.group_norm_silu_backward.default, (x_cl, x_cl, x_cl, w, b, mean, rstd, 4, torch.float32)
    yield ops.channel_rms_norm_silu.default, (x_cl, w, 1e-6)
    yield ops.channel_rms_norm_silu_backward.default, (x, x, None, 1e-6)


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    run_opcheck(*list(_opcheck_cases())[case])


# ---------------------------------------------------------------------------------------------
# impl dispatch and errors

def test_impl_auto_uses_the_reference_off_cuda(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("the calls build CPU tensors")

    def fail(*args, **kwargs):
        raise AssertionError("the Triton path ran")
    monkeypatch.setattr(norm_silu, "group_norm_silu", fail)
    monkeypatch.setattr(norm_silu, "channel_rms_norm_silu", fail)
    x, w = torch.randn(2, 8, 3, 3), torch.randn(8)
    torch.testing.assert_close(K.group_norm_silu(x, w, w, 4), reference.group_norm_silu(x, w, w, 4), atol=0, rtol=0)
    s, y = K.group_norm_silu(x, w, None, 2, residual=x, impl="reference")
    torch.testing.assert_close(y, reference.group_norm_silu(2 * x, w, None, 2), atol=0, rtol=0)
    torch.testing.assert_close(K.channel_rms_norm_silu(x, w), reference.channel_rms_norm_silu(x, w), atol=0, rtol=0)


def test_group_norm_kernels_refuse_samples_over_int32_offsets():
    x = torch.empty(1, 2 ** 12, 2 ** 10, 2 ** 9, device="meta")      # 2^31 elements in one sample
    with pytest.raises(ValueError, match=r"one sample holds 2,147,483,648 elements .* use impl='reference'"):
        norm_silu._check_gn(x, None, None, 32, None)
    norm_silu.checks.sample_size("group_norm_silu", x[:, :, :, :-1])     # one element less per row: accepted


# The same argument checks on both paths: a call the CPU fallback accepts is one the GPU accepts.
@pytest.mark.parametrize("call,match", [
    (lambda impl: K.group_norm_silu(torch.randn(2, 30, 3, 3), None, None, 32, impl=impl),
     "C=30 channels are not divisible by groups=32"),
    (lambda impl: K.group_norm_silu(torch.randn(2, 8, 3, 3), None, None, 0, impl=impl), "groups must be a positive int"),
    (lambda impl: K.group_norm_silu(torch.randn(2, 8, 3, 3), None, None, 2.0, impl=impl), "groups must be a positive int"),
    (lambda impl: K.group_norm_silu(torch.randn(2, 8, 9), None, None, 2, impl=impl), r"x must be \(B, C, H, W\)"),
    (lambda impl: K.group_norm_silu(torch.ones(2, 8, 3, 3).long(), None, None, 2, impl=impl),
     "group_norm_silu: x dtype torch.int64"),
    (lambda impl: K.group_norm_silu(torch.randn(2, 8, 3, 3), torch.ones(4), None, 2, impl=impl),
     r"weight must be \(C,\) = \(8,\), got \(4,\)"),
    (lambda impl: K.group_norm_silu(torch.randn(2, 8, 3, 3), None, torch.ones(8).long(), 2, impl=impl),
     "bias dtype torch.int64"),
    (lambda impl: K.group_norm_silu(torch.randn(2, 8, 3, 3), None, None, 2, residual=torch.randn(2, 8, 3, 4),
                                    impl=impl), r"residual has shape \(2, 8, 3, 4\), x has \(2, 8, 3, 3\)"),
    (lambda impl: K.group_norm_silu(torch.randn(2, 8, 3, 3), None, None, 2,
                                    residual=torch.randn(2, 8, 3, 3, device="meta"), impl=impl),
     "residual is on meta, x on cpu"),
    (lambda impl: K.group_norm_silu(torch.randn(2, 8, 3, 3).double(), None, None, 2, impl=impl),
     "x dtype torch.float64 is not fp16"),
    (lambda impl: K.channel_rms_norm_silu(torch.randn(2, 8, 3), impl=impl), r"x must be \(M, C\) rows or \(B, C, H, W\)"),
    (lambda impl: K.channel_rms_norm_silu(torch.randn(2, 8, 3, 3), torch.ones(8, 1), impl=impl),
     r"channel_rms_norm_silu: weight must be \(C,\)"),
    (lambda impl: K.channel_rms_norm_silu(torch.randn(2, 8), torch.ones(8, device="meta"), impl=impl),
     "weight is on meta, x on cpu"),
])
@pytest.mark.parametrize("impl", ["triton", "auto"])
def test_errors(call, match, impl):
    if DEVICE == "cuda":
        pytest.skip("the calls build CPU tensors")
    with pytest.raises(ValueError, match=match):
        call(impl)


def test_unknown_impl_and_row_limit():
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        K.group_norm_silu(torch.randn(2, 8, 3, 3, device=DEVICE), None, None, 2, impl="cuda")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="exceed the fused row limit"):
            K.channel_rms_norm_silu(torch.randn(2, 20000), impl="triton")


def test_needs_cuda_without_the_interpreter(monkeypatch):
    monkeypatch.setattr("archirf_kernels.mp.INTERPRETED", False)       # the device check norm_silu shares
    for call in (lambda: norm_silu.group_norm_silu(torch.randn(2, 8, 3, 3), None, None, 2),
                 lambda: norm_silu.channel_rms_norm_silu(torch.randn(2, 8))):
        with pytest.raises(ValueError, match="need CUDA tensors"):
            call()
