from setuptools import find_packages, setup

setup(
    name="archirf",
    version="0.1.0",
    description="Training library for rectified-flow and diffusion image models with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The kernel library installs as `archirf_kernels`: PyPI already has an unrelated `kernels`.
    packages=find_packages(include=["archirf", "archirf.*"]) + ["archirf_kernels", "archirf_kernels.integrations"],
    package_dir={"archirf_kernels": "kernels", "archirf_kernels.integrations": "kernels/integrations"},
    install_requires=[
        "torch>=2.11",              # archirf.MIN_TORCH: the oldest torch the tests run on
        "triton>=3.2; platform_system == 'Linux'",
        "einops",
        "omegaconf>=2.3",
        "pyyaml",         # (omegaconf's own parser) config.py reads its errors' line and column
        # Triton 3.6's interpreter (TRITON_INTERPRET=1, the CPU kernel tests) breaks on numpy 2.4.
        "numpy<2.4",
        "pillow",
        "safetensors",
        "tqdm",
        "scikit-learn",   # ships the embedded digits dataset
        "scipy",          # the float64 matrix square root of the Fréchet distance (archirf.eval)
        "matplotlib",     # loss curves
        "torchmetrics>=1.4",  # PSNR and SSIM of reconstructions (archirf.eval.recon)
    ],
    extras_require={
        # the tests run the fp8 conversion in torchao's CPU emulation and patch small diffusers models
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "torchao==0.17.0", "diffusers==0.42.1"],
        # archirf_kernels.integrations.diffusers (the kernels in diffusers' transformers)
        "diffusers": ["diffusers==0.42.1"],
        # precision=fp8-tensorwise | fp8-rowwise (archirf/fp8.py): torchao's float8 training; 0.17 imports
        # beside torch 2.11 to 2.13
        "fp8": ["torchao==0.17.0"],
        # GPU image decoding (data.loader=dali); CUDA 13 drivers. For CUDA 12: pip install nvidia-dali-cuda120
        "dali": ["nvidia-dali-cuda130==2.4.0"],
    },
)
