"""fp8 GEMMs for the transformers' per-token linear layers: precision=fp8-tensorwise | fp8-rowwise.

torchao's float8 training (`torchao.float8.convert_to_float8_training`, the `fp8` extra) swaps chosen
nn.Linear modules for Float8Linear: each matmul casts its operands to float8 (e4m3; the rowwise recipe
scales per row, the tensorwise one per tensor, and tensorwise keeps the output gradient in e5m2) and runs
on the fp8 tensor cores through torch._scaled_mm. Parameters, optimizer state, EMA, checkpoints and the
sampling model stay as under bf16: fp32 masters with the same names, so a run may switch precision between
bf16 and fp8 on resume, and its snapshots sample the same way. Everything outside the converted GEMMs runs
under bf16 autocast, as precision=bf16.

Which layers (`plan`): inside the transformer blocks, the linear layers that see every token, the attention's
qkv and proj and the MLP's fc1 and fc2 (`TOKEN_LAYERS`). Then dims not divisible by 16 (a hardware
requirement) and sizes where torchao's H100 tables show the fp8 GEMM no faster than bf16 (its auto filter
for the recipe) stay in bf16. Never converted: the adaLN modulation (one row per sample, not per token), the
embedders and the final layer, and MMDiT's context stream (a few label tokens per image in these models).
The run prints what it converted and what it left.

Needs a CUDA GPU with fp8 tensor cores (compute capability 8.9 or newer: L4, L40, H100, ...). On a CPU the
conversion can run in torchao's emulation (exact fp8 rounding, fp32 matmuls): tests only, through
`convert(..., emulate=True)` or ARCHIRF_FP8_EMULATE=1, which also drop the size filter (a speed rule).
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Optional

import torch
from torch import nn

from .config import ConfigError

PRECISIONS = {"fp8-tensorwise": "tensorwise", "fp8-rowwise": "rowwise"}
TOKEN_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
SKIPPED_STREAMS = ("ctx.",)             # MMDiT's context stream: few tokens per image
FAMILIES = ("dit", "mmdit")
EMULATE_ENV = "ARCHIRF_FP8_EMULATE"
# torchao's size filter (a speed rule) on; numerics checks turn it off (benchmarks/fp8_convergence.py) to convert
# every aligned per-token layer of a small model
SIZE_FILTER = True


class Fp8Error(ConfigError):
    """fp8 GEMMs cannot run here (no fp8 GPU, no torchao, another model family): the run stops in one line."""


class Plan(NamedTuple):
    convert: list[str]                  # block-relative names, "3.attn.qkv"
    skipped: dict[str, str]             # name -> why it stays bf16


def recipe(precision: str) -> Optional[str]:
    """torchao's recipe name for a precision setting, None for the non-fp8 ones."""
    return PRECISIONS.get(precision)


def emulated() -> bool:
    return os.environ.get(EMULATE_ENV, "") not in ("", "0")


def check(precision: str, model_name: str, device: torch.device, cfg=None) -> None:
    """A one-line Fp8Error unless fp8 GEMMs can run here: a transformer family, torchao, an fp8 GPU (or the
    emulation asked for by ARCHIRF_FP8_EMULATE=1), and (given the run's config) at least one layer to convert."""
    if recipe(precision) is None:
        return
    _check_runtime(precision, model_name, device)
    if cfg is not None:
        from .models import build_model

        with torch.device("meta"):
            blocks = build_model(cfg).blocks
        chosen = plan(blocks, precision)
        if not chosen.convert:
            raise Fp8Error(f"precision={precision} converts no linear layer of this model ({_reasons(chosen)}): it "
                           f"would train in bf16; use precision=bf16" + (" or fp8-tensorwise" if precision ==
                                                                         "fp8-rowwise" else ""))


def _check_runtime(precision: str, model_name: str, device: torch.device) -> None:
    if model_name not in FAMILIES:
        raise Fp8Error(f"precision={precision}: fp8 GEMMs are for the transformers (model.name={'|'.join(FAMILIES)}),"
                       f" not model.name={model_name}; use precision=bf16")
    _torchao()
    if emulated():
        return
    if device.type != "cuda":
        raise Fp8Error(f"precision={precision} needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9, "
                       f"e.g. H100); this run is on {device.type}: use precision=bf16 or fp32")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise Fp8Error(f"precision={precision} needs fp8 tensor cores (compute capability >= 8.9, e.g. H100); "
                       f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}: use precision=bf16")


def _torchao():
    try:
        from torchao import float8
    except ImportError:
        raise Fp8Error("fp8 precision needs torchao: pip install -e '.[fp8]'") from None
    return float8


def plan(blocks: nn.Module, precision: str, size_filter: Optional[bool] = None, emulate: bool = False) -> Plan:
    """Which of the blocks' linear layers get fp8 GEMMs (see the module doc). size_filter=False keeps every
    per-token layer whose dims fit the hardware (the numerics checks convert small models whole); None: SIZE_FILTER,
    off under emulation (emulate=True or ARCHIRF_FP8_EMULATE=1: the size filter is about speed, which an emulation
    does not have)."""
    if size_filter is None:
        size_filter = SIZE_FILTER and not (emulate or emulated())
    float8 = _torchao()
    auto = float8._auto_filter_for_recipe(recipe(precision), filter_fqns=[])
    convert, skipped = [], {}
    for name, module in blocks.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        out_f, in_f = module.weight.shape
        if not name.endswith(TOKEN_LAYERS):
            skipped[name] = "not a per-token layer"
        elif any(f".{s}" in f".{name}" for s in SKIPPED_STREAMS):
            skipped[name] = "context stream: few tokens"
        elif in_f % 16 or out_f % 16:
            skipped[name] = f"{in_f}x{out_f}: dims not divisible by 16"
        elif size_filter and not auto(module, name):
            skipped[name] = f"{in_f}x{out_f}: too small to gain ({recipe(precision)} recipe)"
        else:
            convert.append(name)
    return Plan(convert, skipped)


def convert(blocks: nn.Module, precision: str, *, size_filter: Optional[bool] = None,
            emulate: bool = False) -> Plan:
    """Swaps the planned linear layers of `blocks` for torchao's Float8Linear, in place (on any device,
    meta included: before FSDP2 and compile); returns the plan (size_filter and emulate as plan's)."""
    float8 = _torchao()
    emulate = emulate or emulated()
    chosen = plan(blocks, precision, size_filter, emulate)
    config = float8.Float8LinearConfig.from_recipe_name(recipe(precision))
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    wanted = set(chosen.convert)
    float8.convert_to_float8_training(blocks, config=config, module_filter_fn=lambda m, fqn: fqn in wanted)
    return chosen


def describe(chosen: Plan, precision: str) -> str:
    """One line for the run's start: how many GEMMs went fp8, and the kinds that stayed bf16."""
    kept = f"; bf16: {len(chosen.skipped)} ({_reasons(chosen)})" if chosen.skipped else ""
    return f"{precision}: fp8 GEMMs in {len(chosen.convert)} linear layers of the blocks{kept}"


def _reasons(chosen: Plan) -> str:
    """The kinds of reasons layers stayed bf16, without their sizes."""
    return "; ".join(sorted({why.split(": ")[-1] for why in chosen.skipped.values()}))
