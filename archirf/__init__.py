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
