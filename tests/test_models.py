"""DiT and shared layers: shapes, DiT-XL/2 size and cost, register tokens, attention implementations,
fused kernels, label dropout, torch.compile. What every model of the zoo must do (zero init, CFG
batching, cost counter, meta materialisation, a short fit ...) is in test_models_zoo.py, DiT included.
CPU, a few seconds (plus one inductor compile: ~15 s with a cold cache, ~3 s warm)."""

from types import SimpleNamespace

from pathlib import Path

import pytest
import torch

import archirf_kernels
from archirf.config import MODEL_DEFAULTS, Config, ConfigError, DataConfig, ModelConfig, load_config
from archirf.config import preset_departures
from archirf.models import DIT_PRESETS, DiT, build_model
from archirf.models.layers import Attention, LabelEmbedder, modulate, unpatchify


def tiny_dit(**overrides) -> DiT:
    kw = dict(input_size=8, in_channels=3, num_classes=10, patch_size=2, hidden_size=32, depth=2,
              num_heads=2, num_register_tokens=4)
    kw.update(overrides)
    return DiT(**kw)


@torch.no_grad()
def perturb_(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Moves every parameter off its (partly zero) init so that all paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(batch=4, channels=3, size=8, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x, t, y


# ---------------------------------------------------------------------------------------------
# Shapes, sizes, cost

@pytest.mark.parametrize("channels,size,patch", [(3, 8, 2), (1, 16, 4), (4, 8, 8)])
def test_output_has_input_shape(channels, size, patch):
    model = tiny_dit(in_channels=channels, input_size=size, patch_size=patch)
    x, t, y = inputs(channels=channels, size=size)
    assert model(x, t, y).shape == x.shape


def test_build_model_from_default_config():
    cfg = load_config(None)                                 # validation fills the model keys it reads
    model = build_model(cfg)
    assert isinstance(model, DiT)
    assert model.num_classes == cfg.data.num_classes
    assert (model.hidden_size, len(model.blocks), model.patch_size) == (
        cfg.model.hidden_size, cfg.model.depth, cfg.model.patch_size)
    x, t, y = inputs(channels=cfg.data.channels, size=cfg.data.resolution)
    y[0] = model.num_classes                                # the null class is a valid label
    assert model(x, t, y).shape == x.shape
    auto = "auto" if archirf_kernels.HAS_TRITON else "reference"
    assert model.kernels == auto and model.attn_impl == ("auto" if archirf_kernels.HAS_TRITON else "sdpa")


def test_explicit_keys_win_over_the_preset():
    """A preset fills the keys left unset; a key set in the recipe or on the command line wins (and is
    named at the start of training). Both directions, through the config and straight from a Config."""
    cfg = Config(model=ModelConfig(preset="DiT-B/4", hidden_size=64, depth=1, num_heads=2),
                 data=DataConfig(resolution=32, channels=4, num_classes=1000))
    with torch.device("meta"):
        model = build_model(cfg)
    assert (model.hidden_size, len(model.blocks), model.blocks[0].attn.num_heads, model.patch_size) == (64, 1, 2, 4)
    cfg = load_config(None, ["model.preset=DiT-XL/2", "model.depth=4", "data.resolution=32", "data.channels=4"])
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.patch_size) == (4, 1152, 16, 2)
    assert preset_departures(cfg.model) == ["model.depth=4 (the preset's: 28)"]
    with torch.device("meta"):
        assert len(build_model(cfg).blocks) == 4
    cfg = load_config(None, ["model.preset=DiT-XL/2", "data.resolution=32"])
    assert (cfg.model.depth, cfg.model.hidden_size) == (28, 1152) and not preset_departures(cfg.model)


def test_unset_keys_without_a_preset_take_the_family_defaults():
    cfg = load_config(None, ["model.depth=3"])
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.patch_size) == (3, MODEL_DEFAULTS["hidden_size"],
                                                                              MODEL_DEFAULTS["patch_size"])
    assert cfg.model.channels is None and cfg.model.label_tokens is None  # not DiT's: left unset


