"""Fused EDM2 MP kernels on the GPU: bf16 / fp16 / fp32 numerics at EDM2 shapes in both memory formats,
mixed dtypes, determinism, the forced weight norm in place, and the EDM2 UNet under bf16 autocast
(fused vs reference, eager and compiled per block). Runs only where CUDA is present; the criterion is
tests/test_kernels_gpu.py's: every output and gradient within twice PyTorch's own error against the
float64 spec (plus a few ulps). About a minute on an H100.

    pytest tests/test_kernels_gpu_mp.py -q
"""

import pytest
import torch

import archirf_kernels as K
from archirf_kernels import reference
from test_kernels_gpu import _randn, _run, check

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(8, 192, 64, 64), (16, 576, 16, 16), (3, 77, 13, 11)]      # EDM2-S 64x64 and 16x16 levels, odd
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FORMATS = {"cl": torch.channels_last, "nchw": torch.contiguous_format}


def act(shape, dtype, seed, fmt="cl", std=1.0, mean=0.0):
    return _randn(shape, dtype, seed, std, mean).contiguous(memory_format=FORMATS[fmt])


def ids(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v).removeprefix("torch.")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_normalize_silu_and_normalize_gpu(shape, dtype, fmt):
    x = act(shape, dtype, 0, fmt, std=2.0, mean=0.3)
    check(lambda x: K.normalize_silu(x, impl="triton"), reference.normalize_silu, [x])
    check(lambda x: K.normalize(x, impl="triton"), reference.normalize, [x])


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_normalize_attention_rows_gpu(dtype):
    rows = _randn((16 * 256 * 3 * 9, 64), dtype, 1, std=3.0)       # q, k, v of 9 heads at 16x16
    check(lambda x: K.normalize(x, impl="triton"), reference.normalize, [rows])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_elementwise_gpu(shape, dtype, fmt):
    a, b = act(shape, dtype, 2, fmt, std=2.0), act(shape, dtype, 3, fmt, std=2.0)
    check(lambda x: K.mp_silu(x, impl="triton"), reference.mp_silu, [a])
    check(lambda a, b: K.mp_sum(a, b, 0.3, impl="triton"), lambda a, b: reference.mp_sum(a, b, 0.3), [a, b])
    # The clip's gradient mask comes from the stored output, so a sum that rounds onto +-clip in the
    # storage dtype counts as clipped; the float64 reference decides on the exact value. Keep the
    # sums out of that band (a few storage ulps wide) so the test checks the op, not the tie-break.
    exact = reference.mp_sum(a.double(), b.double(), 0.3).abs()
    near = (exact - 2.0).abs() < 8 * torch.finfo(dtype).eps * 2.0
    a, b = a.masked_fill(near, 0.0), b.masked_fill(near, 0.0)
    check(lambda a, b: K.mp_sum(a, b, 0.3, clip=2.0, impl="triton"),
          lambda a, b: reference.mp_sum(a, b, 0.3, clip=2.0), [a, b])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_modulated_silu_gpu(shape, dtype, fmt):
    y = act(shape, dtype, 4, fmt, std=2.0)
    for cond_dtype in {dtype, torch.float32}:
        c = _randn(shape[:2], cond_dtype, 5, std=0.5, mean=1.0)
        check(lambda y, c: K.modulated_silu(y, c, impl="triton"), reference.modulated_silu, [y, c])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_mp_cat_gpu(shape, dtype, fmt):
    a = act(shape, dtype, 6, fmt)
    b = act((shape[0], shape[1] // 2 + 1, *shape[2:]), dtype, 7, fmt)
    check(lambda a, b: K.mp_cat_silu(a, b, impl="triton"), reference.mp_cat_silu, [a, b])
    check(lambda a, b: K.mp_cat(a, b, 0.3, impl="triton"), lambda a, b: reference.mp_cat(a, b, 0.3), [a, b])


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("shape", [(576, 576, 3, 3), (768, 1536, 1, 1), (1, 128), (192, 3584, 3, 3)], ids=ids)
def test_mp_weight_gpu(shape, dtype):
    w = _randn(shape, dtype, 8, std=0.7)
    check(lambda w: K.mp_weight(w, impl="triton"), reference.mp_weight, [w])
    gain = _randn((1,), torch.float32, 9, mean=0.5)
    check(lambda w, g: K.mp_weight(w, g, impl="triton"), reference.mp_weight, [w, gain])


@pytest.mark.parametrize("shape", [(576, 576, 3, 3), (192, 3584, 3, 3), (3, 1)], ids=ids)
def test_normalize_weight_in_place_gpu(shape):
    w = _randn(shape, torch.float32, 10, std=3.0)
    want = reference.normalize(w.double(), dim=None).float()
    assert K.normalize_weight_(w, impl="triton") is w
    torch.testing.assert_close(w, want, atol=2e-6, rtol=2e-6)


def test_backward_is_deterministic():
    y, c = act((16, 576, 16, 16), torch.bfloat16, 11), _randn((16, 576), torch.float32, 12, mean=1.0)
    w, gain = _randn((576, 576, 3, 3), torch.bfloat16, 13), _randn((1,), torch.float32, 14)
    cots = {0: _randn((16, 576, 16, 16), torch.float64, 15)}
    first, second = (_run(lambda y, c: K.modulated_silu(y, c, impl="triton"), [y, c], cots, (0,)) for _ in range(2))
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)
    cots = {0: _randn(w.shape, torch.float64, 16)}
    first, second = (_run(lambda w, g: K.mp_weight(w, g, impl="triton"), [w, gain], cots, (0,)) for _ in range(2))
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


def _edm2(kernels, **kw):
    from archirf.models import EDM2UNet
    torch.manual_seed(0)
    m = EDM2UNet(input_size=32, in_channels=4, num_classes=10, channels=64, channel_mult=(1, 2, 2),
                 num_res_blocks=2, attn_resolutions=(16, 8), preconditioning="edm", uncertainty_weighting=True,
                 class_dropout_prob=0.0, kernels=kernels, **kw).cuda()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("gain"):
                p.fill_(0.7)                                       # off the zero init: every path carries signal
    return m


def _inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 4, 32, 32, device="cuda", generator=g)
    return x, torch.rand(8, device="cuda", generator=g), torch.randint(0, 11, (8,), device="cuda", generator=g)


