"""Scale-out on PyTorch's own stack: device and process group, device mesh, and the one function that
prepares a model for training (torchtitan's order):

    activation checkpointing per block -> torch.compile per block (fullgraph) -> fully_shard per block
    (or per `parallel.blocks_per_shard` blocks) -> fully_shard at the root

Everything runs under torchrun (c10d rendezvous for several nodes); a plain `python -m archirf.train`
gets a 1-rank process group of its own. A world of one rank takes the same path without the two
fully_shard steps (a plain module: fp32 weights, bf16 autocast), because FSDP2 on one rank shards
nothing and costs host time every step (hooks, casts, DTensor dispatch; measured in
docs/scale-out.md). `parallel.shard_single_rank=true`
keeps FSDP2 on one rank. Checkpoints are the same either way and move between the two.
Models know nothing of this; they only expose `blocks` (an nn.ModuleList of the repeated units)
and keep every buffer persistent (the initial weights travel as a state dict).

Precision, one rule for both paths. Parameters are fp32 masters; under precision=bf16 the forward runs in
bf16 autocast, which computes matmuls and convolutions in bf16; the transformers' residual streams and
every model's conditioning vector are fp32 (the models make them so), a UNet's feature maps are what
autocast's convolutions return (bf16), and no wrapper casts a block's inputs. FSDP2 gathers the
parameters in bf16 (half the traffic), so the only difference from one rank is where a parameter enters
outside a matmul (an embedding row, a gain): bf16-rounded there. tests/test_precision.py holds both paths
to the same dtypes at every block and the same values within bf16 tolerance.

World-size invariance. A run's trajectory does not depend on the number of ranks (for a fixed
micro batch): the data stream hands every micro batch the same samples whatever the world size
(data/order.py), the noise, times and label drops of a micro batch are drawn from a generator seeded
by its place in that stream (`seed_micro_batch`), gradients are averaged over ranks, and the initial
weights are rank 0's ordinary initialisation broadcast to the shards. So 1 and N ranks take the same
steps up to floating-point summation order, and a checkpoint resumes on any number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import signal
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from . import fp8
from .config import Config, ConfigError
from .data.order import stream_seed

_NOISE_STREAM = 3                   # generator stream of the per-micro-batch noise (data/order.py uses 0-2)
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    mesh: object = None                          # DeviceMesh: 1-D (shard) or 2-D (replicate, shard)
    control_group: object = None                 # a gloo group for host-side agreement (stop signals)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(cfg: Config) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    if want == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast use TF32
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda", local_rank)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a precision setting (auto | bf16 | fp32 | fp8-*): auto is bf16 on CUDA, fp32 (None)
    elsewhere; the fp8 settings run bf16 autocast around their fp8 GEMMs."""
    if precision.startswith("fp8"):     # fp8 GEMMs where archirf/fp8.py converts a layer, bf16 everywhere else
        return torch.bfloat16
    return {"auto": torch.bfloat16 if device.type == "cuda" else None, "bf16": torch.bfloat16, "fp32": None}[precision]


