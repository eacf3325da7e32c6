"""Fused QK-RMSNorm + flash attention on the GPU: bf16 / fp16 numerics at DiT-XL (D = 72, split
64 + 16), MMDiT-joint (image blocks straddling into the context stream) and head-dim-128 shapes and an
odd N, every candidate block config of the DiT class, fp32 storage, determinism, and DiT with
attn_impl='triton' under bf16 autocast and torch.compile. Runs only where CUDA is present (the
interpreter computes bf16 wrongly). Autotuning is off (each kernel runs its default config; the
config test forces the others), so that the file takes about a minute on an H100.

Criterion, for the output(s) and every gradient (d(qkv) per stream and the four norm weights): the
kernel's max error against the float64 spec is at most twice that of PyTorch's own low-precision
path on the same inputs -- the models' sdpa path: per-head RMSNorm in fp32 rounded to the storage
dtype, then scaled_dot_product_attention in that dtype (flash / cuDNN / efficient, as dispatched) --
plus a few ulps.
"""

import pytest
import torch
import torch.nn.functional as F

import archirf_kernels as K
from archirf_kernels import attention, reference
from test_kernels_attention import pin_backend
from test_kernels_gpu import assert_bf16_as_accurate, assert_within_pytorch_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = {  # (B, H, N_img, N_ctx, D)
    "dit-xl": (8, 16, 256, 0, 72),               # DiT-XL/2 at 256² (batch 8 of 64: the fp64 reference is big)
    "mmdit-joint": (2, 24, 1008, 77, 64),        # joint: 1008 image + 77 text tokens (blocks straddle)
    "d128": (2, 16, 2048, 0, 128),              # head dim 128, long sequence
    "odd": (3, 5, 333, 0, 64),                   # N not a multiple of any block
}


@pytest.fixture(autouse=True)
def no_autotune(monkeypatch):
    monkeypatch.setattr(attention, "AUTOTUNE", False)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _randn(shape, dtype, seed, std=1.0, mean=0.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (mean + std * torch.randn(shape, generator=g, device="cuda")).to(dtype)


def _inputs(case, dtype):
    B, H, n_img, n_ctx, D = CASES[case]
    qkv = [_randn((B, n_img, 3, H, D), dtype, 0, std=2.0, mean=0.2)]
    if n_ctx:
        qkv.append(_randn((B, n_ctx, 3, H, D), dtype, 1, std=2.0, mean=0.2))
    weights = [_randn((D,), torch.float32, 10 + i, std=0.3, mean=1.0) for i in range(2 * len(qkv))]
    return qkv + weights


def _pytorch_lowp(*args):
    """The models' sdpa path in the storage dtype: RMSNorm (fp32 math, rounded) + SDPA, joint by concat."""
    joint = len(args) == 6
    qkvs, weights = args[:1 + joint], args[1 + joint:]

    def heads(qkv, qw, kw):                                    # -> (B, H, N, D) each
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return reference.rms_norm(q, qw), reference.rms_norm(k, kw), v

    streams = [heads(qkv, weights[2 * i], weights[2 * i + 1]) for i, qkv in enumerate(qkvs)]
    q, k, v = (torch.cat([s[i] for s in streams], dim=2) for i in range(3))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    n = qkvs[0].shape[1]
    return (out[:, :n], out[:, n:]) if joint else out


def _spec(*args):
    if len(args) == 6:
        return reference.joint_qk_norm_attention(*args)
    return reference.qk_norm_attention(*args)


def _fused(*args, backend="fused"):
    if len(args) == 6:
        return K.joint_qk_norm_attention(*args, impl="triton", backend=backend)
    return K.qk_norm_attention(*args, impl="triton", backend=backend)


def _sdpa_backed(*args):
    return _fused(*args, backend="sdpa")


def _run(fn, inputs, cotangents):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * c).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], list(grads)


def check(inputs, seed=0, ours=_fused):
    probe = _spec(*inputs)
    probe = probe if isinstance(probe, tuple) else (probe,)
    cots = [_randn(p.shape, torch.float64, seed + 100 + i) for i, p in enumerate(probe)]
    outs_t, grads_t = _run(ours, inputs, cots)
    outs_l, grads_l = _run(_pytorch_lowp, inputs, cots)
    outs_r, grads_r = _run(_spec, [t.double() for t in inputs], cots)
    assert_within_pytorch_error((outs_t, grads_t), (outs_l, grads_l), (outs_r, grads_r))


