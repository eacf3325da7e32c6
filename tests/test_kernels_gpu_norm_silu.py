"""Fused GroupNorm + SiLU and channel RMSNorm + SiLU on the GPU: bf16 / fp16 / fp32 numerics at the
autoencoder's shapes in both memory formats (both GroupNorm launch shapes: whole groups per program at
the seed's 64 x 64 batch 64, the split reduction at 256 x 256 and at B = 1), the residual form, mixed
dtypes, determinism, and LDM ResnetBlocks under bf16 autocast (fused vs reference). Runs only where CUDA
is present; the criterion is tests/test_kernels_gpu.py's: every output and gradient within twice
PyTorch's own error against the float64 spec (plus a few ulps).

    pytest tests/test_kernels_gpu_norm_silu.py -q
"""

import pytest
import torch

import archirf_kernels as K
from archirf_kernels import norm_silu, reference
from test_kernels_gpu import _randn, _run, check

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (shape, groups): the seed AE's 64x64 level at batch 64 (fused), KL-f8's 32x32x512 at batch 8, its
# 256x256x128 level (split; B = 2 to bound the float64 reference's memory), odd shapes at B = 1 and 3
SHAPES = [((64, 128, 64, 64), 32), ((8, 512, 32, 32), 32), ((2, 128, 256, 256), 32), ((1, 96, 37, 29), 32),
          ((3, 40, 13, 11), 8)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FORMATS = {"cl": torch.channels_last, "nchw": torch.contiguous_format}


def act(shape, dtype, seed, fmt="cl", std=1.0, mean=0.0):
    return _randn(shape, dtype, seed, std, mean).contiguous(memory_format=FORMATS[fmt])


def ids(v):
    if isinstance(v, tuple) and isinstance(v[0], tuple):
        return "x".join(map(str, v[0])) + f"-g{v[1]}"
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v).removeprefix("torch.")


def affine(C, dtype, seed):
    return _randn((C,), dtype, seed, std=0.3, mean=1.0), _randn((C,), dtype, seed + 1, std=0.3)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("case", SHAPES, ids=ids)
def test_group_norm_silu_gpu(case, dtype, fmt):
    shape, groups = case
    x = act(shape, dtype, 0, fmt, std=2.0, mean=0.3)
    w, b = affine(shape[1], dtype, 1)
    check(lambda x, w, b: K.group_norm_silu(x, w, b, groups, impl="triton"),
          lambda x, w, b: reference.group_norm_silu(x, w, b, groups), [x, w, b])
    r = act(shape, dtype, 3, fmt)
    check(lambda x, r, w: K.group_norm_silu(x, w, None, groups, residual=r, impl="triton"),
          lambda x, r, w: reference.group_norm_silu(x, w, None, groups, residual=r), [x, r, w])


@pytest.mark.parametrize("fmt", FORMATS)
def test_group_norm_silu_mixed_dtypes_gpu(fmt):
    # bf16 activations (autocast's conv outputs), fp32 residual stream and affine
    x, r = act((16, 256, 32, 32), torch.bfloat16, 4, fmt), act((16, 256, 32, 32), torch.float32, 5, fmt)
    w, b = affine(256, torch.float32, 6)
    check(lambda x, r, w, b: K.group_norm_silu(x, w, b, 32, residual=r, impl="triton"),
          lambda x, r, w, b: reference.group_norm_silu(x, w, b, 32, residual=r), [x, r, w, b])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["fused", "looped", "split"])
def test_group_norm_silu_every_launch_shape_at_one_size(monkeypatch, mode, fmt):
    monkeypatch.setattr(norm_silu, "FUSED_FWD_ELEMENTS", 16384 if mode == "fused" else 0)
    monkeypatch.setattr(norm_silu, "FUSED_BWD_ELEMENTS", 16384 if mode == "fused" else 0)
    monkeypatch.setattr(norm_silu, "LOOPED_WAVES", 0 if mode == "looped" else 1 << 20)
    monkeypatch.setattr(norm_silu, "LOOPED_CHANNELS", 16)
    x = act((64, 256, 32, 32), torch.bfloat16, 7, fmt, std=2.0, mean=-0.5)
    r = act((64, 256, 32, 32), torch.bfloat16, 8, fmt)
    for backward in (False, True):
        plan = norm_silu._group_plan(64, 256, 1024, 32, fmt == "cl", x.device, backward=backward)
        assert (plan.fused, plan.looped) == (mode == "fused", mode == "looped")
    w, b = affine(256, torch.bfloat16, 8)
    check(lambda x, w, b: K.group_norm_silu(x, w, b, 32, impl="triton"),
          lambda x, w, b: reference.group_norm_silu(x, w, b, 32), [x, w, b])
    check(lambda x, r, w, b: K.group_norm_silu(x, w, b, 32, residual=r, impl="triton"),
          lambda x, r, w, b: reference.group_norm_silu(x, w, b, 32, residual=r), [x, r, w, b])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("shape", [(64, 128, 64, 64), (8, 512, 32, 32), (3, 77, 13, 11)], ids=ids)
