"""Every network of the zoo (DiT, MMDiT with learned or pretrained class tokens, ADM UNet, EDM2 UNet) through
the same checks: shapes, cost counters, zero init, conditioning, CFG batching, meta materialisation, compile,
a short fit; then what is particular to MMDiT (joint attention, fused kernels with either attention backend,
class embeddings) and to the ADM UNet (the EDM2 UNet's: test_edm2.py). CPU, tiny shapes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from archirf.config import Config, ConfigError, DataConfig, ModelConfig, load_config
from archirf.models import (ADM_PRESETS, DIT_PRESETS, MMDIT_PRESETS, MODELS, ADMUNet, DiT, EDM2UNet, MMDiT,
                            build_model)
from archirf.models.adm_unet import AttentionBlock as AdmAttentionBlock
from archirf.models.layers import Attention, joint_attention

from test_kernels_attention import pin_backend
from test_models import inputs, perturb_

EMBED_DIM = 6  # width of the tiny pretrained class embeddings


def class_embeddings(num_classes=10, tokens=3, dim=EMBED_DIM, seed=1):
    # On the CPU even under a meta device context: what load_class_embeddings returns.
    return torch.randn(num_classes, tokens, dim, generator=torch.Generator().manual_seed(seed), device="cpu")


def tiny(name: str, **overrides) -> torch.nn.Module:
    """A few-thousand-parameter model of each kind, on 8x8 inputs with 3 channels and 10 classes."""
    common = dict(input_size=8, in_channels=3, num_classes=10)
    kw = {
        "dit": dict(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_register_tokens=4),
        "mmdit": dict(patch_size=2, hidden_size=32, depth=2, depth_single_blocks=1, num_heads=2,
                      num_register_tokens=2, label_tokens=3),
        "mmdit-pretrained": dict(patch_size=2, hidden_size=32, depth=2, depth_single_blocks=1, num_heads=2,
                                 num_register_tokens=2, class_embeddings=class_embeddings()),
        "mmdit-double-only": dict(patch_size=2, hidden_size=32, depth=2, depth_single_blocks=0, num_heads=2,
                                  num_register_tokens=0, label_tokens=2),
        "adm_unet": dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, head_channels=16),
        "edm2_unet": dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, channels_per_head=16),
    }[name]
    kw.update(common)
    kw.update(overrides)
    if name in ("adm_unet", "edm2_unet"):
        kw.setdefault("attn_resolutions", (kw["input_size"] // 2,))    # attention on the lower level
    cls = {"dit": DiT, "adm_unet": ADMUNet, "edm2_unet": EDM2UNet}.get(name, MMDiT)
    return cls(**kw)


ZOO = ["dit", "mmdit", "mmdit-pretrained", "mmdit-double-only", "adm_unet", "edm2_unet"]
FUSED_MMDIT = dict(kernels="triton", attn_impl="triton", depth=1)   # one block of each kind (interpreter: slow)
NEW = ["mmdit", "mmdit-pretrained", "adm_unet"]
# The `joint` flags of the QK-norm attention op's calls per model (joint: MMDiT's double blocks). The op's
# backend (models call it with 'auto', which picks by tokens and head dim) is pinned by
# test_kernels_attention.pin_backend, as the DiT parity test there does.
ATTENTION_CALLS = {"dit": {False}, "mmdit": {True, False}, "mmdit-double-only": {True}}


# ---------------------------------------------------------------------------------------------
# Shapes, sizes, cost

@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("channels,size", [(3, 8), (1, 16), (4, 8)])
def test_output_has_input_shape(name, channels, size):
    model = perturb_(tiny(name, in_channels=channels, input_size=size))
    x, t, y = inputs(channels=channels, size=size, batch=3)
    assert model(x, t, y).shape == x.shape


@pytest.mark.parametrize("overrides,cls", [
    (["model.name=mmdit", "model.depth=2", "model.depth_single_blocks=1", "model.hidden_size=32",
      "model.num_heads=2"], MMDiT),
    (["model.name=adm_unet", "model.channels=32", "model.num_res_blocks=1"], ADMUNet),
])
def test_build_model_from_config(overrides, cls):
    cfg = load_config(None, overrides)
    model = build_model(cfg)
    assert type(model) is cls and model.num_classes == cfg.data.num_classes
    x, t, y = inputs(channels=cfg.data.channels, size=cfg.data.resolution)
    y[0] = model.num_classes                                # the null class is a valid label
    assert model(x, t, y).shape == x.shape
    assert set(MODELS) == {"dit", "mmdit", "adm_unet", "edm2_unet"}


def meta_model(name: str, preset: str, resolution: int, channels: int):
    extra = dict(num_register_tokens=0) if name in ("dit", "mmdit") else {}
    cfg = Config(model=ModelConfig(name=name, preset=preset, **extra),
                 data=DataConfig(resolution=resolution, channels=channels, num_classes=1000))
    with torch.device("meta"):                              # no memory, no init cost
        return build_model(cfg)


@pytest.mark.parametrize("preset,params", [
    ("MMDiT-d24", 2.0e9),    # SD3 Sec. 5.3: depth 24 = 2B (SD3 Medium), without the text encoders
    ("MMDiT-d38", 8.0e9),    # depth 38 = the 8B model
])
def test_sd3_presets_have_the_papers_sizes(preset, params):
    model = meta_model("mmdit", preset, 32, 16)
    assert model.hidden_size == 64 * len(model.blocks) and model.blocks[0].img.attn.head_dim == 64
    assert abs(model.num_params() - params) / params < 0.03, model.num_params()


def test_mmdit_xl2_is_comparable_to_dit_xl2():
    # Same width, patch and 28 blocks: within 3% of DiT-XL/2's 118.6 G MACs at 256 tokens.
    mmdit, dit = meta_model("mmdit", "MMDiT-XL/2", 32, 4), meta_model("dit", "DiT-XL/2", 32, 4)
    assert mmdit.hidden_size == dit.hidden_size and len(mmdit.blocks) == len(dit.blocks)
    assert abs(mmdit.flops_per_image() - dit.flops_per_image()) / dit.flops_per_image() < 0.03


def test_adm64_has_the_papers_size():
    model = meta_model("adm_unet", "ADM-64", 64, 3)
    # ADM's ImageNet-64 model: 296M parameters (its learned-variance output conv: a few thousand more).
    assert abs(model.num_params() - 296e6) / 296e6 < 0.01, model.num_params()


# The EDM2 UNet's count: test_edm2.py (its attention through SDPA's math backend; its label embedding a gather).
@pytest.mark.parametrize("name", [n for n in ZOO if n != "edm2_unet"])
def test_flops_per_image_counts_every_matmul(name):
    # torch's counter sees every mm/bmm/conv actually run (2 FLOPs per multiply-add), embeddings included.
    model = tiny(name, attn_impl="reference").eval()
    x, t, y = inputs(batch=2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    assert counter.get_total_flops() == 2 * 2 * model.flops_per_image()


# ---------------------------------------------------------------------------------------------
# Initialization and conditioning

@pytest.mark.parametrize("name", ZOO)
def test_fresh_model_outputs_exact_zeros(name):
    model = tiny(name)
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), torch.zeros_like(x))


@pytest.mark.parametrize("name", [n for n in ZOO if n != "edm2_unet"])   # EDM2: its own init (test_edm2)
def test_every_block_starts_as_the_identity(name):
    # adaLN-Zero gates, ADM's zeroed conv2 and attention projection: each residual unit starts as its skip
    # path, not only the zeroed output layer (which alone would make the fresh output 0 too).
    from archirf.models.adm_unet import AttentionBlock, ResBlock
    from archirf.models.layers import AdaLNZeroBlock
    from archirf.models.mmdit import DoubleStreamBlock

    def check(module, args, out):
        if isinstance(module, ResBlock):
            expected = module.skip(module._resample(args[0]))
        elif isinstance(module, DoubleStreamBlock):
            expected = args[:2]
        else:
            expected = args[0]
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        seen.append(type(module).__name__)

    model = tiny(name).train()
    seen = []
    for module in model.modules():
        if isinstance(module, (AdaLNZeroBlock, DoubleStreamBlock, ResBlock, AttentionBlock)):
            module.register_forward_hook(check)
    x, t, y = inputs()
    model(x + torch.randn_like(x), t, y)
    kinds = {"dit": {"AdaLNZeroBlock"}, "mmdit": {"DoubleStreamBlock", "AdaLNZeroBlock"},
             "mmdit-pretrained": {"DoubleStreamBlock", "AdaLNZeroBlock"}, "mmdit-double-only": {"DoubleStreamBlock"},
             "adm_unet": {"ResBlock", "AttentionBlock"}}[name]
    assert set(seen) == kinds


@pytest.mark.parametrize("name", ZOO)
def test_output_depends_on_y_and_t(name):
    model = perturb_(tiny(name)).eval()
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.abs().mean() > 1e-2
    assert not torch.allclose(out, model(x, t, (y + 1) % 10), atol=1e-4)
    assert not torch.allclose(out, model(x, (t + 0.3) % 1, y), atol=1e-4)
    assert torch.equal(out, model(x, t, y))                 # eval mode is deterministic


@pytest.mark.parametrize("name", ZOO)
def test_every_parameter_gets_a_gradient(name):
    # No dead weights: e.g. MMDiT's last context stream is pre-only when no single-stream block reads it.
    model = perturb_(tiny(name)).train()
    x, t, y = inputs()
    model(x, t, y).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.numel() and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead, dead


@pytest.mark.parametrize("name", ZOO)
def test_cfg_batch_equals_two_passes(name):
    model = perturb_(tiny(name)).eval()
    x, t, y = inputs()
    null = torch.full_like(y, model.num_classes)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    cond, uncond = model(x, t, y), model(x, t, null)
    torch.testing.assert_close(both, torch.cat([cond, uncond]), atol=1e-5, rtol=0)
    assert not torch.allclose(cond, uncond, atol=1e-4)


# Not the EDM2 UNet: it has no initialize_weights() (its init is forced weight normalisation of random
# weights); a meta-built one is filled with rank 0's CPU init by parallel.build_training_model.
@pytest.mark.parametrize("name", [n for n in ZOO if n != "edm2_unet"])
def test_meta_model_materializes_like_a_cpu_model(name):
    with torch.device("meta"):
        model = tiny(name)
    model.to_empty(device="cpu")
    model.initialize_weights()
    cpu_model = tiny(name)
    buffers = dict(cpu_model.named_buffers())
    assert buffers.keys() == dict(model.named_buffers()).keys()
    for key, buffer in model.named_buffers():               # fixed positions, pretrained class tables
        assert torch.equal(buffer, buffers[key]), key
    assert set(model.state_dict()) == set(cpu_model.state_dict())   # every buffer is persistent
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), torch.zeros_like(x))


@pytest.mark.parametrize("name", ["dit", "mmdit", "adm_unet"])     # pretrained embeddings need classes
def test_unconditional_model_uses_the_null_class(name):
    model = perturb_(tiny(name, num_classes=0)).train()
    x, t, _ = inputs()
    y = torch.zeros(x.shape[0], dtype=torch.long)
    assert model.num_classes == 0 and model.y_embedder.embedding_table.num_embeddings == 1
    assert model(x, t, y).shape == x.shape


@pytest.mark.parametrize("name", ["mmdit", "mmdit-pretrained", "adm_unet", "edm2_unet"])
def test_label_dropout_leaves_the_callers_labels_alone(name):
    model = perturb_(tiny(name, class_dropout_prob=0.9999)).train()
    x, t, y = inputs()
    torch.manual_seed(0)                                    # the dropout draws: all four below 0.9999
    y_before = y.clone()
    out = model(x, t, y)
    assert torch.equal(y, y_before)
    model.eval()                                            # all labels were dropped: = the null class
    torch.testing.assert_close(out, model(x, t, torch.full_like(y, 10)), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Compile and training

@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch-internal
@pytest.mark.parametrize("name,fused,attn_backend", [("dit", False, None), ("dit", True, None),
                                                     ("mmdit-pretrained", False, None),
                                                     ("mmdit", True, "fused"), ("mmdit", True, "sdpa")])
def test_compile_fullgraph_train_step_matches_eager(name, fused, attn_backend, monkeypatch):
    # fullgraph=True fails on any graph break or host sync; fused: the Triton custom ops (adaLN, and
    # MMDiT's joint / single QK-norm attention with each backend) trace too, on one block of each kind
    # (they run in the interpreter on the CPU). Train mode adds the random label dropout (off here, so
    # eager and compiled see the same labels). The UNets: test_each_block_compiles_fullgraph (EDM2's:
    # test_edm2.py).
    torch._dynamo.reset()
    calls = pin_backend(monkeypatch, attn_backend) if attn_backend else []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernels = {}
    if fused:
        kernels = dict(kernels="triton", depth=1) if name == "dit" else FUSED_MMDIT
    model = perturb_(tiny(name, class_dropout_prob=0.0, **kernels)).train().to(device)
    x, t, y = (v.to(device) for v in inputs(batch=2))   # batch 2: the interpreted kernels cost per program
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, t, y)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    out_eager = model(x, t, y)
    grads_eager = torch.autograd.grad(out_eager.square().mean(), list(model.parameters()))
    torch.testing.assert_close(out, out_eager, atol=1e-5, rtol=1e-5)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager, atol=1e-5, rtol=1e-4)
    assert set(calls) == (ATTENTION_CALLS[name] if attn_backend else set())


@pytest.mark.parametrize("name,overrides", [
    ("mmdit", {}),
    ("adm_unet", dict(input_size=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(8, 4))),
])
def test_each_block_compiles_fullgraph(name, overrides):
    # What parallel.py does: every entry of model.blocks compiled on its own (fullgraph=True fails when
    # torch.compile's recompile limit is hit: a 4-level UNet has blocks of many shapes), then forward and
    # backward match eager.
    torch._dynamo.reset()
    model = perturb_(tiny(name, class_dropout_prob=0.0, **overrides)).train()
    x, t, y = inputs(size=model.input_size)
    expected = model(x, t, y)
    grads_expected = torch.autograd.grad(expected.square().mean(), list(model.parameters()))
    for block in model.blocks:
        block.compile(fullgraph=True, backend="aot_eager")
    out = model(x, t, y)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for g, g_expected in zip(grads, grads_expected):
        torch.testing.assert_close(g, g_expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["dit", *NEW, "edm2_unet"])
def test_few_steps_lower_mse(name):
    # The EDM2 UNet at its own rate (EDM2's 1e-2, as its recipes): its stored weights have unit RMS per
    # element (forward normalises them), several times the others' init scale, so a step of 3e-3 changes
    # them relatively less (20 steps: -4%, not -20%); after each step its forced weight normalisation, as
    # the trainer does.
    torch.manual_seed(0)
    model = tiny(name).train()
    x, t, y = inputs(batch=8)
    target = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2 if name == "edm2_unet" else 3e-3)
    post_step = getattr(model, "post_optimizer_step", lambda: None)
    losses = []
    for _ in range(20):
        loss = (model(x, t, y) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        post_step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("recipe,pretrained", [("mmdit_digits", False), ("mmdit_digits", True),
                                               ("adm_digits", False)])
def test_digits_recipe_trains(recipe, pretrained, tmp_path):
    # The real recipe and trainer (one rank: the plain module), cut to a few steps: the loss goes down and the run writes its outputs.
    from archirf.trainer import train

    config = Path(__file__).resolve().parents[1] / "configs" / f"{recipe}.yaml"
    extra = []
    if pretrained:
        save_file({"embeddings": class_embeddings(tokens=2, dim=16)}, str(tmp_path / "classes.safetensors"))
        extra = [f"model.class_embeddings={tmp_path / 'classes.safetensors'}"]
    cfg = load_config(str(config), [f"run_dir={tmp_path / 'run'}", "total_images=1024", "log_every=256",
                                    "sample.steps=2", "sample.per_class=1", "sample.gif_frames=2",
                                    "optim.warmup_images=256", "progress=false", *extra])
    run = train(cfg)
    losses = [json.loads(line)["loss"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert (Path(run) / "samples.png").stat().st_size > 0
    if pretrained:                                          # the snapshot carries the fixed class table
        from archirf import checkpoint as ckpt

        from archirf.sample import load_for_sampling

        tensors = ckpt.load_snapshot(ckpt.latest_snapshot(run))[0]
        assert torch.equal(tensors["y_embedder.table"][:10], class_embeddings(tokens=2, dim=16))
        # sampling needs no embeddings file: the snapshot and the checkpoint carry the table
        (tmp_path / "classes.safetensors").unlink()
        for source in (ckpt.latest_snapshot(run), run):
            model = load_for_sampling(source)[0]
            assert torch.equal(model.y_embedder.table[:10], class_embeddings(tokens=2, dim=16)), source
            assert torch.equal(model.y_embedder.table[10], torch.zeros(2, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernel numerics need a GPU (the interpreter "
                                                           "computes bf16 wrongly)")
@pytest.mark.parametrize("name", ["mmdit", "mmdit-double-only"])
def test_fused_kernels_bf16_on_gpu(name):
    # The fused path in bf16 autocast at a real head width (64) against the reference path in fp32.
    shape = dict(hidden_size=128, num_heads=2, class_dropout_prob=0.0, input_size=16)
    ref = perturb_(tiny(name, kernels="reference", attn_impl="reference", **shape), std=0.02).cuda()
    fused = tiny(name, kernels="triton", attn_impl="triton", **shape).cuda()
    fused.load_state_dict(ref.state_dict())
    x, t, y = (v.cuda() for v in inputs(batch=8, size=16))
    out_ref = ref(x, t, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_fused = fused(x, t, y).float()
    out_ref.square().mean().backward()
    out_fused.square().mean().backward()

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
    assert rel(out_fused, out_ref) < 2e-2
    pairs = list(zip(ref.named_parameters(), fused.parameters()))
    for (n, p_ref), p_fused in pairs:                        # unused ones (the pre-only last context stream)
        assert (p_ref.grad is None) == (p_fused.grad is None), n
    pairs = [(n, p_ref, p_fused) for (n, p_ref), p_fused in pairs if p_ref.grad is not None]
    grads_ref = torch.cat([p_ref.grad.flatten() for _, p_ref, _ in pairs])
    grads_fused = torch.cat([p_fused.grad.flatten() for _, _, p_fused in pairs])
    assert rel(grads_fused, grads_ref) < 3e-2                 # all gradients together: bf16 rounding
    for n, p_ref, p_fused in pairs:
        if p_ref.grad.norm() > 1e-3 * grads_ref.norm():      # each one that carries signal
            assert rel(p_fused.grad, p_ref.grad) < 1e-1, n


# ---------------------------------------------------------------------------------------------
# MMDiT: joint attention, fused kernels, class tokens

def test_double_only_mmdit_ends_with_a_pre_only_context_stream():
    model = tiny("mmdit-double-only")
    assert [b.ctx.pre_only for b in model.blocks] == [False, True]
    last = model.blocks[-1].ctx
    assert last.attn.proj is None and not hasattr(last, "mlp") and last.attn.q_norm.weight is None
    assert not any(b.ctx.pre_only for b in tiny("mmdit").blocks[:2])


def test_joint_attention_is_attention_over_the_concatenation():
    # With the same weights in both streams, joint attention = one attention over the concatenated tokens.
    torch.manual_seed(0)
    attn = Attention(32, 2, qk_norm=True, attn_impl="sdpa")
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    a, b = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    out_a, out_b = joint_attention(attn.project_qkv(a), attn.project_qkv(b), attn, attn)
    whole = attn(torch.cat([a, b], dim=1))                  # = proj(attention(...))
    torch.testing.assert_close(attn.proj(torch.cat([out_a, out_b], dim=1)), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mmdit", "mmdit-double-only"])
def test_mmdit_reference_attention_matches_sdpa(name):
    ref = perturb_(tiny(name, attn_impl="reference")).eval()
    sdpa = tiny(name, attn_impl="sdpa").eval()
    sdpa.load_state_dict(ref.state_dict())
    x, t, y = inputs()
    torch.testing.assert_close(sdpa(x, t, y), ref(x, t, y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,overrides,attn_backend", [
    ("dit", dict(qk_norm=False), None), ("dit", dict(qk_norm=True), None),
    ("dit", dict(qk_norm=True), "sdpa"),        # DiT with each backend: test_dit_triton_attention_matches_reference
    *[(name, dict(depth=1), backend) for name in ("mmdit", "mmdit-double-only")    # joint+single; pre-only
      for backend in ("fused", "sdpa")]])
def test_fused_kernels_match_reference(name, overrides, attn_backend, monkeypatch):
    # kernels=triton runs the fused adaLN kernels, attn_impl=triton the fused (joint) QK-norm attention op
    # with `attn_backend` (Triton's interpreter on the CPU, see conftest.py; None: SDPA in both models, the
    # op must not run): same outputs and parameter gradients as the reference LayerNorm + modulate path and
    # the reference attention, in fp32.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = dict(hidden_size=40, num_heads=2, class_dropout_prob=0.0, **overrides)
    ref_attn, fused_attn = ("reference", "triton") if attn_backend else ("sdpa", "sdpa")
    calls = pin_backend(monkeypatch, attn_backend or "sdpa")
    ref = perturb_(tiny(name, kernels="reference", attn_impl=ref_attn, **shape)).to(device)
    fused = tiny(name, kernels="triton", attn_impl=fused_attn, **shape).to(device)
    fused.load_state_dict(ref.state_dict())
    x, t, y = (v.to(device) for v in inputs(batch=2))
    out_ref, out_fused = ref(x, t, y), fused(x, t, y)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-5, rtol=1e-5)
    out_ref.square().mean().backward()
    out_fused.square().mean().backward()
    for (name_, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name_: f"{n}: {m}")
    assert set(calls) == (ATTENTION_CALLS[name] if attn_backend else set())     # every attention op ran pinned


def test_mmdit_fused_kernels_run_the_custom_ops(monkeypatch):
    import archirf_kernels

    calls = []
    for op in ("joint_qk_norm_attention", "qk_norm_attention", "ada_layer_norm", "gated_residual_ada_layer_norm"):
        real = getattr(archirf_kernels, op)
        monkeypatch.setattr(archirf_kernels, op, lambda *a, _real=real, _op=op, **k: calls.append(_op) or _real(*a, **k))
    device = "cuda" if torch.cuda.is_available() else "cpu"          # impl=triton takes CUDA tensors there
    x, t, y = (v.to(device) for v in inputs(batch=1))
    tiny("mmdit", **FUSED_MMDIT).to(device)(x, t, y)
    assert {"joint_qk_norm_attention", "qk_norm_attention", "ada_layer_norm", "gated_residual_ada_layer_norm"} <= set(calls)


def test_register_tokens_join_the_context():
    x, t, y = inputs()
    model = perturb_(tiny("mmdit", num_register_tokens=3)).eval()
    assert model.register_tokens.shape == (1, 3, 32)
    out = model(x, t, y)
    with torch.no_grad():
        model.register_tokens.zero_()
    assert not torch.allclose(out, model(x, t, y), atol=1e-5)


def test_learned_label_tokens_are_k_per_class():
    model = tiny("mmdit", label_tokens=5)
    assert model.y_embedder.embedding_table.weight.shape == (11, 5 * 32)
    assert model.label_tokens == 5


def test_pretrained_embeddings_table_and_null_class():
    emb = class_embeddings()
    model = tiny("mmdit-pretrained")
    table = model.y_embedder.table
    assert table.shape == (11, 3, EMBED_DIM) and not table.requires_grad
    assert torch.equal(table[:10], emb) and torch.equal(table[10], torch.zeros(3, EMBED_DIM))
    assert "y_embedder.table" in model.state_dict() and model.context_embedder.in_features == EMBED_DIM
    assert all("y_embedder" not in n for n, _ in model.named_parameters())   # fixed, not trained


def test_class_embeddings_load_from_safetensors_and_torch_files(tmp_path):
    emb = class_embeddings()
    save_file({"embeddings": emb}, str(tmp_path / "e.safetensors"))
    torch.save(emb, tmp_path / "e.pt")
    for path in (tmp_path / "e.safetensors", tmp_path / "e.pt"):
        cfg = load_config(None, ["model.name=mmdit", "model.hidden_size=32", "model.num_heads=2", "model.depth=1",
                                 f"model.class_embeddings={path}"])
        model = build_model(cfg)
        assert torch.equal(model.y_embedder.table[:10], emb) and model.label_tokens == 3


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing.safetensors", "no file at .*missing.safetensors.*num_classes, tokens, dim"),
    (lambda d: save_file({"e": torch.randn(9, 2, 4)}, str(d / "f.safetensors")) or d / "f.safetensors",
     r"shape \(9, 2, 4\), expected \(data.num_classes=10, tokens, dim\)"),
    (lambda d: save_file({"e": torch.randn(10, 4)}, str(d / "f.safetensors")) or d / "f.safetensors",
     r"shape \(10, 4\), expected"),
    (lambda d: torch.save(torch.randn(10, 0, 4), d / "f.pt") or d / "f.pt", r"shape \(10, 0, 4\).*tokens, dim >= 1"),
    (lambda d: save_file({"a": torch.randn(10, 1, 4), "b": torch.randn(1)}, str(d / "f.safetensors"))
     or d / "f.safetensors", "holds 2 tensors .*expected exactly one"),
    (lambda d: (d / "f.pt").write_text("not a tensor") and d / "f.pt", "cannot read"),
])
def test_class_embeddings_errors_name_the_problem(tmp_path, make, match):
    path = make(tmp_path)
    cfg = load_config(None, ["model.name=mmdit", f"model.class_embeddings={path}"])
    with pytest.raises(ConfigError, match=match):
        build_model(cfg)


def test_class_embeddings_need_mmdit_and_classes():
    with pytest.raises(ConfigError, match="model.class_embeddings='x.pt' is not read by model.name=dit"):
        load_config(None, ["model.class_embeddings=x.pt"])
    with pytest.raises(ConfigError, match="data.num_classes > 0"):
        load_config(None, ["model.name=mmdit", "model.class_embeddings=x.pt", "data.num_classes=0"])


# ---------------------------------------------------------------------------------------------
# ADM UNet

def test_adm_structure_mirrors_encoder_and_decoder():
    model = tiny("adm_unet", num_res_blocks=2, channel_mult=(1, 2, 2), input_size=16, attn_resolutions=(8, 4))
    assert [type(b).__name__ for b in model.blocks] == ["EncoderLevel"] * 3 + ["MiddleLevel"] + ["DecoderLevel"] * 3
    enc, dec = model.blocks[:3], model.blocks[4:]
    assert 1 + sum(level.num_skips for level in enc) == sum(level.num_skips for level in dec)  # + the input conv
    assert [level.down is not None for level in enc] == [True, True, False]
    assert [level.up is not None for level in dec] == [True, True, False]
    assert {u.attn.side for level in (*enc, *dec) for u in level.units if u.attn is not None} == {8, 4}


@pytest.mark.parametrize("overrides,match", [
    (["model.attn_resolutions=[3]"], r"attn_resolutions \[3\] are not feature-map sides.*\[16, 8\]"),
    (["model.channels=24"], "multiples of 32"),
    (["model.channel_mult=[1,2,2,2,2,2]"], "divisible by 2\\^\\(levels-1\\) = 32"),
    (["model.preset=ADM-128"], "valid presets: ADM-32, ADM-64"),
    (["model.channels=96", "model.attn_resolutions=[16]"], r"attention widths \[96\] are not multiples of the "
                                                             r"head width 64 \(model.channels_per_head"),
])
def test_adm_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_model(load_config(None, ["model.name=adm_unet", *overrides]))


def test_adm_head_width_follows_channels_per_head():
    cfg = load_config(None, ["model.name=adm_unet", "model.channels=64", "model.channel_mult=[1,2]",
                             "model.attn_resolutions=[16]", "model.channels_per_head=32", "data.resolution=32"])
    heads = [m.attn.num_heads for m in build_model(cfg).modules() if isinstance(m, AdmAttentionBlock)]
    assert heads and set(heads) == {4}                      # 128 channels at 16x16 and in the middle: 32 wide
    with pytest.raises(ConfigError, match="model.channels_per_head must be >= 1"):
        load_config(None, ["model.name=adm_unet", "model.channels_per_head=0"])


def test_mmdit_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid presets: MMDiT-d15.*MMDiT-XL/2"):
        load_config(None, ["model.name=mmdit", "model.preset=DiT-XL/2"])


def test_presets_tables_are_disjoint():
    assert not set(DIT_PRESETS) & set(MMDIT_PRESETS) and not set(ADM_PRESETS) & set(MMDIT_PRESETS)
