"""Attention: the fused QK-RMSNorm + flash attention (`qk_norm_attention`, `joint_qk_norm_attention`);
fwd, bwd and fwd+bwd, bf16, RMSNorm weights in fp32 (a model's parameters under autocast).

Ours: `ours` is the default (backend='auto', which picks by sequence length and head dim), `ours-fused` the norm
inside our flash kernels, `ours-sdpa` our Triton norm pass + PyTorch's SDPA (cuDNN first).

Baselines, same process and shapes:
  eager-{flash,cudnn,efficient}  what the models' sdpa path runs: per-head RMSNorm of q and k
                                 (reference.rms_norm: fp32 math, bf16 out) + SDPA pinned to that
                                 backend with torch.nn.attention.sdpa_kernel, from the qkv projection's
                                 (B, N, 3, H, D) layout to the merged (B, N, H*D) output;
  compiled                       torch.compile of the same (default SDPA dispatch, fullgraph);
  compiled-cudnn                 the same with SDPA pinned to cuDNN (sdpa_kernel inside the graph);
  sdpa-{cudnn,flash}             SDPA alone, *without the norm*, on contiguous (B, H, N, D) q, k, v
                                 (no layout work either): the attention kernel by itself;
  flash-attn, xformers           eager RMSNorm + flash_attn_func / memory_efficient_attention on the
                                 (B, N, H, D) views, where installed.
A backend that rejects a shape is skipped with its error as the reason (listed under the table).
Joint (MMDiT) cases attend over [img, ctx]; baselines concatenate, ours walks the two streams.

"fwd" is the training forward (inputs require grad); "bwd" times autograd.grad on a fresh graph
whose forward ran untimed; "fwd+bwd" both. TFLOP/s counts the attention matmuls only: forward
4·B·H·N²·D (N = all tokens), backward 2.5× that, so fwd+bwd is 3.5×. GB/s counts the minimal traffic
(fwd: read qkv, write out: 4 T; bwd: read qkv, out, dout, write dqkv: 8 T; T = B·N·H·D·2 bytes).
Every implementation's first fwd+bwd (compile, JIT, autotune) runs before timing, is reported as
first_call_s and is checked against eager norm + SDPA (a guard against timing a wrong kernel; the
numerics tests are tests/test_kernels_*attention.py).

Targets (ANCHORS.md, the issue): DiT-XL shape fwd+bwd ≤ 0.5× eager norm + the best SDPA backend
(vs_eager_best ≥ 2); N ≥ 1024, D = 64 / 128: fwd+bwd ≥ 0.9× the best SDPA without the norm
(vs_sdpa_best ≥ 0.9). Ours' rows carry the block configs autotuning chose (`configs`).

    python -m benchmarks.bench_attention RESULTS/attention.json    # compact table: ours vs each baseline
"""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import archirf_kernels
from archirf_kernels import reference

from .harness import SMOKE, as_tuple, fwd_bwd_once, note_baseline, pass_target, rel_err

pytestmark = pytest.mark.cuda

SUITE = "attention"
CASES = {  # name: (B, H, N_img, N_ctx, D); N_ctx > 0: joint attention over [img, ctx]
    "dit-xl": (64, 16, 256, 0, 72),              # DiT-XL/2 at 256² (1152 / 16 heads), batch 64
    "mmdit-joint": (16, 24, 1024, 77, 64),       # MMDiT-like: 1024 image + 77 text tokens
    "sd3-4k": (4, 24, 4096, 0, 64),              # SD3-like long sequence
    "d128-2k": (8, 16, 2048, 0, 128),            # head dim 128
    "mmdit-xl2-joint": (64, 18, 256, 8, 64),     # MMDiT-XL/2's double blocks: 256 patches + 4 label + 4 registers
    "mmdit-xl2-single": (64, 18, 264, 0, 64),    # its single blocks, over the concatenation
}
SMOKE_CASES = {"dit-xl": (2, 2, 40, 0, 72), "mmdit-joint": (1, 2, 33, 7, 64), "sd3-4k": (1, 2, 64, 0, 64),
               "d128-2k": (1, 2, 48, 0, 128), "mmdit-xl2-joint": (2, 2, 32, 8, 64), "mmdit-xl2-single": (2, 2, 40, 0, 64)}
PASSES = ("fwd", "bwd", "fwd_bwd")
IMPLS = ("ours", "ours-fused", "ours-sdpa", "eager-flash", "eager-cudnn", "eager-efficient", "compiled",
         "compiled-cudnn", "sdpa-cudnn", "sdpa-flash", "flash-attn", "xformers")
