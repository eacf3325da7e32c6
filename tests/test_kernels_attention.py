"""Fused QK-RMSNorm + flash attention (archirf_kernels.attention) against the float64 spec in
archirf_kernels.reference: the output and all five gradients (dq, dk, dv through d(qkv), dq_weight,
dk_weight; ten in joint attention), fp32 and fp16 storage, fp16 activations with fp32 weights, the
packed (B, N, 3, H, D) and the split (q, k, v) layouts, N not a multiple of the 16-token block,
power-of-two head dims (16, 64), split ones (72 = 64 + 16 and 40 = 32 + 16, the tails masked) and a
padded one (24 -> 32), joint streams of unequal lengths (blocks straddling the two), other block
sizes, qk_norm off, torch.compile (fullgraph=True) of a DiT block, torch.library.opcheck, DiT
parity, impl dispatch and errors; each with backend='fused' (the flash kernels) and, at the end and in
the model-level tests, backend='sdpa' (the Triton prep pass + PyTorch's SDPA).

On a CPU machine the kernels run in Triton's interpreter (tests/conftest.py) with 16 x 16 blocks;
bf16 and DiT-sized shapes are in tests/test_kernels_gpu_attention.py.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import archirf_kernels as K
from archirf_kernels import attention, reference
from test_kernels_adaln import DEVICE, _randn, assert_close_to_fp64, assert_compiled_matches, run_opcheck

# Max error relative to max(1, max |reference|): fp16 rounds q.k's operands, P and dS before each
# product (as flash attention does), so outputs and gradients inherit fp16's ~5e-4 relative error.
TOL = {torch.float32: 3e-5, torch.float16: 5e-3}
DTYPES = {"fp32": (torch.float32, torch.float32), "fp16": (torch.float16, torch.float16),
          "fp16-fp32-weights": (torch.float16, torch.float32)}     # (qkv, norm weights): autocast's mix
SHAPES = [(1, 5, 2, 16), (2, 17, 2, 72), (1, 33, 2, 64)]           # (B, N, H, D): N % 16 != 0, split D


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an element a kernel fails to write fails the test."""
    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(attention, "_alloc", alloc)


def qkv_input(B, N, H, D, dtype, seed, layout="packed"):
    """The projection's output (B, N, 3, H, D), std 2 with an offset (so the norm matters), or strided
    (q, k, v) views of a (B, H, N, 3, D)-ordered buffer (layout 'split')."""
    if layout == "packed":
        return _randn((B, N, 3, H, D), dtype, seed, std=2.0, mean=0.3)
    buf = _randn((B, H, N, 3, D), dtype, seed, std=2.0, mean=0.3)
    return tuple(buf[:, :, :, i].transpose(1, 2) for i in range(3))            # (B, N, H, D), strided


def weights(D, dtype, seed, n=2):
    return [_randn((D,), dtype, seed + i, std=0.3, mean=1.0) for i in range(n)]


def leaf(t):
    if t is None:
        return None
    if isinstance(t, tuple):                    # split layout: the three views are leaves of their own
        return tuple(leaf(x) for x in t)
    return t.detach().clone().requires_grad_()


def flat(ts):
    out = []
    for t in ts:
        if isinstance(t, tuple):
            out.extend(t)
        elif t is not None:
            out.append(t)
    return out


def double(t):
    if isinstance(t, tuple):
        return tuple(double(x) for x in t)
    return None if t is None else leaf(t.double())


def check_against_reference(triton_fn, reference_fn, inputs, dtype, seed=0, used=None):
    """Runs both on the same inputs (the reference on float64 copies), backpropagates the same random
    cotangents through the outputs in `used` (default all) and compares every output and every
    gradient of every input."""
    tol = TOL[dtype]
    ins, ins64 = [leaf(t) for t in inputs], [double(t) for t in inputs]
    outs, refs = triton_fn(*ins), reference_fn(*ins64)
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = refs if isinstance(refs, tuple) else (refs,)
    used = range(len(outs)) if used is None else used
    cots = {i: _randn(outs[i].shape, torch.float64, seed + 100 + i) for i in used}
    grads = torch.autograd.grad(sum((outs[i].double() * cots[i]).sum() for i in used), flat(ins),
                                materialize_grads=True)
    grads64 = torch.autograd.grad(sum((refs[i] * cots[i]).sum() for i in used), flat(ins64),
                                  materialize_grads=True)

    for i, (o, r) in enumerate(zip(outs, refs)):
        assert_close_to_fp64(f"output {i}", o, r, dtype, tol)
    for i, (t, g, g64) in enumerate(zip(flat(ins), grads, grads64)):
        assert_close_to_fp64(f"grad of input {i}", g, g64, t.dtype, tol)