@contextlib.contextmanager
def distributed(cfg: Config) -> Iterator[Env]:
    """Device, process group (NCCL on GPU, gloo on CPU) and mesh for the run; tears down what it set up.

    Under torchrun the group comes from its environment (RANK, WORLD_SIZE, MASTER_ADDR ...); without
    it, a 1-rank group on an in-memory store, so one process trains through the same code.
    """
    from torch.distributed.device_mesh import init_device_mesh

    device = _pick_device(cfg)
    owns = not dist.is_initialized()
    try:
        if owns:
            backend, device_id = ("nccl", device) if device.type == "cuda" else ("gloo", None)
            if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
                dist.init_process_group(backend, device_id=device_id)
            else:
                dist.init_process_group(backend, device_id=device_id, store=dist.HashStore(), rank=0, world_size=1)
        world_size = dist.get_world_size()
        replicate = cfg.parallel.hsdp_replicate
        if world_size % replicate:
            raise ConfigError(f"parallel.hsdp_replicate={replicate} must divide the world size {world_size}; "
                              f"use the number of nodes (or 1 for plain FSDP)")
        if replicate > 1:  # HSDP: replicate across the outer dim (nodes), shard within the inner one
            mesh = init_device_mesh(device.type, (replicate, world_size // replicate),
                                    mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
        control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        yield Env(device, dist.get_rank(), world_size, mesh, control)
        dist.barrier()  # all ranks leave together
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()
            # gloo's worker threads drop their last references to finished work (and its tensors) after
            # the waiting caller has moved on, and need the GIL for it; if the interpreter is shutting
            # down by then, the process aborts ("terminate called without an active exception", about
            # one exit in twenty on CPU). Release the GIL for a moment so they can finish first.
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- model

# Selective activation checkpointing keeps what is expensive to recompute (matmuls, attention) and
# recomputes the cheap element-wise rest (norms, modulation, activations, residual adds).
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_COMPILED_UNITS = 0                 # units compiled by this process so far (the dynamo cache entries they may need)


CUDAGRAPH_MODES = ("reduce-overhead",)     # compile_mode values whose blocks replay as CUDA graphs


def parallelize(model: nn.Module, mesh, *, param_dtype: Optional[torch.dtype], compile: bool,
                activation_checkpointing: str = "none", reshard_after_forward: bool = True,
                blocks_per_shard: int = 1, shard: bool = True, precision: str = "auto",
                compile_mode: str = "default") -> nn.Module:
    """fp8 GEMMs (precision=fp8-*) -> activation checkpointing -> per-block compile -> per-block fully_shard ->
    root fully_shard, in place.

    Repeated blocks compile once (same code, parameters are graph inputs). Parameters stay fp32
    (the optimizer's master copy, sharded); `param_dtype` is the dtype they are gathered in (the one
    autocast casts them to for matmuls anyway). Gradients are reduced in fp32. No unit casts its
    inputs, so the residual stream, the conditioning and the times keep their dtype.
    `blocks_per_shard` consecutive blocks form one fully_shard unit (one all-gather and one
    reduce-scatter for all of them): fewer, larger collectives and less host time per step, for
    the memory of that many blocks' gathered weights.
    shard=False stops after the compile (one rank: a plain module, `mesh` and `param_dtype` unused).
    `compile_mode`: inductor's mode for the blocks (cfg.compile_mode; CUDA graphs only on one rank, unsharded).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Gather bf16, reduce fp32, and never cast what flows between blocks: the stream keeps the dtype the
    # model and autocast give it, as on one rank (see "Precision" in the module doc).
    block_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    blocks = model.blocks
    if fp8.recipe(precision):           # swaps linear layers of the blocks for Float8Linear: before compile and FSDP2
        chosen = fp8.convert(blocks, precision)
        model.fp8_plan = chosen         # read by the task's description line
    if compile:  # blocks that differ (a UNet's widths, resampling, attention) compile one graph each; another
        # compiled copy (the evaluation's, without grad) adds as many to each class's cache, twice when it also
        # runs at a second batch size (the sample grids')
        global _COMPILED_UNITS
        _COMPILED_UNITS += len(blocks)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * _COMPILED_UNITS)
    for i, block in enumerate(blocks):
        if activation_checkpointing != "none":
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            from torch.utils.checkpoint import create_selective_checkpoint_contexts

            extra = {}
            if activation_checkpointing == "selective":
                extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
            # the recompute must draw the forward's random numbers (the UNets' dropout)
            block = checkpoint_wrapper(block, preserve_rng_state=True, **extra)
        if compile:
            # in place (parameter names stay the same); static shapes: units of one class that differ in shape (a
            # UNet's or an autoencoder's levels) get one specialised graph each, not one dynamic-shape graph
            block.compile(fullgraph=True, dynamic=False,
                          **({"mode": compile_mode} if compile_mode != "default" else {}))
        blocks[i] = block
    for start in range(0, len(blocks), blocks_per_shard) if shard else ():
        unit = list(blocks[start:start + blocks_per_shard])
        # The last unit's weights are needed again right away by backward: keep them gathered.
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=block_mp,
                    reshard_after_forward=reshard_after_forward and start + len(unit) < len(blocks))
    if not shard:
        return model
    fully_shard(model, mesh=mesh, mp_policy=root_mp, reshard_after_forward=False)
    return model


def build_training_model(cfg: Config, env: Env, *, param_dtype: Optional[torch.dtype],
                         compile: bool) -> tuple[nn.Module, Optional[nn.Module]]:
    """(sharded training model, rank 0's full fp32 copy on CPU or None on other ranks).

    The training model is built on the meta device, parallelized, materialized empty on the device,
    then filled with rank 0's ordinary initialisation (`build_model` under `cfg.seed`, on CPU)
    broadcast shard by shard. Initial weights are therefore bitwise the same for every world size
    (DTensor random fills are not: on CPU each rank draws its shard from its own generator). Rank 0
    keeps the full copy as the eval model that samples with the EMA weights.
       On one rank (unless parallel.shard_single_rank) the training model is a plain copy of that
    initialisation on the device, prepared by `parallelize(shard=False)`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from .models import build_model

    if not uses_fsdp(cfg, env):
        torch.manual_seed(cfg.seed)
        reference = build_model(cfg)
        model = copy.deepcopy(reference)
        parallelize(model, None, param_dtype=None, compile=compile, shard=False, precision=cfg.precision,
                    activation_checkpointing=cfg.parallel.activation_checkpointing, compile_mode=cfg.compile_mode)
        _freeze_empty(model.to(env.device))
        return model, reference
    with torch.device("meta"):
        model = build_model(cfg)
    unsaved = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    if unsaved:
        raise ValueError(f"non-persistent buffers {sorted(unsaved)} would stay uninitialised after the broadcast "
                         f"of rank 0's weights; register them with persistent=True")
    parallelize(model, env.mesh, param_dtype=param_dtype, compile=compile, precision=cfg.precision,
                compile_mode=cfg.compile_mode, activation_checkpointing=cfg.parallel.activation_checkpointing,
                reshard_after_forward=cfg.parallel.reshard_after_forward,
                blocks_per_shard=cfg.parallel.blocks_per_shard)
    model.to_empty(device=env.device)
    reference = None
    if env.is_main:
        torch.manual_seed(cfg.seed)
        reference = build_model(cfg)
    set_model_state_dict(model, reference.state_dict() if reference is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    _freeze_empty(model)
    return model, reference


def uses_fsdp(cfg: Config, env: Env) -> bool:
    """FSDP2 for several ranks; one rank trains the plain module unless parallel.shard_single_rank."""
    return env.world_size > 1 or cfg.parallel.shard_single_rank


def _freeze_empty(model: nn.Module) -> None:
    for p in model.parameters():
        if p.numel() == 0:  # e.g. zero register tokens: no gradient ever, so no optimizer state to checkpoint
            p.requires_grad_(False)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2: reduce-scatter gradients on this backward or keep accumulating unsharded; a no-op otherwise."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (the tensor it holds: no copy, no dispatch); a plain tensor as is."""
    return t._local_tensor if isinstance(t, DTensor) else t


def clean_fqn(name: str) -> str:
    """A parameter name without the wrappers' path parts (activation checkpointing, compile)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


# ---------------------------------------------------------------------------------------------- step

def seed_micro_batch(seed: int, loader, rank: int, micro_batch: int) -> None:
    """Seeds the global RNGs (CPU and device) for this rank's next micro batch from its first sample's
    place in the global data stream. Noise, times and label drops then depend on which samples a micro
    batch holds, not on the rank or the world size; a resumed run needs no RNG state. Host-only."""
    state = loader.state_dict()
    first = state["epoch"] * loader.num_samples + state["index"] + rank * micro_batch
    torch.manual_seed(stream_seed(seed, first, _NOISE_STREAM))


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global gradient norm over all ranks (a plain 0-dim tensor); clips to max_norm when > 0.

    Under FSDP2 the grads are DTensor shards. The norm is computed on the local tensors and the ranks'
    partial norms are combined as DTensor would do it (square, all-reduce sum over the sharded mesh
    dims, square root: on the device, no host sync), but without sending every gradient through
    DTensor dispatch twice per step (the norm and the scaling). The same numbers either way."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = isinstance(grads[0], DTensor)
    mesh, placements = (grads[0].device_mesh, grads[0].placements) if sharded else (None, ())
    same = (lambda g: isinstance(g, DTensor) and g.device_mesh == mesh and g.placements == placements) if sharded \
        else (lambda g: not isinstance(g, DTensor))
    if not all(map(same, grads)):
        raise ValueError("clip_grad_norm_: the gradients must all be plain tensors or all DTensors of one mesh "
                         "and placement (one fully_shard mesh)")
    local = [local_tensor(g) for g in grads]
    total = torch.nn.utils.get_total_norm(local, foreach=True)
    for dim, placement in enumerate(placements):
        if isinstance(placement, Shard) and mesh.size(dim) > 1:
            total = total.square()
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
            total = total.sqrt()
    if max_norm > 0:
        torch._foreach_mul_(local, clip_coefficient(total, max_norm))
    return total


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grads_with_norm_'s scaling factor, a device scalar (no host sync)."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Averages plain tensors over the ranks in place (a replicated network's gradients): one all-reduce of
    them flattened together; a no-op on one rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not tensors:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for t, averaged in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(averaged)


def barrier(env: Env) -> None:
    """All ranks wait here, on the host (gloo) group: no GPU work to time out behind."""
    if env.world_size > 1:
        dist.barrier(group=env.control_group)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Metrics' reduce hook: the sum over ranks, in place (a device collective; the caller syncs)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class StopRequest:
    """SIGTERM / SIGINT / SIGUSR1 set a flag on the rank that receives them; `agreed(step)` says whether
    any rank has one. With several ranks that is a small all_reduce on a CPU (gloo) group -- a host
    sync between ranks, not with the GPU -- made every `every` steps (and when forced), so a signal
    that reaches one rank only stops all of them within `every` steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, env: Env, every: int):
        self.env, self.every = env, every
        self.signum: Optional[int] = None          # received by this rank
        self.agreed_signum: Optional[int] = None   # received by some rank, known to all
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.signum = signum

    def agreed(self, step: int, force: bool = False) -> bool:
        if self.env.world_size == 1:
            self.agreed_signum = self.signum
        elif force or step % self.every == 0:
            flag = torch.tensor([self.signum or 0], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.env.control_group)  # note: ranks sync here
            self.agreed_signum = int(flag.item()) or None
        return self.agreed_signum is not None

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