def test_dit_xl2_has_675m_params():
    cfg = Config(model=ModelConfig(preset="DiT-XL/2"), data=DataConfig(resolution=32, channels=4, num_classes=1000))
    with torch.device("meta"):                              # no memory, no init cost
        model = build_model(cfg)
    assert model.pos_embed.is_meta and model.blocks[0].attn.qkv.weight.is_meta
    assert abs(model.num_params() - 675e6) / 675e6 < 0.01, model.num_params()


def test_dit_xl2_flops_match_paper():
    # DiT Table 4: DiT-XL/2 at 256^2 (32x32x4 latent, 256 tokens) costs 118.6 "GFLOPs", i.e. G multiply-adds.
    with torch.device("meta"):
        model = DiT(input_size=32, in_channels=4, num_classes=1000, num_register_tokens=0, **DIT_PRESETS["DiT-XL/2"])
    assert abs(model.flops_per_image() - 118.6e9) / 118.6e9 < 0.02, model.flops_per_image()


# ---------------------------------------------------------------------------------------------
# Initialization and conditioning

def test_register_tokens_keep_shape_and_take_part():
    x, t, y = inputs()
    without = perturb_(tiny_dit(num_register_tokens=0)).eval()
    model = perturb_(tiny_dit(num_register_tokens=4)).eval()
    assert model.register_tokens.shape == (1, 4, 32)
    out = model(x, t, y)
    assert out.shape == without(x, t, y).shape == x.shape
    with torch.no_grad():
        model.register_tokens.zero_()
    assert not torch.allclose(out, model(x, t, y), atol=1e-5)   # patch tokens do attend to them


def test_modulate_per_sample_equals_per_token():
    x = torch.randn(2, 5, 8)
    shift, scale = torch.randn(2, 8), torch.randn(2, 8)
    expected = x * (1 + scale[:, None]) + shift[:, None]
    assert torch.equal(modulate(x, shift, scale), expected)
    assert torch.equal(modulate(x, shift[:, None].expand(2, 5, 8), scale[:, None].expand(2, 5, 8)), expected)


def test_unpatchify_inverts_patch_layout():
    B, C, p, gh, gw = 2, 3, 2, 3, 4
    img = torch.randn(B, C, gh * p, gw * p)
    # Each token holds its p x p x C patch with channels last (DiT's final-layer layout).
    tokens = img.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, p * p * C)
    assert torch.equal(unpatchify(tokens, p, gh, gw), img)


# ---------------------------------------------------------------------------------------------
# Attention implementations

