"""How an archirf_kernels op is registered with torch.library.

On a real Triton backend an op is a `torch.library.triton_op`. Called eagerly it runs its Python
launcher, as a custom op would. Under torch.compile, AOTAutograd decomposes it into the PyTorch ops
and the Triton kernels its launcher calls (traced with fake tensors), so inductor launches those
kernels straight from the compiled code: the launch plan is made once, at compile time, and no call
goes through the dispatcher or the Python launcher again. Inductor does not fuse other ops into a
user kernel, but it plans the buffers and the glue ops around it.

In Triton's CPU interpreter the kernels cannot be traced, so there each op is an opaque
`torch.library.custom_op` with the same name and schema, and the fake (meta) function given here. So is
it on a machine without a CUDA device, where the kernels cannot run at all: registering a triton_op scans
the launcher for kernels, which imports inductor (about 1.5 s of every `import archirf_kernels` there).

A launcher written for both calls its kernels as `launch(kernel, interpreted)[grid](...)` and must
be traceable with fake tensors: shapes, strides and dtypes only, never data or pointers.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch

NAMESPACE = "archirf_kernels"


@functools.cache
def _cuda() -> bool:
    return torch.cuda.is_available()


def traceable(interpreted: bool) -> bool:
    """Whether ops are triton_ops here: real Triton kernels (not the interpreter) and a CUDA device."""
    return not interpreted and _cuda()


def kernels_of(namespace: dict) -> list:
    """The Triton kernels (jit functions) defined in a module's namespace (pass `globals()`)."""
    from triton.runtime.jit import JITFunction

    return [v for v in namespace.values() if isinstance(v, JITFunction)]


def define(name: str, interpreted: bool, fake: Callable | None = None, kernels: list = ()):
    """Decorator: the function becomes archirf_kernels::<name> (see the module docstring). `fake`
    is the meta function; as a triton_op the launcher itself traced with fake tensors is the
    fallback, and `fake` (cheaper: no launch planning) replaces it for torch.compile's shape
    propagation. `kernels`: the Triton kernels the launcher may call (`definer` passes its module's).
    torch.compile's on-disk caches key a triton_op's compiled code on its kernels' source, which
    torch finds by scanning the launcher for literal `wrap_triton(name)` calls; `launch` hides them
    from that scan, so they are declared here: an edited kernel then misses the cache instead of
    running stale code. (An edited launch plan still hits it: plans change speed, never results.)"""
    def wrap(fn: Callable):
        qualname = f"{NAMESPACE}::{name}"
        if traceable(interpreted):
            op = torch.library.triton_op(qualname, fn, mutates_args=())
            table = getattr(torch._library.triton, "triton_ops_to_kernels", None)
            if table is not None:
                table[qualname] = list(kernels)
            else:
                warnings.warn(f"archirf_kernels: this torch has no torch._library.triton.triton_ops_to_kernels; "
                              f"its compile caches do not see {qualname}'s kernels (after a kernel edit, clear "
                              f"them: TORCHINDUCTOR_FORCE_DISABLE_CACHES=1)", stacklevel=2)
        else:
            op = torch.library.custom_op(qualname, fn, mutates_args=())
        if fake is not None:
            op.register_fake(fake)
        return op
    return wrap


def definer(interpreted: bool, namespace: dict) -> Callable:
    """A module's `define`, bound to its INTERPRETED flag and its kernels (pass `globals()` after the kernels):
    `op = definer(INTERPRETED, globals())`, then `@op("name", fake=...)` on each launcher."""
    return functools.partial(define, interpreted=interpreted, kernels=kernels_of(namespace))


def tracing() -> bool:
    """Whether a launcher runs inside a triton_op's decomposition, which torch.compile traces under a
    FunctionalTensorMode. Any other dispatch mode (a FlopCounterMode, a user's own mode) sees eager
    launches: a wrapped kernel there would be counted or rejected as a higher-order op, not run."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FUNCTIONAL) is not None


def launch(kernel, interpreted: bool):
    """The kernel, wrapped for tracing while a triton_op is traced (its `[grid](...)` call becomes a
    graph node under torch.compile); otherwise the kernel itself, which launches as usual (a launcher
    called outside any op, such as mp.normalize_weight_, skips the traced path's dispatch)."""
    return torch.library.wrap_triton(kernel) if traceable(interpreted) and tracing() else kernel


def ints(*dims) -> tuple[int, ...]:
    """Concrete sizes: launch planning (powers of two, table lookups, cache keys) needs Python ints, and
    a launcher traced with dynamic shapes sees symbolic ones; int() specialises the graph to them."""
    return tuple(int(d) for d in dims)


def stand_ins(args: tuple) -> tuple:
    """Real 16-element tensors of each tensor argument's dtype and device, other arguments as they
    are: what `kernel.warmup` needs to compile a kernel and read its resources while the launcher is
    traced with fake tensors (which have no storage). Made outside any fake, proxy or functional mode."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return tuple(torch.empty(16, dtype=a.dtype, device=a.device) if isinstance(a, torch.Tensor) else a
                     for a in args)