# bf16 everywhere; fp16 on the DiT shape (each (dtype, D, joint) is one more compile of five kernels)
@pytest.mark.parametrize("case,dtype", [(c, "bf16") for c in CASES] + [("dit-xl", "fp16")])
@pytest.mark.parametrize("backend", ["fused", "sdpa"])
def test_qk_norm_attention_gpu(case, dtype, backend):
    check(_inputs(case, DTYPES[dtype]), ours=_fused if backend == "fused" else _sdpa_backed)


def _misaligned(fn):
    """fn on copies of the packed projections that start one element past an aligned address: the
    sdpa backend's alignment hint must fall to 1 (a wrong hint would vectorise misaligned accesses)."""
    def run(*args):
        shifted = [torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape) if t.dim() == 5 else t for t in args]
        assert all(t.data_ptr() % 16 for t in shifted if t.dim() == 5)
        return fn(*shifted)
    return run


@pytest.mark.parametrize("case", ["dit-xl", "mmdit-joint"])
def test_sdpa_backend_misaligned_inputs_gpu(case):
    check(_inputs(case, torch.bfloat16), ours=_misaligned(_sdpa_backed))


@pytest.mark.parametrize("index", [1, 2])
def test_every_candidate_config_of_the_dit_class(monkeypatch, index):
    # The default configs run above; here the others of the D = 72 class (what autotuning may pick).
    import triton

    for kernel, candidates in ((attention._attn_fwd_kernel, attention.FWD_CANDIDATES),
                               (attention._attn_bwd_dq_kernel, attention.DQ_CANDIDATES),
                               (attention._attn_bwd_dkdv_kernel, attention.DKDV_CANDIDATES)):
        m, n, w, st = candidates[attention._width_class(72)][index]
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)])
        monkeypatch.setattr(kernel, "cache", {})        # a single config: used without tuning
    qkv = _randn((2, 300, 3, 4, 72), torch.bfloat16, 3, std=2.0, mean=0.2)
    check([qkv, *(_randn((72,), torch.float32, 20 + i, std=0.3, mean=1.0) for i in range(2))])


def test_fp32_storage_is_fp32_accurate():
    # fp32 inputs take dots in three TF32 passes: errors near fp32 rounding, not at one TF32 pass's 1e-3.
    inputs = _inputs("odd", torch.float32)
    probe = _spec(*inputs)
    cot = _randn(probe.shape, torch.float64, 5)
    outs, grads = _run(_fused, inputs, [cot])
    outs64, grads64 = _run(_spec, [t.double() for t in inputs], [cot])
    for got, want in zip(outs + grads, outs64 + grads64):
        assert (got.double() - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


def test_backward_is_deterministic():
    # The weight gradients go through per-program partial rows and torch.sum, not atomics.
    inputs = _inputs("mmdit-joint", torch.bfloat16)
    cots = [_randn((2, 1008, 24 * 64), torch.float64, 7), _randn((2, 77, 24 * 64), torch.float64, 8)]
    first, second = _run(_fused, inputs, cots), _run(_fused, inputs, cots)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


def _dit(attn_impl, kernels="reference", input_size=16):
    from archirf.models import DiT
    torch.manual_seed(0)
    m = DiT(input_size=input_size, in_channels=4, num_classes=10, patch_size=2, hidden_size=384, depth=2, num_heads=6,
            class_dropout_prob=0.0, qk_norm=True, attn_impl=attn_impl, kernels=kernels).cuda()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)          # off the adaLN-Zero init, so all paths carry signal
    return m


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
def test_dit_bf16_autocast_triton_attention_is_as_accurate_as_sdpa(backend, monkeypatch):
    # The training configuration: bf16 autocast, fp32 parameters (the norm weights reach the kernel in
    # fp32, the qkv projection in bf16). Ground truth: the reference model in fp32, no autocast.
    pin_backend(monkeypatch, backend)
    assert_bf16_as_accurate(_dit, baseline="sdpa", fused="triton")


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
@pytest.mark.parametrize("side", [16, 64], ids=["64-tokens", "1024-tokens"])
def test_dit_qk_norm_compiles_fullgraph_with_the_fused_attention(side, backend, monkeypatch):
    pin_backend(monkeypatch, backend)
    torch._dynamo.reset()
    m = _dit("triton", kernels="auto", input_size=side)
    x, t, y = torch.randn(4, 4, side, side, device="cuda"), torch.rand(4, device="cuda"), torch.arange(4, device="cuda")
    compiled = torch.compile(m, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager, comp = m(x, t, y), compiled(x, t, y)
        comp.float().square().mean().backward()
    torch.testing.assert_close(comp.float(), eager.float(), atol=2e-2, rtol=2e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