@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_reference_matches_sdpa(qk_norm):
    torch.manual_seed(0)
    ref = Attention(64, 4, qk_norm=qk_norm, attn_impl="reference")
    sdpa = Attention(64, 4, qk_norm=qk_norm, attn_impl="sdpa")
    with torch.no_grad():
        if qk_norm:                                         # non-trivial learnable scales
            ref.q_norm.weight.uniform_(0.5, 1.5)
            ref.k_norm.weight.uniform_(0.5, 1.5)
    sdpa.load_state_dict(ref.state_dict())
    x = torch.randn(3, 17, 64)
    torch.testing.assert_close(sdpa(x), ref(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_dit_reference_attention_matches_sdpa(qk_norm):
    ref = perturb_(tiny_dit(attn_impl="reference", qk_norm=qk_norm)).eval()
    sdpa = tiny_dit(attn_impl="auto", qk_norm=qk_norm).eval()
    sdpa.load_state_dict(ref.state_dict())
    x, t, y = inputs()
    torch.testing.assert_close(sdpa(x, t, y), ref(x, t, y), atol=1e-5, rtol=0)


def test_attn_impl_choices_resolve_once(monkeypatch):
    assert tiny_dit(attn_impl="auto", qk_norm=True).attn_impl == "auto"             # decided per call
    m = tiny_dit(attn_impl="auto", qk_norm=True)
    assert not m.blocks[0].attn.use_triton(torch.zeros(1))                          # CPU input: SDPA
    cuda = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert m.blocks[0].attn.use_triton(cuda)                                        # CUDA input: the op
    assert not m.blocks[0].attn.use_triton(SimpleNamespace(is_cuda=True, dtype=torch.float64))   # the op's dtypes
    assert not Attention(2 * 288, 2, qk_norm=True, attn_impl="auto").use_triton(cuda)   # head dim > the op's 256
    assert not tiny_dit(attn_impl="auto").blocks[0].attn.use_triton(cuda)           # no norm to fuse: SDPA
    assert tiny_dit(attn_impl="triton").blocks[0].attn.use_triton(cuda)             # unless pinned
    assert tiny_dit(attn_impl="triton").attn_impl == "triton"
    monkeypatch.setattr(archirf_kernels, "HAS_TRITON", False)
    assert tiny_dit(attn_impl="auto").attn_impl == "sdpa"                           # no Triton: SDPA
    with pytest.raises(ValueError, match="reference, sdpa"):
        tiny_dit(attn_impl="flash")


def test_kernels_choice_resolves_once():
    auto = "auto" if archirf_kernels.HAS_TRITON else "reference"      # auto: decided per call on x's device
    assert tiny_dit(kernels="auto").kernels == auto
    assert tiny_dit(kernels="triton").kernels == "triton"
    assert all(m.kernels == "triton" for m in tiny_dit(kernels="triton").modules() if hasattr(m, "kernels"))
    with pytest.raises(ValueError, match="auto, reference, triton"):
        tiny_dit(kernels="cuda")


def test_kernels_auto_runs_the_reference_on_cpu(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a fused kernel ran on a CPU tensor under kernels='auto'")
    for name in ("ada_layer_norm", "gated_residual", "gated_residual_ada_layer_norm"):
        monkeypatch.setattr(archirf_kernels, name, fail)
    x, t, y = inputs()
    assert perturb_(tiny_dit(kernels="auto"))(x, t, y).shape == x.shape


# ---------------------------------------------------------------------------------------------
# Label dropout and classifier-free guidance

def test_label_dropout_only_in_train_mode():
    embedder = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=1.0)
    labels = torch.arange(10)
    table = embedder.embedding_table.weight
    embedder.train()
    assert torch.equal(embedder.token_drop(labels), torch.full_like(labels, 10))
    assert torch.equal(embedder(labels), table[10].expand(10, 8))
    embedder.eval()
    assert torch.equal(embedder(labels), table[labels])
    force = (labels % 2 == 0).long()                        # forced drops apply in any mode
    assert torch.equal(embedder(labels, force_drop_ids=force), table[torch.where(force == 1, 10, labels)])


def test_label_dropout_rate_in_model():
    model = tiny_dit(class_dropout_prob=0.5).train()
    torch.manual_seed(0)
    dropped = model.y_embedder.token_drop(torch.zeros(4000, dtype=torch.long)) == 10
    assert 0.45 < dropped.float().mean().item() < 0.55


# ---------------------------------------------------------------------------------------------
# Compile and training

@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch-internal
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = perturb_(tiny_dit(depth=1, qk_norm=True)).eval()
    x, t, y = inputs()
    compiled = torch.compile(model, fullgraph=True)         # inductor: generated C++ on the CPU
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Config errors

def test_unknown_preset_lists_valid_ones():
    cfg = Config(model=ModelConfig(preset="DiT-XXL/2"))
    with pytest.raises(ValueError, match=r"unknown model.preset 'DiT-XXL/2'.*DiT-S/2.*DiT-XL/8"):
        build_model(cfg)


def test_preset_patch_must_divide_resolution():
    cfg = Config(model=ModelConfig(preset="DiT-S/8"), data=DataConfig(resolution=12))
    with pytest.raises(ValueError, match="not a multiple of patch_size 8"):
        build_model(cfg)


def test_auto_kernels_leave_adaln_to_inductor_inside_compile(monkeypatch):
    """kernels=auto: fused ops on CUDA tensors; the adaLN ops (under_compile=False) only outside
    torch.compile, the others (EDM2's MP ops) in both; triton forces them, reference never."""
    from types import SimpleNamespace

    from archirf.models.layers import use_fused_kernels

    gpu, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        assert use_fused_kernels("auto", gpu, under_compile=False) is (not compiling)
        assert use_fused_kernels("auto", gpu) is True
        assert not use_fused_kernels("auto", cpu) and not use_fused_kernels("auto", cpu, under_compile=False)
        assert use_fused_kernels("triton", cpu, under_compile=False) and not use_fused_kernels("reference", gpu)


@pytest.mark.parametrize("name,key", [("mmdit", "model.qk_norm=true"), ("dit", "model.channels=32"),
                                      ("adm_unet", "model.kernels=reference"), ("edm2_unet", "model.attn_impl=sdpa"),
                                      ("dit", "model.dropout=0.0")])
def test_a_key_the_family_does_not_read_is_an_error(name, key):
    """Set, even to the value it would have elsewhere: a key the family ignores must stay unset."""
    with pytest.raises(ConfigError, match=rf"model\.{key.split('=')[0][6:]}=.* is not read by model.name={name}"
                                          rf".*remove it.*reads: "):
        load_config(None, [f"model.name={name}", key])


@pytest.mark.parametrize("recipe", sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_a_config_saved_before_the_families_declared_their_keys_builds_the_same_network(recipe):
    """Older run dirs and snapshots list every model.* key: the recipe's, else the old schema default
    (MODEL_DEFAULTS), even beside a preset that overrode it (preset: DiT-XL/2 next to depth: 6).
    Read back, each shipped recipe's old file resolves to the network that trained."""
    from omegaconf import OmegaConf

    from archirf.config import from_yaml_text, to_yaml

    new = load_config(recipe)
    written = dict(OmegaConf.to_container(OmegaConf.load(recipe)).get("model", {}))
    saved = OmegaConf.to_container(OmegaConf.create(to_yaml(new)))
    saved["model"] = {"name": new.model.name, "preset": new.model.preset, **MODEL_DEFAULTS, **written}
    old = from_yaml_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    assert old.model == new.model


def test_an_old_config_with_a_key_its_family_never_read_set_is_refused():
    from omegaconf import OmegaConf

    from archirf.config import from_yaml_text, to_yaml

    saved = OmegaConf.to_container(OmegaConf.create(to_yaml(load_config(None, ["model.name=mmdit"]))))
    saved["model"].update({k: v for k, v in MODEL_DEFAULTS.items() if saved["model"][k] is None}, qk_norm=True)
    with pytest.raises(ConfigError, match="model.qk_norm=True is not read by model.name=mmdit"):
        from_yaml_text(OmegaConf.to_yaml(OmegaConf.create(saved)))


@pytest.mark.parametrize("overrides,match", [
    (["model.name=edm2_unet", "model.sigma_data=0.9"], "model.sigma_data=0.9 is not read.*preconditioning=edm"),
    (["model.name=edm2_unet", "model.logvar_channels=7"], "logvar_channels=7 is not read.*uncertainty_weighting=true"),
    (["model.attn_impl=sdpa", "model.attn_backend=fused"], "model.attn_backend='fused' is not read.*attn_impl=triton"),
    (["model.attn_backend=sdpa"], "model.attn_backend='sdpa' is not read"),          # DiT, auto, no QK-norm
    (["model.name=adm_unet", "model.attn_backend=fused"], "model.attn_backend='fused' is not read"),
])
def test_a_key_read_only_under_a_condition_that_is_off_is_an_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_keys_under_a_condition_that_is_on_are_read_and_saved():
    cfg = load_config(None, ["model.name=edm2_unet", "model.preconditioning=edm", "model.sigma_data=0.9"])
    assert cfg.model.sigma_data == 0.9 and cfg.model.logvar_channels is None   # off: saved as null
    assert load_config(None, ["model.qk_norm=true", "model.attn_backend=fused"]).model.attn_backend == "fused"
    assert load_config(None, ["model.name=mmdit", "model.attn_backend=sdpa"]).model.attn_backend == "sdpa"


def test_the_config_schema_and_the_families_agree_and_the_config_needs_no_torch():
    import dataclasses
    import subprocess
    import sys

    from archirf.families import FAMILY_KEYS, PRESETS

    # (model.autoencoder names a latent model's decoder, not a network key of a family)
    assert set(MODEL_DEFAULTS) == {f.name for f in dataclasses.fields(ModelConfig)} - {"name", "preset", "autoencoder"}
    assert all(set(keys) <= set(MODEL_DEFAULTS) for keys in FAMILY_KEYS.values())
    assert all(set(p) <= set(FAMILY_KEYS[name]) for name, presets in PRESETS.items() for p in presets.values())
    code = "import sys, archirf.config; assert 'torch' not in sys.modules, 'archirf.config imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
