"""EDM2 UNet: sizes and cost against the paper's table, shapes, magnitude preservation at init,
forced weight normalisation (also sharded under FSDP2 on 2 gloo ranks), EDM preconditioning in RF's
variables, the uncertainty-weighted loss (CFG batching and a short fit in that configuration), fused
(Triton, interpreted) vs reference model, per-block compile, config errors, and the digits recipe end
to end for a few steps (RF and DDPM). The checks it shares with the other networks (plain
configuration): test_models_zoo.py."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archirf.config import ConfigError, load_config
from archirf.models import EDM2_PRESETS, EDM2UNet, build_model
from archirf.models.edm2_unet import edm_preconditioning
from archirf.objectives.rectified_flow import interpolate, regression_loss, velocity_target

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "configs" / "edm2_digits.yaml")

# EDM2 Table 2 (ImageNet-512, 64x64x4 latents): parameters (M) and forward G MACs per image ("Gflops").
PAPER = {"EDM2-XS": (125, 46), "EDM2-S": (280, 102.2), "EDM2-M": (498, 181), "EDM2-L": (777, 282),
         "EDM2-XL": (1119, 406), "EDM2-XXL": (1523, 552)}


def tiny(**overrides) -> EDM2UNet:
    kw = dict(input_size=8, in_channels=3, num_classes=10, channels=16, channel_mult=(1, 2), num_res_blocks=1,
              attn_resolutions=(4,), channels_per_head=16, kernels="reference")
    kw.update(overrides)
    return EDM2UNet(**kw)


@torch.no_grad()
def wake_(model: EDM2UNet, seed: int = 0) -> EDM2UNet:
    """Zero-initialised gains to nonzero values, so that every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("gain"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def inputs(batch=4, channels=3, size=8, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, size, size, generator=g), torch.rand(batch, generator=g),
            torch.randint(0, num_classes + 1, (batch,), generator=g))


# ---------------------------------------------------------------------------------------------
# Sizes, cost, shapes

@pytest.fixture(autouse=True)
def _interpreter_tiles(monkeypatch):
    """Whole-model tests: larger tiles for the mp kernels in Triton's interpreter, whose cost is per program and
    loop step (tests/test_kernels_mp.py keeps the small ones that cover several tiles and tails)."""
    from archirf_kernels import mp

    monkeypatch.setattr(mp, "INTERPRETER_TILE", 4096)
    monkeypatch.setattr(mp, "INTERPRETER_WEIGHT_BLOCK", 1024)


@pytest.mark.parametrize("preset", list(PAPER))
def test_presets_match_the_papers_parameters_and_cost(preset):
    with torch.device("meta"):
        model = EDM2UNet(input_size=64, in_channels=4, num_classes=1000, **EDM2_PRESETS[preset])
    params, macs = PAPER[preset]
    assert model.num_params() / 1e6 == pytest.approx(params, rel=0.01)
    # the paper's counter also counts the per-forward weight normalisation and attention's softmax;
    # ours: convolutions and attention matmuls only, 1-2.5% below
    assert 0.975 < model.flops_per_image() / 1e9 / macs <= 1.0


def test_flops_per_image_counts_every_matmul():
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny()
    x, t, y = inputs(batch=1)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):   # attention as matmuls
        model(x, t, y)
    # the label embedding is a gather here (EDM2 multiplies a one-hot vector): no multiply-adds
    assert counter.get_total_flops() // 2 == model.flops_per_image()


@pytest.mark.parametrize("channels,size,mult", [(3, 8, (1, 2)), (1, 16, (1, 2, 2)), (4, 8, (2,))])
def test_output_has_input_shape_and_is_zero_at_init(channels, size, mult):
    model = tiny(in_channels=channels, input_size=size, channel_mult=mult, attn_resolutions=())
    x, t, y = inputs(channels=channels, size=size)
    out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out))         # learned output gain starts at 0 (as EDM2)
    assert wake_(model)(x, t, y).abs().mean() > 0.1


def test_fourier_features_do_not_depend_on_the_global_seed():
    # sampling from a run's EMA parameters builds a fresh model: its fixed buffers must be the trained ones
    torch.manual_seed(0)
    a = tiny(uncertainty_weighting=True)
    torch.manual_seed(1)
    b = tiny(uncertainty_weighting=True)
    assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers()))
    assert not torch.equal(a.emb_fourier.freqs[:8], a.logvar_fourier.freqs[:8])
    with torch.device("meta"):
        assert tiny().emb_fourier.freqs.is_meta


