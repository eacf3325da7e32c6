"""Model training steps: img/s and MFU of a whole step (forward, backward, fused AdamW) of MMDiT at the
DiT-XL/2-comparable size (MMDiT-XL/2: width 1152, 9 double- + 19 single-stream blocks, 18 heads of 64)
and of DiT-XL/2, on 32×32×4 latents (256² images), batch 64, bf16 autocast, 1000 classes.

Implementations, same process, same initial weights, same inputs:
  ours         the trainer's model defaults on CUDA: attn_impl=auto (our QK-norm / joint attention op) and
               kernels=auto (the adaLN steps left to inductor inside the compiled blocks), every block
               compiled (fullgraph) as the trainer compiles it (parallel.py);
  ours-triton  every fused Triton kernel forced: kernels=triton (adaLN) and attn_impl=triton;
  ours-triton-sdpa  the fused adaLN kernels with SDPA attention (kernels=triton, attn_impl=sdpa);
  compiled     the same model in plain PyTorch (kernels=reference, attn_impl=sdpa), compiled the same
               way: the baseline of the targets;
  eager        plain PyTorch, not compiled.
The model is not wrapped in FSDP (one GPU; the trainer's 1-rank FSDP adds the parameters' bf16 cast).
Every implementation steps with torch's fused AdamW alone: no gradient clipping, no EMA, no optim.fused_update,
which the trainer's default step on CUDA runs (benchmarks/train_step_variants.py times that step: plain_fu).

One round = one optimizer step on a fixed batch: the rectified-flow loss (x_t = (1-t) x + t ε, target
ε - x, MSE; label dropout 0.1), backward, AdamW(fused=True), zero_grad. MFU = 6 × model.flops_per_image() × batch /
time / peak, peak = the bf16 matmul rate measured in this session (8192³, as ANCHORS.md). Every
implementation's first step (compile, JIT, autotune) is timed once as first_call_s; after it, its
forward on the batch is checked against the first implementation run on that case (a guard against
timing a wrong model; the numerics tests are tests/test_models*.py).

Targets (ANCHORS.md, the issue): MMDiT of DiT-XL size ≥ 1.4× compiled; DiT-XL/2 ≥ 1.3× compiled and
≥ 60% MFU. ARCHIRF_BENCH_MODEL_CASES=mmdit-xl2,dit-xl2 picks cases; ARCHIRF_BENCH_ROUNDS /
ARCHIRF_BENCH_WARMUP the rounds (default 20 / 3 here: one round is a ~0.1 s step).
"""

from __future__ import annotations

import gc
import os
import statistics
import time

import pytest
import torch

from archirf.models import DIT_PRESETS, MMDIT_PRESETS, DiT, MMDiT

from .harness import SESSION, SMOKE

pytestmark = pytest.mark.cuda

SUITE = "models"
BATCH, SIDE, CHANNELS, CLASSES = (4, 8, 4, 10) if SMOKE else (64, 32, 4, 1000)
ROUNDS = int(os.environ.get("ARCHIRF_BENCH_ROUNDS", "3" if SMOKE else "20"))
WARMUP = int(os.environ.get("ARCHIRF_BENCH_WARMUP", "1" if SMOKE else "3"))
TINY = dict(hidden_size=64, depth=2, num_heads=2, patch_size=2)   # smoke-run shape of every case
CASES = {  # name: (model class, constructor arguments)
    "mmdit-xl2": (MMDiT, dict(MMDIT_PRESETS["MMDiT-XL/2"], num_register_tokens=4, label_tokens=4)),
    "dit-xl2": (DiT, dict(DIT_PRESETS["DiT-XL/2"], num_register_tokens=0)),
    "dit-xl2-qknorm": (DiT, dict(DIT_PRESETS["DiT-XL/2"], num_register_tokens=0, qk_norm=True)),
}
SELECTED = os.environ.get("ARCHIRF_BENCH_MODEL_CASES", "mmdit-xl2,dit-xl2").split(",")
IMPLS = {  # name: (kernels, attn_impl, compiled)
    "ours": ("auto", "auto", True),
    "compiled": ("reference", "sdpa", True),
    "ours-triton": ("triton", "triton", True),
    "ours-triton-sdpa": ("triton", "sdpa", True),
    "eager": ("reference", "sdpa", False),
}
TARGETS = {
    "mmdit-xl2": [{"metric": "vs_compiled_best", "min": 1.4, "label": "≥ 1.4× compiled"}],
    "dit-xl2": [{"metric": "vs_compiled_best", "min": 1.3, "label": "≥ 1.3× compiled"},
                {"metric": "mfu", "min": 0.6, "label": "≥ 60% MFU"}],
    "dit-xl2-qknorm": [{"metric": "vs_compiled_best", "min": 1.4, "label": "≥ 1.4× compiled"}],
}
_CHECK: dict[str, torch.Tensor] = {}   # case -> forward output of the first implementation run
_PEAK: list[float] = []


