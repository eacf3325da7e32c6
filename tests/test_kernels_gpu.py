"""Fused adaLN kernels on the GPU: bf16 / fp16 / fp32 numerics at DiT shapes, mixed dtypes, determinism,
and a DiT under bf16 autocast. Runs only where CUDA is present (tests/conftest.py then leaves
TRITON_INTERPRET unset, so these are the compiled kernels); the interpreter computes bf16 wrongly,
which is why these checks cannot run on the CPU.

Criterion, for every output and every gradient: the kernel's max error against the float64 spec is
at most twice that of the spec itself run on the same low-precision inputs (fp32 math, outputs
rounded to the storage dtype, i.e. what PyTorch would give), plus a few ulps.

    pytest tests/test_kernels_gpu.py -q
"""

import pytest
import torch

import archirf_kernels as K
from archirf_kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(64, 256, 1152), (16, 1024, 1536), (5, 333, 1111)]       # DiT-XL/2 at 256², MMDiT-ish, odd
DTYPES = {                                                         # (activations, modulation and affine)
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "fp32": (torch.float32, torch.float32),
    "bf16-act-fp32-mod": (torch.bfloat16, torch.float32),
    "fp32-act-bf16-mod": (torch.float32, torch.bfloat16),          # DiT under autocast: fp32 stream
}


def _randn(shape, dtype, seed, std=1.0, mean=0.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (mean + std * torch.randn(shape, generator=g, device="cuda")).to(dtype)


def _conditioning(per_token, B, N, C, dtype, seed):
    if per_token:
        return _randn((B, N, C), dtype, seed, std=0.5)
    return _randn((B, 1, 3 * C), dtype, seed, std=0.5)[..., C:2 * C]       # a chunk, as DiT passes it


def _run(fn, inputs, cotangents, used):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((outs[i].double() * cotangents[i]).sum() for i in used)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], materialize_grads=True)
    return [o.detach() for o in outs], list(grads)


def assert_within_pytorch_error(kernel, pytorch, exact):
    """Each (outputs, input grads) pair: the kernel's results are finite, of PyTorch's dtype and shape, and
    within 2x PyTorch's own low-precision error (+ 4 ulps) of the float64 ones."""
    (outs_t, grads_t), (outs_l, grads_l), (outs_r, grads_r) = kernel, pytorch, exact
    names = [f"output {i}" for i in range(len(outs_t))] + [f"grad of input {i}" for i in range(len(grads_t))]
    for name, got, low, want in zip(names, outs_t + grads_t, outs_l + grads_l, outs_r + grads_r):
        assert got.dtype == low.dtype and got.shape == low.shape, (name, got.dtype, low.dtype)
        assert torch.isfinite(got).all(), name
        scale = max(1.0, want.abs().max().item())
        err = (got.double() - want).abs().max().item()
        err_low = (low.double() - want).abs().max().item()
        bound = 2 * err_low + 4 * torch.finfo(got.dtype).eps * scale
        assert err <= bound, f"{name} ({got.dtype}): kernel error {err:.3g} > {bound:.3g} (PyTorch's {err_low:.3g})"


def check(triton_fn, reference_fn, inputs, seed=0, used=None):
    outs_t = None
    probe = reference_fn(*inputs)
    probe = probe if isinstance(probe, tuple) else (probe,)
    used = range(len(probe)) if used is None else used
    cots = {i: _randn(probe[i].shape, torch.float64, seed + 100 + i) for i in used}
    outs_t, grads_t = _run(triton_fn, inputs, cots, used)
    outs_l, grads_l = _run(reference_fn, inputs, cots, used)
    outs_r, grads_r = _run(reference_fn, [t.double() if t is not None else None for t in inputs], cots, used)
    assert_within_pytorch_error((outs_t, grads_t), (outs_l, grads_l), (outs_r, grads_r))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
def test_gated_residual_ada_layer_norm_gpu(shape, dtypes, per_token):
    (act, mod), (B, N, C) = DTYPES[dtypes], shape
    inputs = [_randn((B, N, C), act, 0, std=2.0, mean=0.5), _randn((B, N, C), act, 1),
              _conditioning(not per_token, B, N, C, mod, 2),      # gate in the other layout
              _conditioning(per_token, B, N, C, mod, 3), _conditioning(per_token, B, N, C, mod, 4)]
    check(lambda *a: K.gated_residual_ada_layer_norm(*a, impl="triton"),
          reference.gated_residual_ada_layer_norm, inputs)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("norm,affine", [("layer", False), ("layer", True), ("rms", True)])
def test_ada_layer_norm_gpu(shape, dtypes, norm, affine):
    (act, mod), (B, N, C) = DTYPES[dtypes], shape
    weight = _randn((C,), mod, 5, std=0.3, mean=1.0) if affine else None
    bias = _randn((C,), mod, 6, std=0.3) if affine and norm == "layer" else None
    inputs = [_randn((B, N, C), act, 0, std=2.0, mean=0.5), _conditioning(False, B, N, C, mod, 3),
              _conditioning(False, B, N, C, mod, 4), weight, bias]
    check(lambda *a: K.ada_layer_norm(*a, norm=norm, impl="triton"),
          lambda *a: reference.ada_layer_norm(*a, norm=norm), inputs)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