def test_build_from_config_and_preset_errors():
    cfg = load_config(RECIPE)
    model = build_model(cfg)
    assert isinstance(model, EDM2UNet) and model.num_classes == 10 and model.loss_logvar
    with pytest.raises(ConfigError, match="unknown model.preset 'EDM2-Q'.*EDM2-XS"):
        build_model(load_config(RECIPE, ["model.preset=EDM2-Q"]))


@pytest.mark.parametrize("override,match", [
    (["model.attn_resolutions=[5]"], r"attn_resolutions \[5\] are not resolutions of this UNet"),
    (["model.channel_mult=[1,1,1,1,1,1]"], "must be divisible by 32"),
    (["model.channels_per_head=48"], "not multiples of model.channels_per_head"),
    (["objective.name=ddpm"], "model.preconditioning=edm is written for rectified flow"),
    (["model.dropout=1.0"], r"model.dropout must be in \[0, 1\)"),
    (["model.sigma_data=0"], "sigma_data must be > 0"),
    (["model.preconditioning=karras"], "model.preconditioning"),
])
def test_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RECIPE, override)


# ---------------------------------------------------------------------------------------------
# Magnitude preservation, forced weight normalisation

def test_activations_keep_unit_magnitude_at_init():
    torch.manual_seed(0)
    model = EDM2UNet(input_size=16, in_channels=4, num_classes=10, channels=64, channel_mult=(1, 2, 2),
                     num_res_blocks=2, attn_resolutions=(8,), kernels="reference")
    rms = []
    hooks = [b.register_forward_hook(lambda m, i, o: rms.append(o.square().mean().sqrt().item()))
             for b in model.blocks]
    x, t, y = inputs(batch=16, channels=4, size=16)
    model(x, t, y)
    for h in hooks:
        h.remove()
    assert len(rms) == len(model.blocks)
    assert all(0.7 < r < 1.3 for r in rms), [round(r, 3) for r in rms]     # measured: 0.80 to 0.99


# ---------------------------------------------------------------------------------------------
# The wiring of the balances and the clip (EDM2 App. B: mp_cat(x, skip, t): t is the skip's share;
# mp_sum(noise embedding, class embedding, t): t is the class's share; clip at each block's output)

def _first_decoder_block_call(model: EDM2UNet):
    """(block, (h, emb, skip)) of the first decoder block that concatenates a skip connection."""
    block = model.blocks[model._skip.index("pop")]
    seen = []
    hook = block.register_forward_hook(lambda m, args, out: seen.append(args))
    x, t, y = inputs()
    model(x, t, y)
    hook.remove()
    return block, seen[0]


@torch.no_grad()
def test_concat_balance_is_the_skip_connections_share():
    for balance, fixed in ((0.0, "h"), (1.0, "skip")):                  # 0: the skip is ignored; 1: the main path
        block, (h, emb, skip) = _first_decoder_block_call(wake_(tiny(concat_balance=balance)).eval())
        other = torch.randn_like(skip if fixed == "h" else h)
        changed = block(h, emb, other) if fixed == "h" else block(other, emb, skip)
        torch.testing.assert_close(changed, block(h, emb, skip), atol=1e-6, rtol=0)
    block, (h, emb, skip) = _first_decoder_block_call(wake_(tiny(concat_balance=0.3)).eval())
    assert not torch.allclose(block(h, emb, torch.randn_like(skip)), block(h, emb, skip), atol=1e-3)
    assert not torch.allclose(block(torch.randn_like(h), emb, skip), block(h, emb, skip), atol=1e-3)


@torch.no_grad()
def test_label_balance_is_the_class_embeddings_share():
    x, t, y = inputs()
    other_y, other_t = (y + 1) % 10, (t + 0.37) % 1
    model = wake_(tiny(label_balance=0.0)).eval()                       # the class is ignored
    torch.testing.assert_close(model(x, t, other_y), model(x, t, y), atol=1e-6, rtol=0)
    model = wake_(tiny(label_balance=1.0)).eval()                       # only the class (no preconditioning)
    torch.testing.assert_close(model(x, other_t, y), model(x, t, y), atol=1e-6, rtol=0)
    assert not torch.allclose(model(x, t, other_y), model(x, t, y), atol=1e-3)


