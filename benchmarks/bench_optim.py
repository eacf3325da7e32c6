"""The optimizer step with its EMAs (archirf_kernels.adamw_ema_step) against the trainer's unfused step.

Cases: the parameter sets of DiT-B/2 and DiT-XL/2 (their tensors' shapes, fp32 like the trainer's masters),
with the primary EMA alone ("1 EMA") and with two post-hoc EMAs besides ("3 EMAs"), a clipping scale
applied. Implementations, same process and tensors:
  ours    archirf_kernels.adamw_ema_step: scale, AdamW and the EMAs in one pass (one launch)
  eager   what optim.fused_update=false runs: clip_grad_norm_'s torch._foreach_mul_ of the gradients,
          torch's fused AdamW (torch._fused_adamw_, as archirf.optim.AdamW calls it), one torch._foreach_lerp_
          per EMA

Bytes that must move per parameter element (fp32): the parameter read and written (8), the gradient read
(4), both moments read and written (16), each EMA read and written (8 K): 28 + 8 K bytes. The target is to
be within 1.2x of that floor at the copy bandwidth (>= 83 % of copy BW).
"""

from __future__ import annotations

import time

import pytest
import torch

import archirf_kernels

from .harness import SMOKE

pytestmark = pytest.mark.cuda

SUITE = "optim"
PRESETS = ("DiT-B/2", "DiT-XL/2")
EMAS = (1, 3)
IMPLS = ("ours", "eager")
HP = dict(lr=1e-4, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)


def _shapes(preset: str) -> list[tuple[int, ...]]:
    from archirf.config import load_config
    from archirf.models import build_model

    if SMOKE:
        return [(64, 32), (32,), (3, 5)]
    cfg = load_config(None, ["model.name=dit", f"model.preset={preset}", "data.resolution=32", "data.channels=4"])
    with torch.device("meta"):
        return [tuple(p.shape) for p in build_model(cfg).parameters() if p.numel()]


_STATE: dict[tuple, dict] = {}


def _state(preset: str, emas: int, device: torch.device) -> dict:
    key = (preset, emas)
    if key not in _STATE:
        _STATE.clear()                      # one case's tensors at a time (DiT-XL/2 with 3 EMAs: ~19 GB)
        gen = torch.Generator(device=device).manual_seed(0)
        mk = lambda s, scale=1.0: torch.randn(s, device=device, generator=gen) * scale
        shapes = _shapes(preset)
        _STATE[key] = dict(params=[mk(s, 0.02) for s in shapes], grads=[mk(s, 1e-3) for s in shapes],
                           m=[mk(s, 1e-4) for s in shapes], v=[mk(s, 1e-4).abs() for s in shapes],
                           emas=[[mk(s, 0.02) for s in shapes] for _ in range(emas)],
                           step=torch.tensor(10.0, device=device), scale=torch.tensor(0.5, device=device))
    return _STATE[key]


def _ours(st: dict):
    rates = [1e-3] * len(st["emas"])
    impl = "triton" if st["step"].is_cuda else "auto"      # the CPU smoke run: the reference
    return lambda: archirf_kernels.adamw_ema_step(st["params"], st["grads"], st["m"], st["v"], st["step"], **HP,
                                                  emas=st["emas"], ema_rates=rates, grad_scale=st["scale"],
                                                  impl=impl)


def _eager(st: dict):
    steps = [st["step"].clone() for _ in st["params"]]

    def step():
        torch._foreach_mul_(st["grads"], st["scale"])
        torch._fused_adamw_(st["params"], st["grads"], st["m"], st["v"], [], steps, lr=HP["lr"], beta1=HP["beta1"],
                            beta2=HP["beta2"], weight_decay=HP["weight_decay"], eps=HP["eps"], amsgrad=False,
                            maximize=False)
        for ema in st["emas"]:
            torch._foreach_lerp_(ema, st["params"], 1e-3)
    return step


@pytest.mark.parametrize("preset,emas,impl", [
    pytest.param(p, k, i, id=f"{p.replace('/', '')}-{k}ema-{i}") for p in PRESETS for k in EMAS for i in IMPLS])
def test_optim(bench, device, preset, emas, impl):
    if device.type != "cuda" and impl == "eager":
        pytest.skip("torch._fused_adamw_ on CUDA only here")
    st = _state(preset, emas, device)
    fn = (_ours if impl == "ours" else _eager)(st)
    t0 = time.perf_counter()
    fn()                                    # the first call: Triton's JIT for ours
    torch.cuda.synchronize() if device.type == "cuda" else None
    first_s = time.perf_counter() - t0
    numel = sum(p.numel() for p in st["params"])
    bench.benchmark.group = f"adamw_ema_step {preset} {emas} EMA"
    bench.run(fn, bytes_moved=numel * (28 + 8 * emas), info={
        "suite": SUITE, "op": "adamw_ema_step", "pass": "step", "case": f"{preset}, {emas} EMA", "impl": impl,
        "shape": [f"{numel / 1e6:.1f}M params in {len(st['params'])} tensors, {emas} EMA"], "shape_label": "parameters",
        "dtype": "float32", "first_call_s": first_s,
        "targets": [{"metric": "copy_bw_fraction", "min": 1 / 1.2, "label": "within 1.2× of the bytes floor"}]
        if impl == "ours" else [],
    })
