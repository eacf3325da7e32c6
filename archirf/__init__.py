"""ArchiRF: rectified flow and diffusion training for image models."""

__version__ = "0.1.0"
