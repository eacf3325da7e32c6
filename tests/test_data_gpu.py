"""DALI's GPU decoder (the `mixed` nvJPEG / hardware path): the same labels, order and flips as the PIL
loader, pixels within the documented tolerance, batches on the GPU, exact resume. Needs a GPU and the dali
extra (run on the GPU machine; skipped on CPU-only machines, where test_data_packed.py checks the CPU
pipeline)."""

import numpy as np
import pytest
import torch
from PIL import Image

from archirf.config import Config, DataConfig
from archirf.data import build_loader

from test_data import assert_resumes_exactly, take
from test_data_packed import levels, photo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (DALI's mixed decoder)")
GPU = torch.device("cuda")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """ImageNet-sized JPEGs (and one PNG per class, which DALI decodes on its CPU threads)."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(7):
            h, w = ((375, 500), (500, 375), (333, 500), (480, 640))[(i + c) % 4]
            Image.fromarray(photo(rng, h, w)).save(root / f"c{c}" / f"{i:02d}.{'png' if i == 6 else 'jpg'}",
                                                    quality=90)
    return root


@pytest.mark.parametrize("resolution", [64, 256])
def test_mixed_decoder_matches_the_pil_loader(jpegs, resolution):
    cfg = lambda kind: Config(seed=3, data=DataConfig(source="folder", root=str(jpegs), resolution=resolution,  # noqa: E731
                                                      channels=3, num_classes=3, random_flip=True, num_workers=2,
                                                      loader=kind))
    pil = take(build_loader(cfg("torch"), 8, GPU), 4)
    dali = build_loader(cfg("dali"), 8, GPU)
    assert type(dali).__name__ == "DaliLoader"
    for (xt, yt), (xd, yd) in zip(pil, take(dali, 4)):
        assert xd.is_cuda and yd.is_cuda and xd.shape == xt.shape and xd.dtype == torch.float32
        assert torch.equal(yt, yd)
        assert levels(xt, xd) < 8, levels(xt, xd)
    assert_resumes_exactly(lambda: build_loader(cfg("dali"), 8, GPU), k=2, m=3)