def test_edm2_bf16_autocast_fused_is_as_accurate_as_reference():
    from archirf.objectives.rectified_flow import regression_loss
    x, t, y = _inputs()

    def run(kernels, autocast):
        m = _edm2(kernels)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out, logvar = m(x, t, y, return_logvar=True)
        regression_loss((out.float(), logvar), x).mean().backward()
        return torch.cat([out.detach().float().flatten()] + [p.grad.flatten() for p in m.parameters()])

    truth = run("reference", autocast=False)
    err_ref = (run("reference", autocast=True) - truth).norm() / truth.norm()
    err_fused = (run("triton", autocast=True) - truth).norm() / truth.norm()
    assert err_fused <= 1.5 * err_ref + 1e-4, (err_fused, err_ref)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_edm2_blocks_compile_fullgraph_with_kernels_on_cuda(channels_last):
    torch._dynamo.reset()
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 64)
    x, t, y = _inputs()
    eager, compiled = _edm2("triton", channels_last=channels_last), _edm2("triton", channels_last=channels_last)
    for block in compiled.blocks:
        block.compile(fullgraph=True)
    outs = []
    for m in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x, t, y)
        out.float().square().mean().backward()
        # the uncertainty head's parameters get no gradient without return_logvar: count them as zeros
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in m.parameters()]
        outs.append(torch.cat([out.detach().float().flatten()] + grads))
    assert ((outs[1] - outs[0]).norm() / outs[0].norm()).item() < 2e-2
