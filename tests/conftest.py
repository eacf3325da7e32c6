import os
import sys

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