def test_gated_residual_gpu(shape, dtypes, per_token):
    (act, mod), (B, N, C) = DTYPES[dtypes], shape
    inputs = [_randn((B, N, C), act, 0), _randn((B, N, C), act, 1), _conditioning(per_token, B, N, C, mod, 2)]
    check(lambda *a: K.gated_residual(*a, impl="triton"), reference.gated_residual, inputs)


def test_backward_is_deterministic():
    # Sums over tokens go through per-program partial rows and torch.sum, not atomics: same bits every run.
    B, N, C = 64, 256, 1152
    inputs = [_randn((B, N, C), torch.bfloat16, 0), _randn((B, N, C), torch.bfloat16, 1),
              *(_conditioning(False, B, N, C, torch.float32, s) for s in (2, 3, 4))]
    cots = {0: _randn((B, N, C), torch.float64, 7), 1: _randn((B, N, C), torch.float64, 8)}
    def fn(*a):
        return K.gated_residual_ada_layer_norm(*a, impl="triton")
    first, second = _run(fn, inputs, cots, (0, 1)), _run(fn, inputs, cots, (0, 1))
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


def test_dit_bf16_autocast_fused_is_as_accurate_as_reference():
    # The training configuration: fp32 residual stream and parameters, bf16 autocast, so the kernels see
    # fp32 x with bf16 y / gate / shift / scale. Ground truth: the reference model in fp32, no autocast.
    from archirf.models import DiT

    def model(kernels):
        torch.manual_seed(0)
        m = DiT(input_size=16, in_channels=4, num_classes=10, patch_size=2, hidden_size=384, depth=2,
                num_heads=6, class_dropout_prob=0.0, kernels=kernels).cuda()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)      # off the adaLN-Zero init, so all paths carry signal
        return m

    assert_bf16_as_accurate(model, baseline="reference", fused="triton")


