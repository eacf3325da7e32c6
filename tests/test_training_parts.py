"""EMA, LR schedules and checkpoint files on their own."""

import math

import pytest
import torch

from archirf import checkpoint as ckpt
from archirf.config import OptimConfig
from archirf.ema import EMA, decay_per_step, power_function_beta, power_function_exponent
from archirf.optim import lr_at


def test_ema_half_life_in_images():
    beta = decay_per_step(128, half_life_images=1280, decay=None)
    assert beta ** 10 == pytest.approx(0.5)  # after 10 steps of 128 images an old update weighs half
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, half_life_images=1280)
    start = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, images_seen=128, batch_images=128)
    assert torch.allclose(ema.shadow["weight"], start + (1 - beta))
    assert ema.shadow["weight"].dtype == torch.float32


def test_ema_copies_before_start_and_keeps_fp32_for_bf16_models():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, decay=0.9, start_images=256)
    assert ema.shadow["weight"].dtype == torch.float32
    with torch.no_grad():
        model.weight.mul_(2)
    ema.update(model, images_seen=128, batch_images=128)
    assert torch.equal(ema.shadow["weight"], model.weight.float())
    target = torch.nn.Linear(4, 4)
    ema.copy_to(target)
    assert torch.equal(target.weight, model.weight.float())
    with pytest.raises(ValueError, match="exactly one"):
        EMA(model, decay=0.9, half_life_images=10)
    with pytest.raises(ValueError, match="exactly one"):
        EMA(model, decay=0.9, sigma_rel=0.05)


@pytest.mark.parametrize("sigma_rel,gamma", [(0.05, 16.97), (0.10, 6.94), (0.2, 1.83)])
def test_power_function_exponent_solves_edm2_eq3(sigma_rel, gamma):
    g = power_function_exponent(sigma_rel)
    assert g == pytest.approx(gamma, abs=0.01)            # EDM2's two tracked EMAs: sigma_rel 0.05 and 0.10
    assert math.sqrt(g + 1) / ((g + 2) * math.sqrt(g + 3)) == pytest.approx(sigma_rel, rel=1e-9)
    assert power_function_beta(sigma_rel, images_seen=64, batch_images=64) == 0   # the first step copies
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        power_function_exponent(0.3)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.15])
def test_power_ema_profile_has_relative_width_sigma_rel(sigma_rel):
    # Average tau and tau^2 (tau = images seen / T) over T steps: the EMA's averaging profile then has mean
    # E[tau] and variance E[tau^2] - E[tau]^2, whose square root is sigma_rel at the end of training.
    model = torch.nn.Module()
    model.p = torch.nn.Parameter(torch.zeros(2))
    ema = EMA(model, sigma_rel=sigma_rel)
    steps, batch = 4000, 8
    with torch.no_grad():
        for k in range(1, steps + 1):
            tau = k / steps
            model.p.copy_(torch.tensor([tau, tau * tau]))
            ema.update(model, images_seen=k * batch, batch_images=batch)
    mean, second = ema.shadow["p"].tolist()
    g = power_function_exponent(sigma_rel)
    assert mean == pytest.approx((g + 1) / (g + 2), rel=2e-3)        # the profile tau^gamma's mean on [0, 1]
    assert math.sqrt(second - mean ** 2) == pytest.approx(sigma_rel, rel=1e-2)


def test_lr_schedules():
    c = OptimConfig(lr=1.0, warmup_images=100)
    assert lr_at(c, 0, 1000) == pytest.approx(0.01) and lr_at(c, 99, 1000) == 1.0 and lr_at(c, 500, 1000) == 1.0
    c = OptimConfig(lr=1.0, lr_schedule="cosine", min_lr_ratio=0.1, warmup_images=0)
    assert lr_at(c, 0, 1000) == 1.0 and lr_at(c, 1000, 1000) == pytest.approx(0.1)
    assert lr_at(c, 500, 1000) == pytest.approx(0.55)
    c = OptimConfig(lr=1.0, lr_schedule="inv_sqrt", decay_start_images=100, warmup_images=0)
    assert lr_at(c, 50, 10**6) == 1.0 and lr_at(c, 400, 10**6) == pytest.approx(0.5)


def test_checkpoint_marker_and_keep_last(tmp_path):
    for images in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, images, {"w": torch.full((3,), float(images)), "n": images}, keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["images-000000000020", "images-000000000030"]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), {"w": torch.zeros(3), "n": 0})
    assert state["n"] == 30 and torch.equal(state["w"], torch.full((3,), 30.0))
    # a save that died before its marker is invisible, and refused when named
    torn = tmp_path / "checkpoints" / "images-000000000040"
    torn.mkdir()
    (torn / ".metadata").write_bytes(b"")
    assert ckpt.latest_checkpoint(tmp_path).name == "images-000000000030"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(torn, {"w": torch.zeros(3)})


def test_snapshot_round_trip(tmp_path):
    path = ckpt.save_snapshot(tmp_path, 7, {"a": torch.arange(3.0)}, "seed: 1\n")
    tensors, meta = ckpt.load_snapshot(path)
    assert torch.equal(tensors["a"], torch.arange(3.0)) and meta["config"] == "seed: 1\n" and meta["weights"] == "ema"
    assert path.with_suffix(".json").exists() and ckpt.latest_snapshot(tmp_path) == path
    assert not math.isnan(float(meta["images_seen"]))
