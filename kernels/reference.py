"""Pure-PyTorch specification of every fused op. Tests, benchmarks and the CPU fallback use it.

Math in fp32 whatever the storage dtype (fp64 stays fp64: tests run the spec on .double() inputs);
results are returned in the input's dtype (for the adaLN family: x's dtype, whatever the dtype
of the modulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORMS = ("layer", "rms")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dim (Zhang & Sennrich 2019)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _per_token(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample (B, C) conditioning tensor -> (B, 1, C), broadcast over x's tokens; (B, N, C) as is."""
    while t.dim() < x.dim():
        t = t.unsqueeze(1)
    return t


# adaLN modulation (Peebles & Xie 2023, Sec. 3.2): x * (1 + scale) + shift. shift/scale are either
# per-sample (B, C), broadcast over all tokens, or already per-token (B, N, C) / (B, 1, C).
# The one modulate of the tree: archirf.models.layers re-exports it.
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + _per_token(scale, x)) + _per_token(shift, x)


def _check_norm(norm: str, bias: torch.Tensor | None) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm '{norm}'; choose one of {', '.join(NORMS)}")
    if norm == "rms" and bias is not None:
        raise ValueError("norm='rms' has no bias (RMSNorm only scales); pass bias=None")


def ada_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-6, norm: str = "layer") -> torch.Tensor:
    """h = modulate(N(x), shift, scale): N = LayerNorm (Ba et al. 2016) or RMSNorm over C, with the
    optional affine N(x) * weight + bias. x (B, N, C); shift, scale (B, C) or (B, N, C) -> (B, N, C)
    in x's dtype."""
    _check_norm(norm, bias)
    xf = _upcast(x)
    if norm == "layer":
        n = F.layer_norm(xf, xf.shape[-1:], eps=eps)
    else:
        n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        n = n * _upcast(weight)
    if bias is not None:
        n = n + _upcast(bias)
    return modulate(n, _upcast(shift), _upcast(scale)).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y: adaLN-Zero's gated residual (DiT Sec. 3.2). gate (B, C) or (B, N, C); in x's dtype."""
    return (_upcast(x) + _upcast(_per_token(gate, x)) * _upcast(y)).to(x.dtype)


def gated_residual_ada_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                                  shift: torch.Tensor, scale: torch.Tensor,
                                  weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                                  eps: float = 1e-6, norm: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT block boundary: x_new = x + gate * y (stored in x's dtype), h = ada_layer_norm(x_new, ...).
    Returns (x_new, h): x_new continues the residual stream, h feeds the next sub-layer."""
    x_new = gated_residual(x, y, gate)
    return x_new, ada_layer_norm(x_new, shift, scale, weight, bias, eps, norm)