def test_channel_rms_norm_silu_gpu(shape, dtype, fmt):
    x = act(shape, dtype, 9, fmt, std=2.0, mean=0.3)
    w = _randn((shape[1],), dtype, 10, std=0.3, mean=1.0)
    check(lambda x, w: K.channel_rms_norm_silu(x, w, impl="triton"), reference.channel_rms_norm_silu, [x, w])


@pytest.mark.parametrize("shape", [(1, 128, 256, 256), (64, 128, 64, 64)], ids=ids)
def test_backward_is_deterministic(shape):
    x, r = act(shape, torch.bfloat16, 11), act(shape, torch.bfloat16, 12)
    w, b = affine(shape[1], torch.float32, 13)
    cots = {0: _randn(shape, torch.float64, 14), 1: _randn(shape, torch.float64, 15)}
    fn = lambda x, r, w, b: K.group_norm_silu(x, w, b, 32, residual=r, impl="triton")   # noqa: E731
    first, second = (_run(fn, [x, r, w, b], cots, (0, 1)) for _ in range(2))
    for a, b_ in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b_)
    fn = lambda x, w: K.channel_rms_norm_silu(x, w, impl="triton")   # noqa: E731
    first, second = (_run(fn, [x, w], cots, (0,)) for _ in range(2))
    for a, b_ in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b_)


class ResnetBlocks(torch.nn.Module):
    """LDM ResnetBlocks (conv(silu(norm(x))) twice, plus the skip) chained, the skip's add fused into the
    next block's first norm; the last block with the seed's channel RMSNorm."""

    def __init__(self, C, impl, blocks=3):
        super().__init__()
        self.impl = impl
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(C, C, 3, padding=1) for _ in range(2 * blocks))
        self.w = torch.nn.ParameterList(torch.nn.Parameter(1 + 0.2 * torch.randn(C)) for _ in range(2 * blocks))
        self.b = torch.nn.ParameterList(torch.nn.Parameter(0.2 * torch.randn(C)) for _ in range(2 * blocks - 2))

    def forward(self, x):
        i, h = self.impl, None
        for k in range(0, len(self.convs) - 2, 2):
            if h is None:
                h = K.group_norm_silu(x, self.w[k], self.b[k], 32, impl=i)
            else:
                x, h = K.group_norm_silu(h, self.w[k], self.b[k], 32, residual=x, impl=i)
            h = self.convs[k + 1](K.group_norm_silu(self.convs[k](h), self.w[k + 1], self.b[k + 1], 32, impl=i))
        x = x + h
        h = self.convs[-2](K.channel_rms_norm_silu(x, self.w[-2], impl=i))
        return x + self.convs[-1](K.channel_rms_norm_silu(h, self.w[-1], impl=i))


@pytest.mark.parametrize("fmt", FORMATS)
def test_resnet_blocks_bf16_autocast_fused_is_as_accurate_as_reference(fmt):
    x = act((8, 128, 32, 32), torch.float32, 16, fmt)

    def run(impl, autocast):
        torch.manual_seed(0)
        m = ResnetBlocks(128, impl).cuda().to(memory_format=FORMATS[fmt])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = m(x)
        out.float().square().mean().backward()
        return torch.cat([out.detach().float().flatten()] + [p.grad.flatten() for p in m.parameters()])

    truth = run("reference", autocast=False)
    err_ref = (run("reference", autocast=True) - truth).norm() / truth.norm()
    err_fused = (run("triton", autocast=True) - truth).norm() / truth.norm()
    assert err_fused <= 1.5 * err_ref + 1e-4, (err_fused, err_ref)


def test_resnet_blocks_compile_fullgraph_on_cuda():
    torch._dynamo.reset()
    x = act((8, 128, 32, 32), torch.float32, 17, "cl")
    outs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = ResnetBlocks(128, "triton").cuda().to(memory_format=torch.channels_last)
        if compiled:
            m = torch.compile(m, fullgraph=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
        out.float().square().mean().backward()
        params = m.parameters()
        outs.append(torch.cat([out.detach().float().flatten()] + [p.grad.flatten() for p in params]))
    assert ((outs[1] - outs[0]).norm() / outs[0].norm()).item() < 2e-2