NO_NORM = ("sdpa-cudnn", "sdpa-flash")       # take (q, k, v) (B, H, N, D); the others the qkv layout
EPS = 1e-6


def shape_of(case: str):
    return (SMOKE_CASES if SMOKE else CASES)[case]


def targets(case: str, pass_: str) -> list[dict]:
    """The issue's targets, attached to ours' rows; benchmarks/record.py checks them."""
    _, _, n_img, n_ctx, d = CASES[case]
    if pass_ != "fwd_bwd":
        return []
    if case == "dit-xl":
        return [{"metric": "vs_eager_best", "min": 2.0, "label": "≤ 0.5× eager norm + best SDPA"}]
    if n_img + n_ctx >= 1024 and d in (64, 128):
        return [{"metric": "vs_sdpa_best", "min": 0.9, "label": "≥ 0.9× best SDPA without norm"}]
    return []


def flops(shape, pass_: str) -> float:
    b, h, n_img, n_ctx, d = shape
    fwd = 4.0 * b * h * (n_img + n_ctx) ** 2 * d
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[pass_]


def bytes_moved(shape, pass_: str) -> int:
    b, h, n_img, n_ctx, d = shape
    t = b * (n_img + n_ctx) * h * d * 2
    return {"fwd": 4 * t, "bwd": 8 * t, "fwd_bwd": 12 * t}[pass_]


def _params():
    # fwd+bwd of every case first (the targets), so that an ARCHIRF_BENCH_BUDGET_S cut drops the rest
    for pass_ in ("fwd_bwd", "fwd", "bwd"):
        for case in CASES:
            for impl in IMPLS:
                yield pytest.param(case, pass_, impl, id=f"{case}-{pass_.replace('_', '')}-{impl}")


# -- implementations ------------------------------------------------------------------------------