@torch.no_grad()
def test_every_block_output_is_clipped():
    model = wake_(tiny()).eval()
    outs = []
    for block in model.blocks:
        block.clip_act = 0.25                                           # EDM2's 256, low enough to bite here
        block.register_forward_hook(lambda m, args, out: outs.append(out.abs().max().item()))
    model(*inputs())
    assert len(outs) == len(model.blocks)
    assert max(outs) == pytest.approx(0.25) and all(o <= 0.25 for o in outs), outs


def test_forced_weight_normalisation_is_a_step_hook_not_a_forward_write():
    model = tiny().train()
    for conv in model.mp_convs():                           # unit-RMS rows from init
        rms = conv.weight.flatten(1).square().mean(1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).add_(0.1)
    before = {n: p.clone() for n, p in model.named_parameters()}
    model(*inputs())                                        # forward in train mode writes no parameter
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    model.post_optimizer_step()
    for conv in model.mp_convs():
        rms = conv.weight.flatten(1).square().mean(1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    assert torch.equal(before["out_gain"], model.out_gain)  # gains are not normalised


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_forced_weight_normalisation_sharded_equals_unsharded(tmp_path, kernels):
    # scripts/edm2_sharded_check.py on 2 gloo ranks with a tiny UNet of odd row counts (a 3-row
    # out_conv, a 1-row logvar_linear: rank 1's shard of it holds no rows): post_optimizer_step on each
    # rank's local shards equals the unsharded hook (allclose 1e-6, checked by the script on rank 0,
    # which then saves the weights); kernels=triton runs the Triton normalisation (the interpreter here)
    out = tmp_path / "weights.pt"
    shape = ["model.channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]",
             "model.channels_per_head=16", f"model.kernels={kernels}", "data.resolution=8", "data.channels=3",
             "data.num_classes=10"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "edm2_sharded_check.py"), "--preset", "none", "--out", str(out), *shape]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"})
    from test_distributed import failure_report

    assert proc.returncode == 0, failure_report(proc)
    assert "-> PASS" in proc.stdout
    weights = torch.load(out)
    assert "out_conv.weight" in weights and weights["logvar_linear.weight"].shape == (1, 128)


# ---------------------------------------------------------------------------------------------
# EDM preconditioning and the weighted loss

