import os
import sys

import pytest
import torch

# Kernel tests run Triton's interpreter where there is no GPU. triton.jit reads TRITON_INTERPRET when it
# decorates a kernel, i.e. when archirf_kernels is first imported, so it is set here, before any test
# module imports it (importing torch and asking torch.cuda.is_available() does not import triton).
# On a CUDA machine it stays unset: the same kernel tests then run the compiled kernels on the GPU,
# and tests/test_kernels_gpu.py (bf16 numerics, DiT shapes) can run at all.
if not torch.cuda.is_available():
    if "archirf_kernels" in sys.modules:
        raise RuntimeError("archirf_kernels was imported before tests/conftest.py set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _strict_interpreted_launches() -> None:
    """A compiled launch rejects a keyword argument the kernel does not declare (KeyError); Triton's
    interpreter drops it silently. Make the interpreter as strict for our constexpr names (upper
    case), so that a launcher passing a stale one fails on the CPU too, not only on a GPU."""
    import inspect

    from triton.runtime import interpreter

    call = interpreter.GridExecutor.__call__
    if getattr(call, "_archirf_strict", False):
        return

    def checked(self, *args, **kwargs):
        declared = inspect.getfullargspec(self.fn).args
        unknown = sorted(k for k in kwargs if k not in declared and k.isupper())
        if unknown:
            raise TypeError(f"Triton kernel {self.fn.__name__} got arguments it does not declare: {unknown}")
        return call(self, *args, **kwargs)

    checked._archirf_strict = True
    interpreter.GridExecutor.__call__ = checked


if os.environ.get("TRITON_INTERPRET") == "1":
    _strict_interpreted_launches()



@pytest.fixture(autouse=True)
def _fp32_references_and_fresh_dynamo():
    """On a CUDA machine the fp32 tests compare against fp32 references, so TF32 is off for each test
    (the trainer turns it on for training, in-process tests included). After each test dynamo's caches
    are dropped, so that its per-code-object recompile limit counts one test's compilations, not the
    whole session's (models compile per block by default on CUDA)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    yield
    torch._dynamo.reset()


class _TinyFeatures(torch.nn.Module):
    """A stand-in feature network (TorchScript, like the real one): the commands' tests need seconds, not minutes."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 9, stride=8)
        self.fc = torch.nn.Linear(8, 12)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory):
    """A tiny TorchScript feature network's file, for eval.inception / --inception."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("net") / "tiny.pt"
    torch.jit.script(_TinyFeatures()).save(str(path))
    return path