def _heads(qkv):
    """(B, N, 3, H, D) -> q, k, v (B, H, N, D) views: the models' sdpa layout."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def norm_sdpa(sdpa, *args):
    """Eager per-head RMSNorm (reference.rms_norm, as models.layers.RMSNorm) + `sdpa` on (B, H, N, D),
    from the qkv layout to (B, N, H*D); joint when given (qkv, qkv_ctx, 4 weights)."""
    if len(args) == 3:
        qkv, qw, kw = args
        q, k, v = _heads(qkv)
        q, k = reference.rms_norm(q, qw, EPS), reference.rms_norm(k, kw, EPS)
        b, _, n, d = q.shape
        return sdpa(q, k, v).transpose(1, 2).reshape(b, n, -1)
    qkv, qkv_ctx, qw, kw, qwc, kwc = args
    q, k, v = _heads(qkv)
    qc, kc, vc = _heads(qkv_ctx)
    q = torch.cat([reference.rms_norm(q, qw, EPS), reference.rms_norm(qc, qwc, EPS)], dim=2)
    k = torch.cat([reference.rms_norm(k, kw, EPS), reference.rms_norm(kc, kwc, EPS)], dim=2)
    v = torch.cat([v, vc], dim=2)
    b, n = qkv.shape[:2]
    out = sdpa(q, k, v)                                                 # (B, H, N_img + N_ctx, D)
    return (out[:, :, :n].transpose(1, 2).reshape(b, n, -1),            # (B, N_img, H*D)
            out[:, :, n:].transpose(1, 2).reshape(b, out.shape[2] - n, -1))


_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def _pinned_sdpa(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    pinned = getattr(SDPBackend, _BACKENDS[backend])

    def sdpa(q, k, v):
        with sdpa_kernel([pinned]):
            return F.scaled_dot_product_attention(q, k, v)
    return sdpa


_COMPILED: dict = {}
_FIRST_CALL: dict = {}


def _compiled(case: str, backend: str | None = None):
    """torch.compile of eager norm + SDPA (default dispatch, or pinned to `backend`), one compiled
    function per (case, backend) (static shapes; no recompiles of one function across cases, which
    inductor mis-handled on CPU for the joint case)."""
    if (case, backend) not in _COMPILED:
        sdpa = F.scaled_dot_product_attention if backend is None else _pinned_sdpa(backend)

        def fn(*args):
            return norm_sdpa(sdpa, *args)
        _COMPILED[case, backend] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[case, backend]


def _bnhd_norm(kernel):
    """Eager RMSNorm on (B, N, H, D) views + a (B, N, H, D) attention kernel (flash-attn / xformers)."""
    def one(qkv, qw, kw):
        q, k, v = qkv.unbind(2)
        return reference.rms_norm(q, qw, EPS), reference.rms_norm(k, kw, EPS), v

    def fn(*args):
        if len(args) == 3:
            q, k, v = one(*args)
            return kernel(q, k, v).flatten(2)
        qkv, qkv_ctx, qw, kw, qwc, kwc = args
        (q, k, v), (qc, kc, vc) = one(qkv, qw, kw), one(qkv_ctx, qwc, kwc)
        out = kernel(torch.cat([q, qc], 1), torch.cat([k, kc], 1), torch.cat([v, vc], 1)).flatten(2)
        n = qkv.shape[1]
        return out[:, :n], out[:, n:]
    return fn


def implementation(impl: str, case: str, joint: bool, device: torch.device):
    if impl.startswith("ours"):
        kind = "triton" if device.type == "cuda" else "auto"     # no silent fallback on the GPU
        backend = impl.removeprefix("ours").removeprefix("-") or "auto"
        if joint:
            return lambda *a: archirf_kernels.joint_qk_norm_attention(*a, eps=EPS, impl=kind, backend=backend)
        return lambda *a: archirf_kernels.qk_norm_attention(*a, eps=EPS, impl=kind, backend=backend)
    if impl.startswith("eager-"):
        sdpa = _pinned_sdpa(impl.removeprefix("eager-"))
        return lambda *a: norm_sdpa(sdpa, *a)
    if impl.startswith("compiled"):
        return _compiled(case, impl.removeprefix("compiled").removeprefix("-") or None)
    if impl in NO_NORM:
        return _pinned_sdpa(impl.removeprefix("sdpa-"))
    if impl == "flash-attn":
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            note_baseline(SUITE, impl, "flash-attn not installed")
        return _bnhd_norm(flash_attn_func)
    try:
        from xformers.ops import memory_efficient_attention
    except ImportError:
        note_baseline(SUITE, impl, "xformers not installed")
    return _bnhd_norm(memory_efficient_attention)


# -- inputs and checks ----------------------------------------------------------------------------


def make_inputs(impl: str, shape, device):
    """Random leaves requiring grad (qkv projections bf16, norm weights fp32) and output gradients."""
    b, h, n_img, n_ctx, d = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size, dtype=torch.bfloat16, std=1.0, mean=0.0):
        return (mean + std * torch.randn(size, device=device, generator=gen)).to(dtype).requires_grad_()

    if impl in NO_NORM:
        n = n_img + n_ctx
        inputs = tuple(randn(b, h, n, d) for _ in range(3))
        return inputs, (torch.randn((b, h, n, d), device=device, generator=gen).bfloat16(),)
    qkv = randn(b, n_img, 3, h, d)
    weights = tuple(randn(d, dtype=torch.float32, std=0.2, mean=1.0) for _ in range(2))
    inputs = (qkv, *weights)
    outs = [(b, n_img, h * d)]
    if n_ctx:
        qkv_ctx = randn(b, n_ctx, 3, h, d)
        inputs = (qkv, qkv_ctx, *weights, *(randn(d, dtype=torch.float32, std=0.2, mean=1.0) for _ in range(2)))
        outs.append((b, n_ctx, h * d))
    return inputs, tuple(torch.randn(s, device=device, generator=gen).bfloat16() for s in outs)


def first_call(impl, case, fn, inputs, grads) -> float:
    """Seconds of this implementation's first fwd+bwd on this case (compile / JIT / autotune), once per
    (impl, case); outputs and input gradients are checked against eager norm + default SDPA. A
    baseline that rejects the shape (e.g. an SDPA backend) is skipped with the error as reason."""
    key = (impl, case)
    if key not in _FIRST_CALL:
        with warnings.catch_warnings(record=True) as caught:    # SDPA says why a backend declines as a warning
            warnings.simplefilter("always")
            try:
                _FIRST_CALL[key], outs, dins = fwd_bwd_once(fn, inputs, grads)
            except RuntimeError as e:
                if impl.startswith("ours"):
                    raise
                why = [str(w.message).strip().splitlines()[0] for w in caught] or [str(e).strip().splitlines()[0]]
                note_baseline(SUITE, impl, f"{case}: {why[0][:200]}")
        if impl not in NO_NORM:
            ref_outs = as_tuple(norm_sdpa(F.scaled_dot_product_attention, *inputs))
            ref_dins = torch.autograd.grad(ref_outs, inputs, grads)
            names = [f"out{i}" for i in range(len(outs))] + [f"d(input {i})" for i in range(len(inputs))]
            for name, got, want in zip(names, (*outs, *dins), (*ref_outs, *ref_dins)):
                err = rel_err(got, want)
                assert err < 3e-2, f"{impl} {case}: {name} relative error {err:.3g} vs eager norm + SDPA"
    return _FIRST_CALL[key]


# -- the benchmark --------------------------------------------------------------------------------


@pytest.mark.parametrize("case,pass_,impl", list(_params()))
def test_attention(bench, device, case, pass_, impl):
    shape = shape_of(case)
    joint = shape[3] > 0
    fn = implementation(impl, case, joint, device)
    inputs, grads = make_inputs(impl, shape, device)
    first_s = first_call(impl, case, fn, inputs, grads)

    target, prepare = pass_target(pass_, fn, inputs, grads)

    b, h, n_img, n_ctx, d = shape
    bench.benchmark.group = f"attention {pass_.replace('_', '+')} {case}"
    bench.run(
        target,
        prepare=prepare,
        bytes_moved=bytes_moved(shape, pass_),
        info={
            "suite": SUITE,
            "op": "joint_qk_norm_attention" if joint else "qk_norm_attention",
            "pass": pass_.replace("_", "+"),
            "case": case,
            "impl": impl,
            "shape": [b, h, n_img + n_ctx, d],
            "shape_label": "B×H×N×D",
            "tokens": [n_img, n_ctx] if joint else [n_img],
            "dtype": "bfloat16",
            "weight_dtype": "float32",         # the norm weights
            "norm": impl not in NO_NORM,
            "flops": flops(shape, pass_),
            "first_call_s": first_s,
            "targets": targets(case, pass_) if impl == "ours" else [],
            **({"configs": tuned_configs()} if impl == "ours" and device.type == "cuda" else {}),
        },
    )


def tuned_configs() -> dict:
    """The block config each kernel ran with on its last call (this case's, after its first call)."""
    from archirf_kernels import attention
    out = {}
    for name in ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"):
        c = getattr(getattr(attention, name), "best_config", None)
        if c is not None:
            out[name.removeprefix("_attn_").removesuffix("_kernel")] = (
                f"M{c.kwargs['BLOCK_M']} N{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}")
    return out


# -- compact summary ------------------------------------------------------------------------------


def summary(doc: dict) -> str:
    """Per case and pass: ours' ms, then each baseline's ms and ours' speed-up over it (their ms / ours);
    the targets and ours' configs. Reads a JSON written by benchmarks/record.py."""
    from .record import annotate, entries, evaluate_targets, median_s

    annotate(doc)
    rows: dict = {}
    for e in entries(doc):
        i = e["extra_info"]
        if i.get("suite") == SUITE and median_s(e):
            rows.setdefault((i["case"], i["pass"]), {})[i["impl"]] = e
    present = [impl for impl in IMPLS[1:] if any(impl in g for g in rows.values())]
    lines = ["speed-up of ours over each baseline = their ms / ours (> 1: ours faster)",
             f"{'case':12} {'pass':8} {'ours ms':>8}  " + "  ".join(f"{b:>16}" for b in present)]
    for (case, pass_), g in rows.items():
        ours = g.get("ours")
        t = median_s(ours) if ours else None
        cells = [f"{median_s(g[i]) * 1e3:.3f} {median_s(g[i]) / t:.2f}x" if i in g and t else "—" for i in present]
        lines.append(f"{case:12} {pass_:8} " + (f"{t * 1e3:8.3f}" if t else f"{'—':>8}") + "  "
                     + "  ".join(f"{c:>16}" for c in cells))
    lines.append("")
    for (case, pass_), g in rows.items():
        ours = g.get("ours")
        if not ours:
            continue
        info = ours["extra_info"]
        for label, value, met in evaluate_targets(ours):
            verdict = "n/a" if met is None else "met" if met else "MISSED"
            lines.append(f"target {case} {pass_}: {label}: {verdict} ({value:.2f})" if value else
                         f"target {case} {pass_}: {label}: {verdict}")
        if pass_ == "fwd+bwd":
            lines.append(f"configs {case}: {info.get('configs')}  first call {info.get('first_call_s', 0):.1f} s, "
                         f"{info.get('tflops', 0):.0f} TFLOP/s")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(summary(json.load(f)))