def _params():
    # ours, compiled and ours-triton of every case first (the targets), so that an ARCHIRF_BENCH_BUDGET_S cut drops the rest
    for case in SELECTED:
        if case not in CASES:
            raise ValueError(f"ARCHIRF_BENCH_MODEL_CASES: unknown case '{case}'; choose from {', '.join(CASES)}")
    for impls in (("ours", "compiled", "ours-triton"), ("ours-triton-sdpa", "eager")):
        for case in SELECTED:
            for impl in impls:
                yield pytest.param(case, impl, id=f"{case}-{impl}")


def peak_flops(device: torch.device) -> float:
    """bf16 matmul FLOP/s measured once per session (8192³; CPU smoke: 512³ fp32)."""
    if not _PEAK:
        n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        t = statistics.median(SESSION.gpu_times(lambda: a @ b, rounds=20 if device.type == "cuda" else 3))
        _PEAK.append(2 * n ** 3 / t)
    return _PEAK[0]


def build(case: str, impl: str, device: torch.device) -> torch.nn.Module:
    cls, kw = CASES[case]
    kernels, attn_impl, compiled = IMPLS[impl]
    if device.type != "cuda":          # smoke run on the CPU: the reference paths, tiny shapes
        kernels, attn_impl, kw = "reference", "sdpa", {**kw, **TINY}
    torch.manual_seed(0)
    with torch.device(device):         # initialise on the GPU: seconds, not minutes, for ~1B parameters
        model = cls(input_size=SIDE, in_channels=CHANNELS, num_classes=CLASSES, kernels=kernels,
                    attn_impl=attn_impl, **kw)
    with torch.no_grad():              # off the adaLN-Zero init, so the check below compares real outputs
        g = torch.Generator(device=device).manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, device=device) * 0.02)
    if compiled:
        for block in model.blocks:     # as parallel.py: each block on its own, fullgraph
            block.compile(fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    return model.train()


def batch(device: torch.device):
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(BATCH, CHANNELS, SIDE, SIDE, generator=g, device=device)
    t = torch.rand(BATCH, generator=g, device=device)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g, device=device)
    return x, t, y


def train_step(model, optimizer, x, t, y, autocast: bool):
    noise = torch.randn_like(x)
    tb = t.view(-1, 1, 1, 1)
    x_t, target = (1 - tb) * x + tb * noise, noise - x
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(x_t, t, y)
    loss = (out.float() - target).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def check_forward(case: str, impl: str, model, x, t, y, autocast: bool) -> float:
    """The forward after the first step (same weights for every implementation, up to that step's
    rounding) at the timed shapes and grad mode, so the compiled blocks are not compiled again; labels
    never dropped (the dropout draws at the root, outside the compiled blocks)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, y, force_drop_ids=torch.zeros_like(y)).float().detach()
    if case not in _CHECK:
        _CHECK[case] = out
        return 0.0
    want = _CHECK[case]
    err = ((out - want).norm() / want.norm()).item()  # note: host sync (setup only)
    # bf16 rounding through 28 blocks stays at a few 1e-2; a wrong kernel or model is off by O(1).
    assert err < 0.15, f"{impl} {case}: forward differs from the first implementation run (relative error {err:.3g})"
    return err


@pytest.mark.parametrize("case,impl", list(_params()))
def test_train_step(bench, device, case, impl):
    cuda = device.type == "cuda"
    torch._dynamo.reset()  # drop the previous implementation's compiled code (and what it holds)
    gc.collect()
    if cuda:  # the previous model is garbage now: give its memory back before measuring the peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(case, impl, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    x, t, y = batch(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    loss = train_step(model, optimizer, x, t, y, cuda)
    sync()
    first_s = time.perf_counter() - t0
    assert torch.isfinite(loss), f"{impl} {case}: non-finite loss {loss.item()}"
    check_err = check_forward(case, impl, model, x, t, y, cuda)

    macs = model.flops_per_image()
    bench.benchmark.group = f"{case} train step"
    bench.run(
        lambda: train_step(model, optimizer, x, t, y, cuda),
        bytes_moved=0,
        rounds=ROUNDS,
        warmup_rounds=WARMUP,
        info={
            "suite": SUITE,
            "op": case,
            "pass": "train step",
            "case": case,
            "impl": impl,
            "shape": [BATCH, CHANNELS, SIDE, SIDE],
            "shape_label": "B×C×H×W",
            "dtype": "bfloat16" if cuda else "float32",
            "model": type(model).__name__,
            "params": model.num_params(),
            "macs_per_image": macs,
            "images": BATCH,
            "flops": 6 * macs * BATCH,          # training FLOPs of one step (DESIGN.md §4)
            "peak_tflops": peak_flops(device) / 1e12,
            "kernels": IMPLS[impl][0] if cuda else "reference",
            "attn_impl": IMPLS[impl][1] if cuda else "sdpa",
            "compiled": IMPLS[impl][2],
            "first_call_s": first_s,
            "check_rel_err": check_err,           # forward vs the case's first implementation, after one step
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "targets": TARGETS[case] if impl == "ours" else [],
        },
    )
