"""model.attn_backend: the QK-norm attention op's backend chosen per model from the config."""

from __future__ import annotations

import pytest
import torch

from archirf.config import ConfigError, load_config
from archirf.models import build_model
from archirf.models.layers import Attention, set_attention_backend
from archirf_kernels import attention
from test_kernels_adaln import DEVICE


def _spy(monkeypatch) -> list[str]:
    """Record the backend every op call asks for (the op still runs it)."""
    asked, choose = [], attention.choose_backend

    def spy(requested, n, joint, head_dim):
        asked.append(requested)
        return choose(requested, n, joint, head_dim)
    monkeypatch.setattr(attention, "choose_backend", spy)
    return asked


@pytest.mark.parametrize("name", ["dit", "mmdit"])
@pytest.mark.parametrize("backend", ["fused", "sdpa"])
def test_config_backend_reaches_every_attention_call(name, backend, monkeypatch):
    cfg = load_config(None, [f"model.name={name}", "model.attn_impl=triton", f"model.attn_backend={backend}",
                             "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "data.resolution=8",
                             *(["model.qk_norm=true"] if name == "dit" else [])])  # MMDiT always has it
    torch.manual_seed(0)
    model = build_model(cfg).to(DEVICE)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert attns and all(m.backend == backend for m in attns)
    asked = _spy(monkeypatch)
    x = torch.randn(2, cfg.data.channels, 8, 8, device=DEVICE)
    out = model(x, torch.rand(2, device=DEVICE), torch.tensor([1, 3], device=DEVICE))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert asked and set(asked) == {backend}


def test_bad_backend_is_refused():
    with pytest.raises(ConfigError, match="attn_backend"):
        load_config(None, ["model.attn_backend=flash"])
    with pytest.raises(ValueError, match="choose one of auto, fused, sdpa"):
        set_attention_backend(torch.nn.Linear(2, 2), "flash")
