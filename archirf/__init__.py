"""ArchiRF: rectified flow and diffusion training for image models."""

from importlib import metadata as _metadata

__version__ = "0.1.0"

# The oldest torch the test suite runs on (the GPU machine's 2.11; CI runs 2.13). setup.py declares
# the same minimum (tests/test_packaging.py keeps the two equal).
MIN_TORCH = (2, 11)


def check_torch(version: str | None = None) -> None:
    """ImportError naming the installed torch and the fix when it is older than MIN_TORCH."""
    if version is None:
        try:
            version = _metadata.version("torch")
        except _metadata.PackageNotFoundError:  # a torch without package metadata (a source build)
            import torch

            version = torch.__version__
    found = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    if found < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"ArchiRF needs torch >= {need} (found {version}); pip install -U 'torch>={need}'")


check_torch()


def exit_now(code: int):
    """End a command that has finished its work: what the interpreter does at exit (thread-exit callbacks such
    as executors' shutdown, non-daemon threads joined, atexit handlers, the standard streams flushed), without
    its last part, tearing down every module and object, which takes seconds after a compiled CUDA run.
    Every file the commands write is closed or renamed into place before this is called."""
    import atexit
    import os
    import sys
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):       # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(0 if code is None else int(code))