def test_edm_preconditioning_in_rf_variables_matches_edm():
    sd = 0.5
    t = torch.tensor([0.0, 1e-4, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    c_in, c_noise, a, b, log_lambda = edm_preconditioning(t, sd)
    assert all(torch.isfinite(v).all() for v in (c_in, c_noise, a, b, log_lambda))
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    x_t = interpolate(x, eps, t)
    inner = slice(1, 5)                                      # EDM's own formulas need 0 < sigma < inf
    sigma = (t / (1 - t))[inner, None]
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    x_edm = x[inner] + sigma * eps[inner]                    # = x_t / (1 - t)
    torch.testing.assert_close(x_edm, x_t[inner] / (1 - t[inner, None]))
    f_ideal = (x[inner] - c_skip * x_edm) / c_out            # the F with D = x
    v = a[inner, None] * x_t[inner] - b[inner, None] * f_ideal
    torch.testing.assert_close(v, velocity_target(x, eps)[inner])
    torch.testing.assert_close(c_in[inner, None] * x_t[inner], x_edm / (sigma ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(c_noise[inner], sigma.log().squeeze(1) / 4)
    # EDM's weight 1/c_out^2 on |D - x|^2 equals exp(log_lambda) on the velocity MSE |D - x|^2 / t^2
    torch.testing.assert_close(log_lambda[inner], (t[inner] ** 2 / c_out.squeeze(1) ** 2).log())


def test_uncertainty_weighted_loss_trains_logvar():
    torch.manual_seed(0)
    model = wake_(tiny(preconditioning="edm", uncertainty_weighting=True))
    x, t, y = inputs()
    out, logvar = model(x, t, y, return_logvar=True)
    assert out.shape == x.shape and logvar.shape == (4,)
    mse = torch.rand(4)
    torch.testing.assert_close(regression_loss((out, logvar), out.detach() + mse.sqrt().view(-1, 1, 1, 1)),
                               mse * torch.exp(-logvar) + logvar)
    loss = regression_loss((out, logvar), torch.randn_like(out)).mean()
    loss.backward()
    assert model.logvar_linear.weight.grad.abs().sum() > 0 and model.out_gain.grad.abs() > 0
    assert not tiny().loss_logvar and tiny(uncertainty_weighting=True).loss_logvar


def test_fresh_edm_preconditioned_model_outputs_the_skip_path():
    # Where the zoo's networks output exact zeros at init (test_models_zoo.py): with preconditioning=edm
    # the zero is F's (the output gain starts at 0), so the velocity is the skip path alone, v = a(t) x_t.
    model = tiny(preconditioning="edm")
    x, t, y = inputs()
    a = edm_preconditioning(t, model.sigma_data)[2]
    assert torch.equal(model(x, t, y), a.view(-1, 1, 1, 1) * x)


def test_cfg_batch_equals_two_passes_with_the_loss_weight():
    # test_models_zoo.py checks CFG batching of the plain network; here the recipes' configuration, whose
    # forward also returns the per-sample log loss weight: a function of t alone, whatever the label.
    model = wake_(tiny(preconditioning="edm", uncertainty_weighting=True)).eval()
    x, t, _ = inputs()
    y, null = torch.tensor([0, 3, 7, 9]), torch.full((4,), 10)
    both, logvar_both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), return_logvar=True)
    (cond, logvar), (uncond, logvar_null) = model(x, t, y, return_logvar=True), model(x, t, null, return_logvar=True)
    torch.testing.assert_close(both, torch.cat([cond, uncond]), atol=1e-5, rtol=0)
    torch.testing.assert_close(logvar_both, torch.cat([logvar, logvar]), atol=1e-6, rtol=0)
    assert torch.equal(logvar, logvar_null) and not torch.allclose(cond, uncond, atol=1e-4)


def test_few_steps_lower_the_uncertainty_weighted_loss():
    # test_models_zoo.py's short fit in the recipes' configuration: (v, logvar) and the loss
    # mse * exp(-logvar) + logvar. The learned u(t) alone lowers that loss (it fits the log of the current
    # MSE), so the velocity MSE must fall as well. EDM2's rate 1e-2 and forced weight normalisation after
    # every step, as the recipes and the trainer.
    torch.manual_seed(0)
    model = tiny(preconditioning="edm", uncertainty_weighting=True).train()
    x, t, y = inputs(batch=8)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    x_t, v = interpolate(x, noise, t), velocity_target(x, noise)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, mses = [], []
    for _ in range(30):
        out, logvar = model(x_t, t, y, return_logvar=True)
        loss = regression_loss((out, logvar), v).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.post_optimizer_step()
        losses.append(loss.item())
        mses.append(regression_loss(out.detach(), v).mean().item())
    assert losses[-1] < 0.8 * losses[0] and mses[-1] < 0.8 * mses[0], (losses, mses)   # measured: 0.17x, 0.57x


# ---------------------------------------------------------------------------------------------
# Fused (Triton, in the interpreter on CPU) against the reference model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"    # no GPU: the kernels run in the interpreter


def test_fused_model_matches_reference_model():
    # channels_last, as the model runs; the kernels' NCHW path is covered by tests/test_kernels_mp.py
    torch.manual_seed(0)
    kw = dict(preconditioning="edm", uncertainty_weighting=True, class_dropout_prob=0.0)   # no random labels
    fused, ref = tiny(kernels="triton", **kw).to(DEVICE), tiny(**kw).to(DEVICE)
    ref.load_state_dict(fused.state_dict())
    wake_(fused), wake_(ref)
    x, t, y = (v.to(DEVICE) for v in inputs(batch=2))
    out_f, lv_f = fused(x, t, y, return_logvar=True)
    out_r, lv_r = ref(x, t, y, return_logvar=True)
    torch.testing.assert_close(out_f, out_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lv_f, lv_r)
    grads_f = torch.autograd.grad(regression_loss((out_f, lv_f), x).mean(), list(fused.parameters()))
    grads_r = torch.autograd.grad(regression_loss((out_r, lv_r), x).mean(), list(ref.parameters()))
    for (name, _), gf, gr in zip(fused.named_parameters(), grads_f, grads_r):
        torch.testing.assert_close(gf, gr, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch-internal
def test_blocks_compile_fullgraph():
    # The fused model with every block compiled on its own, as parallel.py does (one graph per distinct
    # block): the same output and parameter gradients as the eager reference model.
    torch._dynamo.reset()
    model = wake_(tiny(kernels="triton", class_dropout_prob=0.0)).to(DEVICE)
    ref = tiny(class_dropout_prob=0.0).to(DEVICE)
    ref.load_state_dict(model.state_dict())
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(model.blocks))
    for block in model.blocks:
        block.compile(fullgraph=True, backend="aot_eager")
    x, t, y = (v.to(DEVICE) for v in inputs(batch=2))
    out, out_ref = model(x, t, y), ref(x, t, y)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    grads_ref = torch.autograd.grad(out_ref.square().mean(), list(ref.parameters()))
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    for (name, _), g, g_ref in zip(ref.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-3, msg=name)


# ---------------------------------------------------------------------------------------------
# The recipe, end to end

FAST = ["total_images=256", "global_batch=64", "log_every=128", "sample_every=0", "checkpoint_every=0",
        "sample.steps=2", "sample.per_class=1", "sample.classes=[0,1]", "sample.gif_frames=2", "progress=false",
        "optim.warmup_images=64", "optim.decay_start_images=128"]


@pytest.mark.parametrize("objective", [["objective.name=rectified_flow"],
                                       ["objective.name=ddpm", "objective.logit_normal_mean=0", "objective.logit_normal_std=1",
                                        "model.preconditioning=none", "model.sigma_data=null", "sample.sampler=auto",
                                        "sample.grid=uniform"]], ids=["rf", "ddpm"])
def test_recipe_trains_a_few_steps(tmp_path, objective):
    import json

    from archirf import checkpoint as ckpt
    from archirf.trainer import train

    run = train(load_config(RECIPE, [f"run_dir={tmp_path}", *FAST, *objective]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in rows] == [128, 256]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["lr"] == pytest.approx(1e-2 / math.sqrt(192 / 128))   # inv_sqrt after decay_start
    assert (run / "samples.png").stat().st_size > 0
    # forced weight normalisation ran after the last step: the trained weights' rows have unit RMS
    model = build_model(load_config(RECIPE, [*FAST, *objective]))
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run), {"model": model.state_dict()})["model"]
    model.load_state_dict(state)
    for conv in model.mp_convs():
        rms = conv.weight.flatten(1).square().mean(1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)


@pytest.mark.parametrize("recipe,channels", [("edm2_s_latent.yaml", 4), ("edm2_s_img64.yaml", 3)])
def test_full_size_recipes_build_edm2_s(recipe, channels):
    cfg = load_config(str(ROOT / "configs" / recipe))
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_params() / 1e6 == pytest.approx(280, rel=0.01) and model.in_channels == channels
    assert model.loss_logvar and cfg.optim.lr_schedule == "inv_sqrt" and cfg.optim.grad_clip == 0


def test_step_benchmark_smoke(tmp_path):
    import json

    from benchmarks import edm2_step
    assert edm2_step.main(["--out", str(tmp_path), "--smoke", "--cases", "latents-64x64x4",
                           "--impls", "ours,compiled"]) == 0
    doc = json.loads((tmp_path / "edm2_step.json").read_text())
    assert [r["impl"] for r in doc["rows"]] == ["ours", "compiled"]
    assert doc["rows"][1]["first_loss_rel_diff"] < 1e-5            # same init, data and noise
    assert "ours vs this" in (tmp_path / "edm2_step.md").read_text()


def test_a_preset_alone_builds_the_papers_network():
    """model.preset sets the whole config-G shape, whatever channel_mult & co. say (EDM2-S: 280.2M)."""
    cfg = load_config(None, ["model.name=edm2_unet", "model.preset=EDM2-S", "data.resolution=64",
                             "data.channels=4", "data.num_classes=1000"])
    with torch.device("meta"):
        model = build_model(cfg)
    assert abs(model.num_params() / 1e6 - 280.2) < 0.5


@pytest.mark.parametrize("override", ["model.preconditioning=edm", "model.uncertainty_weighting=true"])
@pytest.mark.parametrize("name", ["dit", "mmdit", "adm_unet"])
def test_edm2_only_keys_are_refused_elsewhere(name, override):
    with pytest.raises(ConfigError, match=rf"model\.{override.split('=')[0][6:]}=True|'edm' is not read by "
                                           rf"model.name={name}.*remove it"):
        load_config(None, [f"model.name={name}", override])