def assert_bf16_as_accurate(make, baseline: str, fused: str):
    """make(choice) builds a DiT-shaped model (16x16x4 input, 10 classes). Output and parameter gradients
    under bf16 autocast with `fused` are as close to make("reference") in fp32 without autocast (the
    ground truth) as with `baseline`: relative error within 1.5x + 1e-4."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 4, 16, 16, device="cuda", generator=g)
    t, y = torch.rand(8, device="cuda", generator=g), torch.randint(0, 10, (8,), device="cuda", generator=g)

    def run(choice, autocast):
        m = make(choice)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = m(x, t, y)
        out.float().square().mean().backward()
        return torch.cat([out.detach().float().flatten()] + [p.grad.flatten() for p in m.parameters()])

    truth = run("reference", autocast=False)
    err_base = (run(baseline, autocast=True) - truth).norm() / truth.norm()
    err_fused = (run(fused, autocast=True) - truth).norm() / truth.norm()
    assert err_fused <= 1.5 * err_base + 1e-4, (err_fused, err_base)


def test_dit_compiles_fullgraph_with_kernels_on_cuda():
    from archirf.models import DiT
    torch._dynamo.reset()
    # kernels="triton": the custom ops inside the compiled graph too ("auto" leaves adaLN to inductor there)
    m = DiT(input_size=16, in_channels=4, num_classes=10, patch_size=2, hidden_size=384, depth=2, num_heads=6,
            kernels="triton").cuda()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x, t, y = torch.randn(4, 4, 16, 16, device="cuda"), torch.rand(4, device="cuda"), torch.arange(4, device="cuda")
    compiled = torch.compile(m, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager, comp = m.eval()(x, t, y), compiled(x, t, y)
    torch.testing.assert_close(comp.float(), eager.float(), atol=2e-2, rtol=2e-2)


def _compiled_code(fn):
    """(fn's result, the code torch.compile generated for it): caches off, so that the code is made now."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        result, code = run_and_get_code(fn)
    return result, "\n".join(code)


def assert_traced(code: str, kernels):
    """The compiled code calls no archirf_kernels op through the dispatcher and defines or launches each kernel
    (a name, not a comment that mentions it)."""
    import re

    assert "archirf_kernels." not in code, "an op was called through the dispatcher instead of traced"
    for kernel in kernels:
        assert re.search(rf"['\"]{kernel}\w*['\"]|\b{kernel}\w*\.run\(|\b{kernel}\w*\s*=", code), \
            f"{kernel} is not launched by the compiled code"


@pytest.mark.parametrize("shape", [(4, 77, 1111), (8, 256, 384)], ids=lambda s: "x".join(map(str, s)))
def test_ops_are_traced_into_compiled_code(shape):
    # On a GPU the ops are triton_ops (kernels/registry.py): torch.compile must launch our kernels from its own
    # code, not call the ops through the dispatcher, and give what the eager ops give (forward and backward).
    B, N, C = shape
    act, mod = torch.bfloat16, torch.float32

    def block(x, y, gate, shift, scale, y2, gate2, shift2, scale2):
        x, h = K.gated_residual_ada_layer_norm(x, y, gate, shift, scale, impl="triton")
        x = K.gated_residual(x, h * y2, gate2, impl="triton")
        return K.ada_layer_norm(x, shift2, scale2, norm="rms", impl="triton"), x

    inputs = [_randn((B, N, C), act, 0, std=2.0, mean=0.5), _randn((B, N, C), act, 1),
              *(_conditioning(False, B, N, C, mod, s) for s in (2, 3, 4)), _randn((B, N, C), act, 5),
              *(_conditioning(per_token, B, N, C, mod, s) for per_token, s in ((True, 6), (False, 7), (False, 8)))]
    cots = {0: _randn((B, N, C), torch.float64, 9), 1: _randn((B, N, C), torch.float64, 10)}
    compiled = torch.compile(block, fullgraph=True)
    got, code = _compiled_code(lambda: _run(compiled, inputs, cots, (0, 1)))
    assert_traced(code, ("_ada_norm_fwd_kernel", "_ada_norm_bwd_kernel", "_gated_residual_fwd_kernel",
                         "_gated_residual_bwd_kernel", "_sum_partials_kernel"))
    want = _run(block, inputs, cots, (0, 1))
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_traced_ops_with_dynamic_shapes():
    # torch.compile(dynamic=True) hands the launchers symbolic sizes; planning needs ints (registry.ints), so the
    # graph specialises to them. Two token counts, each against the eager op.
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y, g, s, c: K.gated_residual_ada_layer_norm(x, y, g, s, c, impl="triton"),
                             dynamic=True, fullgraph=True)
    for N in (3, 77):
        B, C = 2, 40
        inputs = [_randn((B, N, C), torch.bfloat16, 0), _randn((B, N, C), torch.bfloat16, 1),
                  *(_conditioning(False, B, N, C, torch.float32, s) for s in (2, 3, 4))]
        cots = {0: _randn((B, N, C), torch.float64, 9), 1: _randn((B, N, C), torch.float64, 10)}
        got = _run(compiled, inputs, cots, (0, 1))
        want = _run(lambda *a: K.gated_residual_ada_layer_norm(*a, impl="triton"), inputs, cots, (0, 1))
        for a, b in zip(got[0] + got[1], want[0] + want[1]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_mp_and_rope_ops_are_traced():
    # the EDM2 and RoPE ops go the same way as the adaLN ones (kernels/registry.py)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 64, 8, 8, device="cuda", generator=g).to(memory_format=torch.channels_last)
    b = torch.randn(4, 32, 8, 8, device="cuda", generator=g)
    q = torch.randn(2, 37, 3, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(64, device="cuda", generator=g) * 0.1 + 1
    ang = torch.randn(37, 64, device="cuda", generator=g)
    cos, sin = ang.cos(), ang.sin()

    def f(x, b, q, w):
        n, s = K.normalize_silu(x, impl="triton")
        y = K.mp_cat(s, b, t=0.5, impl="triton")
        return y, K.qk_norm_rope(q, w, cos, sin, impl="triton")

    leaves = [t.detach().clone().requires_grad_() for t in (x, b, q, w)]

    def run(fn, ts):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        outs = fn(*ts)
        sum((o.float() * (i + 1)).sin().sum() for i, o in enumerate(outs)).backward()
        return [o.detach() for o in outs] + [t.grad for t in ts]

    from torch._library.triton import get_triton_kernels_for_op

    from archirf_kernels import mp, rope

    # the compile caches key the compiled code on the kernels each op declares (registry.define)
    assert mp._mp_cat_fwd_kernel in get_triton_kernels_for_op("archirf_kernels::mp_cat")
    assert rope._bwd_kernel in get_triton_kernels_for_op("archirf_kernels::qk_norm_rope_backward")
    got, code = _compiled_code(lambda: run(torch.compile(f, fullgraph=True), leaves))
    assert_traced(code, ("_normalize_fwd_kernel", "_normalize_bwd_kernel", "_mp_cat_fwd_kernel",
                         "_mp_cat_bwd_kernel", "_fwd_kernel", "_bwd_kernel"))
    want = run(f, leaves)
    for a, e in zip(got[:2], want[:2]):         # the outputs: the same kernels on the same inputs
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    for a, e in zip(got[2:], want[2:]):         # the gradients: the loss's sin is inductor's or eager's
        torch.testing.assert_close(a, e)


def test_a_launcher_outside_any_op_runs_under_other_dispatch_modes():
    # EDM2's weight normalisation launches its kernel outside an op; under a FlopCounterMode a kernel wrapped for
    # tracing would be counted and skipped, so launch() wraps only inside a triton_op's decomposition
    from torch.utils.flop_counter import FlopCounterMode

    w = torch.randn(16, 3, 3, 3, device="cuda") * 5
    want = w.clone()
    K.normalize_weight_(want, impl="reference")
    with FlopCounterMode(display=False):
        K.normalize_weight_(w, impl="triton")
    torch.testing.assert_close(w, want)