def ids(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


# ---------------------------------------------------------------------------------------------
# One stream (DiT)

@pytest.mark.parametrize("layout", ["packed", "split"])
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("dtypes", DTYPES)
def test_qk_norm_attention(dtypes, shape, layout):
    (act, wdt), (B, N, H, D) = DTYPES[dtypes], shape
    inputs = [qkv_input(B, N, H, D, act, 0, layout), *weights(D, wdt, 5)]
    check_against_reference(lambda *a: K.qk_norm_attention(*a, impl="triton", backend="fused"), reference.qk_norm_attention,
                            inputs, act)


@pytest.mark.parametrize("D", [40, 24], ids=["split-40", "padded-24"])
@pytest.mark.parametrize("dtypes", ["fp32", "fp16-fp32-weights"])
def test_other_head_dims(dtypes, D):
    # 40 = 32 + 16 (8 masked), as 72 = 64 + 16; 24 is padded to one 32-wide block.
    (act, wdt) = DTYPES[dtypes]
    assert attention.head_split(D) == {40: (32, 16, True), 24: (32, 16, False)}[D]
    inputs = [qkv_input(2, 19, 2, D, act, 7), *weights(D, wdt, 8)]
    check_against_reference(lambda *a: K.qk_norm_attention(*a, impl="triton", backend="fused"), reference.qk_norm_attention,
                            inputs, act)


def test_head_split():
    # power of two: one block; else main + tail where that is smaller than the next power of two
    assert [attention.head_split(d) for d in (8, 64, 72, 80, 96, 112, 128, 192)] == [
        (16, 16, False), (64, 16, False), (64, 16, True), (64, 16, True), (64, 32, True), (128, 16, False),
        (128, 16, False), (128, 64, True)]


@pytest.mark.parametrize("blocks", [(32, 16), (16, 64)], ids=["m32-n16", "m16-n64"])
def test_other_block_sizes(monkeypatch, blocks):
    # Blocks of several weight-gradient slots, blocks longer than a stream, fixed blocks straddling the
    # two streams: the kernels' logic for block sizes other than the interpreter's default 16 x 16.
    import triton
    config = triton.Config({"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]}, num_warps=1, num_stages=1)
    for kernel in (attention._attn_fwd_kernel, attention._attn_bwd_dq_kernel, attention._attn_bwd_dkdv_kernel):
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
    inputs = [qkv_input(1, 37, 2, 72, torch.float32, 0), qkv_input(1, 11, 2, 72, torch.float32, 1),
              *weights(72, torch.float32, 10, n=4)]
    check_against_reference(lambda *a: K.joint_qk_norm_attention(*a, impl="triton", backend="fused"),
                            reference.joint_qk_norm_attention, inputs, torch.float32)
    assert attention._attn_bwd_dkdv_kernel.best_config.kwargs == config.kwargs      # the blocks were used


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_plain_attention_without_norm(dtype):
    # qk_norm=False compiles the norm out: the same kernels serve plain attention.
    inputs = [qkv_input(2, 17, 2, 72, dtype, 1)]
    check_against_reference(lambda x: K.qk_norm_attention(x, qk_norm=False, impl="triton", backend="fused"),
                            lambda x: reference.qk_norm_attention(x, qk_norm=False), inputs, dtype)


def test_no_weights_own_eps_and_scale():
    # Weights None (normalise only); distinct q / k eps that matter (rows of RMS ~ 0.03); a custom scale.
    inputs = [_randn((1, 17, 3, 2, 16), torch.float32, 2, std=0.03)]
    kw = dict(eps=(1e-3, 3e-4), scale=0.7)
    check_against_reference(lambda x: K.qk_norm_attention(x, **kw, impl="triton", backend="fused"),
                            lambda x: reference.qk_norm_attention(x, **kw), inputs, torch.float32)


def test_one_token_and_large_logits():
    # One key: P = 1 exactly; weights of 3 make logits of ~ 9 sqrt(D) scale: exp2 without overflow.
    check_against_reference(lambda *a: K.qk_norm_attention(*a, impl="triton", backend="fused"), reference.qk_norm_attention,
                            [qkv_input(2, 1, 2, 16, torch.float32, 3), *weights(16, torch.float32, 6)],
                            torch.float32)
    big = [qkv_input(1, 20, 1, 16, torch.float32, 4), *(w * 3 for w in weights(16, torch.float32, 7))]
    check_against_reference(lambda *a: K.qk_norm_attention(*a, impl="triton", backend="fused"), reference.qk_norm_attention,
                            big, torch.float32)


# ---------------------------------------------------------------------------------------------
# Joint attention (MMDiT): image and context streams of unequal lengths

@pytest.mark.parametrize("dtypes,lengths,D,layout", [
    ("fp32", (17, 5), 16, "packed"),      # both streams end in a partial block
    ("fp32", (33, 16), 72, "split"),      # the context stream is exactly one block; D masked
    ("fp16", (16, 21), 64, "packed"),     # more context than image tokens
    ("fp16-fp32-weights", (9, 3), 16, "split"),
], ids=ids)
def test_joint_qk_norm_attention(dtypes, lengths, D, layout):
    (act, wdt), (n_img, n_ctx) = DTYPES[dtypes], lengths
    B, H = 2, 2
    inputs = [qkv_input(B, n_img, H, D, act, 0, layout), qkv_input(B, n_ctx, H, D, act, 1, layout),
              *weights(D, wdt, 10, n=4)]
    check_against_reference(lambda *a: K.joint_qk_norm_attention(*a, impl="triton", backend="fused"),
                            reference.joint_qk_norm_attention, inputs, act)


@pytest.mark.parametrize("used", [(0,), (1,)], ids=["only-img", "only-ctx"])
def test_joint_one_output_used(used):
    inputs = [qkv_input(1, 17, 2, 16, torch.float32, 0), qkv_input(1, 5, 2, 16, torch.float32, 1),
              *weights(16, torch.float32, 10, n=4)]
    check_against_reference(lambda *a: K.joint_qk_norm_attention(*a, impl="triton", backend="fused"),
                            reference.joint_qk_norm_attention, inputs, torch.float32, used=used)


def test_joint_without_norm():
    inputs = [qkv_input(1, 17, 2, 16, torch.float32, 0), qkv_input(1, 7, 2, 16, torch.float32, 1)]
    check_against_reference(lambda a, b: K.joint_qk_norm_attention(a, b, qk_norm=False, impl="triton", backend="fused"),
                            lambda a, b: reference.joint_qk_norm_attention(a, b, qk_norm=False), inputs,
                            torch.float32)


def test_joint_equals_single_stream_on_the_concatenation():
    # Joint attention over [img, ctx] with shared weights is self-attention over the concatenated tokens.
    qkv_img, qkv_ctx = qkv_input(1, 17, 2, 16, torch.float32, 0), qkv_input(1, 6, 2, 16, torch.float32, 1)
    qw, kw = weights(16, torch.float32, 3)
    out_img, out_ctx = K.joint_qk_norm_attention(qkv_img, qkv_ctx, qw, kw, qw, kw, impl="triton", backend="fused")
    out = K.qk_norm_attention(torch.cat([qkv_img, qkv_ctx], dim=1), qw, kw, impl="triton", backend="fused")
    torch.testing.assert_close(torch.cat([out_img, out_ctx], dim=1), out, atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# torch.compile, custom-op checks, models

def pin_backend(monkeypatch, backend) -> list[bool]:
    """Models call the ops with backend='auto': make 'auto' mean `backend`. -> the `joint` flag of each
    call that took it (so that a test can tell which ops ran pinned)."""
    calls = []
    monkeypatch.setattr(attention, "choose_backend",
                        lambda requested, n, joint, head_dim: calls.append(joint) or backend)
    return calls


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch-internal
@pytest.mark.parametrize("attn_backend", ["fused", "sdpa"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_dit_block(backend, attn_backend, monkeypatch):
    from archirf.models.dit import DiTBlock
    pin_backend(monkeypatch, attn_backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = DiTBlock(32, 2, qk_norm=True, attn_impl="triton", kernels="reference").to(DEVICE)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)      # off adaLN-Zero's zeros, so that attention carries signal
    x, c = _randn((2, 19, 32), torch.float32, 0), _randn((2, 32), torch.float32, 1)
    # inductor fuses the rest of the block differently: fp32 rounding, not the kernel, sets the tolerance
    assert_compiled_matches(block, (x, c), backend, atol=5e-5, rtol=1e-4)


def _opcheck_cases():
    ops = torch.ops.archirf_kernels
    qkv, qkv_ctx = qkv_input(1, 17, 2, 16, torch.float32, 0), qkv_input(1, 5, 2, 16, torch.float32, 1)
    qw, kw, qwc, kwc = weights(16, torch.float32, 2, n=4)
    q, k, v = qkv_input(1, 9, 2, 16, torch.float32, 3, layout="split")
    yield ops.qk_norm_attention.default, (qkv, None, qw, kw, None, None, 1e-6, 1e-5, 0.25, True)
    yield ops.qk_norm_attention.default, (qkv, qkv_ctx, qw, kw, qwc, kwc, 1e-6, 1e-6, 0.25, True)
    yield ops.qk_norm_attention.default, (qkv, None, None, None, None, None, 1e-6, 1e-6, 0.25, False)
    yield ops.qk_norm_attention_split.default, (q, k, v, None, None, None, qw, None, None, None, 1e-6, 1e-6, 0.25,
                                                True)
    qc, kc, vc = qkv_input(1, 5, 2, 16, torch.float32, 4, layout="split")
    # backend='sdpa''s prep pass
    yield ops.qkv_prep.default, (qkv, None, qw, kw, None, None, 1e-6, 1e-5, True)
    yield ops.qkv_prep.default, (qkv, qkv_ctx, qw, None, qwc, kwc, 1e-6, 1e-6, True)
    yield ops.qkv_prep.default, (qkv, qkv_ctx, None, None, None, None, 1e-6, 1e-6, False)
    yield ops.qkv_prep_split.default, (q, k, v, qc, kc, vc, qw, kw, None, kwc, 1e-6, 1e-6, True)
    # the backward ops directly, fp16 without the norm (the empty weight gradient stays fp32)
    h16 = qkv_input(1, 17, 2, 16, torch.float16, 5)
    qh, kh, vh, rs = ops.qkv_prep(h16, None, None, None, None, None, 1e-6, 1e-6, False)
    yield ops.qkv_prep_backward.default, (qh, kh, vh, h16, None, None, None, None, None, rs, False)
    q16, k16, v16 = h16.unbind(2)
    yield ops.qkv_prep_split_backward.default, (qh, kh, vh, q16, k16, v16, None, None, None, None, None, None, None,
                                                rs, False)


OPCHECK_CASES = 10


@pytest.mark.parametrize("case", range(OPCHECK_CASES))
def test_opcheck(case):
    run_opcheck(*list(_opcheck_cases())[case])


@pytest.mark.parametrize("attn_backend", ["fused", "sdpa"])
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "plain"])
def test_dit_triton_attention_matches_reference(qk_norm, attn_backend, monkeypatch):
    from archirf.models import DiT
    pin_backend(monkeypatch, attn_backend)

    def model(attn_impl):
        torch.manual_seed(0)
        m = DiT(input_size=8, in_channels=3, num_classes=10, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                num_register_tokens=3, qk_norm=qk_norm, attn_impl=attn_impl, kernels="reference").to(DEVICE)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(DEVICE))
        return m

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=g).to(DEVICE)
    t, y = torch.rand(3, generator=g).to(DEVICE), torch.randint(0, 10, (3,), generator=g).to(DEVICE)
    ref, fused = model("reference"), model("triton")
    out_ref, out = ref(x, t, y), fused(x, t, y)
    out_ref.square().mean().backward()
    out.square().mean().backward()
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-4)
    for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=2e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------
# impl dispatch and errors

def test_impl_auto_and_reference_use_the_reference_off_cuda(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path ran")
    monkeypatch.setattr(attention, "qk_norm_attention", fail)
    monkeypatch.setattr(attention, "joint_qk_norm_attention", fail)
    qkv, w = torch.randn(2, 5, 3, 2, 8), torch.rand(8)
    torch.testing.assert_close(K.qk_norm_attention(qkv, w, w), reference.qk_norm_attention(qkv, w, w), atol=0, rtol=0)
    torch.testing.assert_close(K.joint_qk_norm_attention(qkv, qkv[:, :3], impl="reference"),
                               reference.joint_qk_norm_attention(qkv, qkv[:, :3]), atol=0, rtol=0)


def test_impl_errors(monkeypatch):
    qkv = torch.randn(2, 5, 3, 2, 8)
    with pytest.raises(ValueError, match="unknown impl 'flash'"):
        K.qk_norm_attention(qkv, impl="flash")
    monkeypatch.setattr(attention, "INTERPRETED", False)          # as on a machine without the interpreter
    monkeypatch.setattr(K.ada_norm, "INTERPRETED", False)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        K.joint_qk_norm_attention(qkv, qkv, impl="triton", backend="fused")
    monkeypatch.setattr(K, "HAS_TRITON", False)
    with pytest.raises(ValueError, match="triton is not installed"):
        K.qk_norm_attention(qkv, impl="triton", backend="fused")


@pytest.mark.parametrize("bad,match", [
    (dict(qkv=torch.randn(2, 5, 2, 2, 8)), r"qkv must be \(B, N, 3, H, D\)"),
    (dict(qkv=(torch.randn(2, 5, 2, 8),) * 2), r"tuple \(q, k, v\)"),
    (dict(qkv=(torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 4, 2, 8))), "equal shapes"),
    (dict(q_weight=torch.randn(7)), r"q_weight must be a \(D,\) = \(8,\)"),
    (dict(qk_norm=False, k_weight=torch.randn(8)), "k_weight given with qk_norm=False"),
    (dict(qkv=torch.randn(2, 5, 3, 2, 8, dtype=torch.float64)), "dtype torch.float64 is not fp16, bf16 or fp32"),
    (dict(qkv=torch.randn(1, 2, 3, 1, 264)), "head dim 264 > 256"),
    (dict(qkv_ctx=torch.randn(2, 5, 3, 3, 8)), "the streams must share B, H, D"),
    (dict(qkv_ctx=torch.randn(2, 5, 3, 2, 8).half()), "every q, k, v must be torch.float32"),
    (dict(qkv_ctx=torch.randn(2, 5, 3, 2, 8).unbind(2)), "both streams packed"),
    (dict(qkv=torch.ones(2, 5, 3, 2, 8, dtype=torch.long)), "dtype torch.int64 is not fp16"),
    (dict(qkv=tuple(torch.randn(2, 5, 2, 8).to(d) for d in (torch.float32, torch.float16, torch.float32))),
     "every q, k, v must be torch.float32"),
])
@pytest.mark.parametrize("backend", ["fused", "sdpa", "auto-impl"])   # auto-impl: impl='auto' (the CPU fallback)
def test_launcher_checks(bad, match, backend):
    if backend == "auto-impl" and (DEVICE == "cuda" or "head dim" in match):
        pytest.skip("auto runs the kernels on CUDA; the head-dim limit is the kernels' own")
    impl, backend = ("auto", "auto") if backend == "auto-impl" else ("triton", backend)
    args = dict(qkv=torch.randn(2, 5, 3, 2, 8), q_weight=None, k_weight=None, qk_norm=True)
    args.update(bad)
    qkv_ctx = args.pop("qkv_ctx", None)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        if qkv_ctx is None:
            K.qk_norm_attention(**args, impl=impl, backend=backend)
        else:
            K.joint_qk_norm_attention(args["qkv"], qkv_ctx, args["q_weight"], args["k_weight"],
                                      qk_norm=args["qk_norm"], impl=impl, backend=backend)


# ---------------------------------------------------------------------------------------------
# backend='sdpa': the Triton prep pass (archirf_kernels::qkv_prep) + PyTorch's SDPA

@pytest.mark.parametrize("dtypes,shape,layout", [
    ("fp32", (2, 17, 2, 72), "packed"),           # split head dim, N % 64 != 0 (a partial row block)
    ("fp32", (1, 70, 2, 16), "split"),            # more than one row block of the norm passes
    ("fp16", (1, 33, 2, 64), "packed"),
    ("fp16-fp32-weights", (2, 9, 3, 40), "split"),
], ids=ids)
def test_sdpa_backend(dtypes, shape, layout):
    act, wdt = DTYPES[dtypes]
    inputs = [qkv_input(*shape, act, 0, layout), *weights(shape[-1], wdt, 10)]
    check_against_reference(lambda *a: K.qk_norm_attention(*a, eps=(1e-6, 1e-3), impl="triton", backend="sdpa"),
                            lambda *a: reference.qk_norm_attention(*a, eps=(1e-6, 1e-3)), inputs, act)


@pytest.mark.parametrize("dtypes,lengths,D,layout", [
    ("fp32", (17, 5), 16, "packed"),
    ("fp32", (60, 11), 72, "split"),              # a row block straddles the streams
    ("fp16-fp32-weights", (9, 21), 64, "packed"),
], ids=ids)
def test_sdpa_backend_joint(dtypes, lengths, D, layout):
    (act, wdt), (n_img, n_ctx) = DTYPES[dtypes], lengths
    inputs = [qkv_input(2, n_img, 2, D, act, 0, layout), qkv_input(2, n_ctx, 2, D, act, 1, layout),
              *weights(D, wdt, 10, n=4)]
    check_against_reference(lambda *a: K.joint_qk_norm_attention(*a, impl="triton", backend="sdpa"),
                            reference.joint_qk_norm_attention, inputs, act)


def test_sdpa_backend_without_norm_or_weights():
    a, b = qkv_input(1, 17, 2, 16, torch.float32, 0), qkv_input(1, 7, 2, 16, torch.float32, 1)
    check_against_reference(lambda x, y: K.joint_qk_norm_attention(x, y, qk_norm=False, impl="triton", backend="sdpa"),
                            lambda x, y: reference.joint_qk_norm_attention(x, y, qk_norm=False), [a, b],
                            torch.float32)
    check_against_reference(lambda x: K.qk_norm_attention(x, scale=0.3, impl="triton", backend="sdpa"),
                            lambda x: reference.qk_norm_attention(x, scale=0.3), [a], torch.float32)


@pytest.mark.parametrize("outer", [None, "math", "flash+math"])
def test_sdpa_backend_keeps_the_callers_sdpa_restriction(monkeypatch, outer):
    """backend='sdpa' orders SDPA's backends (cuDNN first) among those the caller leaves on: one the caller turned
    off (an outer sdpa_kernel) stays off inside the op (test_sdpa_backend_compiles_fullgraph traces the same read)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    c = torch.backends.cuda
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((c.cudnn_sdp_enabled(), c.flash_sdp_enabled(), c.mem_efficient_sdp_enabled(),
                     c.math_sdp_enabled()))
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    backends = {None: None, "math": [SDPBackend.MATH],
                "flash+math": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]}[outer]
    want = {None: (True, True, True, True), "math": (False, False, False, True),
            "flash+math": (False, True, False, True)}[outer]
    a, b = qkv_input(1, 9, 2, 16, torch.float32, 0), qkv_input(1, 5, 2, 16, torch.float32, 1)
    with sdpa_kernel(backends) if backends else contextlib.nullcontext():
        K.joint_qk_norm_attention(a, b, qk_norm=False, impl="triton", backend="sdpa")
        assert attention._sdpa_order()[-1] == SDPBackend.MATH
    assert seen == [want]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch-internal
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_sdpa_backend_compiles_fullgraph(compiler):
    torch._dynamo.reset()
    qkv, qkv_ctx = qkv_input(2, 19, 2, 16, torch.float32, 0), qkv_input(2, 6, 2, 16, torch.float32, 1)
    ws = [w.requires_grad_() for w in weights(16, torch.float32, 5, n=4)]

    def fn(a, b):
        out, out_ctx = K.joint_qk_norm_attention(a, b, *ws, impl="triton", backend="sdpa")
        return torch.cat([out, out_ctx], 1)

    want = fn(qkv, qkv_ctx)
    got = torch.compile(fn, fullgraph=True, backend=compiler)(qkv, qkv_ctx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g_want = torch.autograd.grad(want.square().sum(), ws)
    g_got = torch.autograd.grad(got.square().sum(), ws)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


class _AtenLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("joint", [False, True], ids=["single", "joint"])
def test_sdpa_backend_backward_writes_dqkv_without_copies(joint):
    # The prep pass owns q, k and v, so its backward writes d(qkv) whole: autograd must neither stack
    # dq, dk, dv nor zero-fill and add per-view gradients (each a full pass over d(qkv) on the GPU).
    qkv, qkv_ctx = (qkv_input(2, n, 2, 16, torch.float32, i).requires_grad_() for i, n in enumerate((19, 6)))
    ws = [w.requires_grad_() for w in weights(16, torch.float32, 5, n=4)]
    if joint:
        out = torch.cat(K.joint_qk_norm_attention(qkv, qkv_ctx, *ws, impl="triton", backend="sdpa"), 1)
    else:
        out = K.qk_norm_attention(qkv, *ws[:2], impl="triton", backend="sdpa")
    log = _AtenLog()
    with log:
        out.backward(torch.randn_like(out))
    copies = [op for op in log.ops if op in ("stack", "zeros", "zeros_like", "new_zeros", "add", "slice_backward",
                                             "select_backward", "fill_", "zero_", "copy_")]
    assert copies == [], log.ops
    assert log.ops.count("cat") == (1 if joint else 0), log.ops   # joint: the output split's backward alone
    assert qkv.grad is not None and qkv.grad.is_contiguous()


def test_align_hint_is_the_offsets_true_divisibility():
    x = torch.zeros(8192, dtype=torch.float16)
    view = lambda off, shape, strides: x.as_strided(shape, strides, off)   # noqa: E731  (B, N, H, D)
    assert attention._align([view(0, (2, 3, 4, 16), (192, 64, 16, 1))]) == 8       # 16 bytes of fp16
    assert attention._align([view(2, (2, 3, 4, 16), (192, 64, 16, 1))]) == 2       # storage offset 2
    assert attention._align([view(1, (2, 3, 4, 16), (192, 64, 16, 1))]) == 1
    assert attention._align([view(0, (2, 3, 4, 17), (204, 68, 17, 1))]) == 1       # head stride 17
    assert attention._align([view(0, (2, 3, 4, 72), (3 * 4 * 72 * 3, 3 * 4 * 72, 72, 1))]) == 8   # DiT-XL: 72
    assert attention._align([view(0, (2, 3, 4, 16), (192, 64, 16, 1)),            # the least of all tensors
                             view(0, (2, 3, 4, 16), (196, 64, 16, 1))]) == 4
    assert attention._align([torch.zeros(2, 3, 4, 16)]) == 4                       # fp32: 4 elements


def test_choose_backend(monkeypatch):
    choose = attention.choose_backend
    assert choose("auto", 264, joint=False, head_dim=64) == "fused"        # MMDiT-XL/2's single blocks
    assert choose("auto", 264, joint=True, head_dim=64) == "fused"         # and its double blocks
    assert choose("auto", 512, joint=False, head_dim=32) == "fused"
    assert choose("auto", 513, joint=False, head_dim=64) == "sdpa"
    assert choose("auto", 1101, joint=True, head_dim=64) == "sdpa"
    assert choose("auto", 256, joint=False, head_dim=72) == "sdpa"         # DiT-XL: 72 = 64 + 16 tiles
    assert choose("auto", 256, joint=False, head_dim=128) == "sdpa"
    assert choose("fused", 10**6, joint=False, head_dim=128) == "fused"
    assert choose("sdpa", 8, joint=False, head_dim=16) == "sdpa"
    calls = []                                   # the public entry points dispatch through it
    monkeypatch.setattr(attention, "choose_backend", lambda *a: calls.append(a) or "fused")
    K.qk_norm_attention(qkv_input(1, 5, 2, 16, torch.float32, 0), impl="triton")
    K.joint_qk_norm_attention(qkv_input(1, 5, 2, 16, torch.float32, 0), qkv_input(1, 3, 2, 16, torch.float32, 1),
                              impl="triton")
    assert calls == [("auto", 5, False, 16), ("auto", 8, True, 16)]
    monkeypatch.undo()
    for impl in ("triton", "reference", "auto"):                  # checked whichever path runs
        with pytest.raises(ValueError, match="unknown backend 'flash'"):
            K.qk_norm_attention(qkv_input(1, 5, 2, 16, torch.float32, 0), impl=impl, backend="flash")
        with pytest.raises(ValueError, match="unknown backend 'flash'"):
            K.joint_qk_norm_attention(qkv_input(1, 5, 2, 16, torch.float32, 0), qkv_input(1, 3, 2, 16, torch.float32, 1),
                                      impl=impl, backend="flash")
