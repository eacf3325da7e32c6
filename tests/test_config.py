from pathlib import Path

import pytest
import torch

from archirf.config import Config, ConfigError, batch_split, from_yaml_text, load_config, parse_cli, to_yaml
from archirf.models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_digits_recipe():
    assert load_config(str(CONFIGS / "digits.yaml")) == load_config(None)


def test_yaml_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.01\nmodel:\n  depth: 3\n")
    cfg = load_config(str(recipe), ["optim.lr=3e-4", "model.qk_norm=true", "sample.classes=[1,2]"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.depth == 3 and cfg.model.qk_norm is True and cfg.sample.classes == [1, 2]


@pytest.mark.parametrize("override, words", [
    (["model.dept=4"], ["model.dept", "depth", "hidden_size"]),
    (["optimizer.lr=1"], ["optimizer", "optim", "top level"]),
    (["model.depth=four"], ["model.depth", "four"]),
    (["model.attn_impl=flash"], ["model.attn_impl", "sdpa", "reference"]),
    (["objective.name=edm"], ["objective.name", "rectified_flow", "ddpm"]),
    (["lr"], ["key=value"]),
])
def test_bad_keys_and_values_name_the_problem(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    for w in words:
        assert w in str(err.value)


def test_cross_key_validation():
    with pytest.raises(ConfigError, match="divisible by model.num_heads"):
        load_config(None, ["model.hidden_size=100", "model.num_heads=3"])
    with pytest.raises(ConfigError, match="does not apply"):
        load_config(None, ["sample.sampler=ddim"])
    with pytest.raises(ConfigError, match="sample.grid=edm is a rectified-flow time grid"):
        load_config(None, ["objective.name=ddpm", "sample.grid=edm"])
    with pytest.raises(ConfigError, match="exactly one of ema"):
        load_config(None, ["ema.decay=0.999"])
    with pytest.raises(ConfigError, match="exactly one of ema"):
        load_config(None, ["ema.sigma_rel=0.05"])
    with pytest.raises(ConfigError, match="ema.sigma_rel must be in"):
        load_config(None, ["ema.half_life_images=null", "ema.sigma_rel=0.5"])
    assert load_config(None, ["ema.half_life_images=null", "ema.sigma_rel=0.05"]).ema.sigma_rel == 0.05
    with pytest.raises(ConfigError, match="data.root"):
        load_config(None, ["data.source=folder"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


def test_batch_split():
    cfg = load_config(None, ["global_batch=256"])
    assert batch_split(cfg, 1) == (256, 1)
    assert batch_split(cfg, 2) == (128, 1)
    cfg = load_config(None, ["global_batch=256", "micro_batch=32"])
    assert batch_split(cfg, 2) == (32, 4)
    with pytest.raises(ConfigError, match="divisible by the world size"):
        batch_split(load_config(None, ["global_batch=10"]), 3)
    with pytest.raises(ConfigError, match="micro_batch=48 must divide"):
        batch_split(load_config(None, ["global_batch=128", "micro_batch=48"]), 1)


def test_yaml_round_trip():
    cfg = load_config(None, ["model.depth=2", "sample.classes=[3]"])
    assert from_yaml_text(to_yaml(cfg)) == cfg


def test_cli(capsys):
    cfg, show = parse_cli(["--print-config", "optim.lr=0.5"])
    assert show and cfg.optim.lr == 0.5 and isinstance(cfg, Config)


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_loads_and_its_model_takes_its_data(recipe):
    cfg = load_config(str(CONFIGS / recipe))
    assert cfg.total_images > 0 and cfg.run_dir
    d = cfg.data
    assert d.source != "folder" or d.channels in (1, 3), "the folder source decodes grey or RGB"
    with torch.device("meta"):                              # full-size models: no memory, no compute
        model = build_model(cfg)
        x = torch.empty(2, d.channels, d.resolution, d.resolution)
        if cfg.model.name == "autoencoder":                 # an autoencoder reconstructs its input
            out = model(x)["reconstruction"]
        else:
            out = model(x, torch.rand(2), torch.tensor([0, model.num_classes]))
            assert model.num_classes == d.num_classes
    assert (model.in_channels, model.input_size) == (d.channels, d.resolution)
    assert out.shape == x.shape                             # the network maps the data's shape onto itself


@pytest.mark.parametrize("recipe, params, macs", [("mmdit_b2_img64", 176.3e6, 107.4e9),
                                                 ("adm_latent", 289.5e6, 45.0e9)])
def test_full_size_recipes_have_their_stated_size(recipe, params, macs):
    with torch.device("meta"):
        model = build_model(load_config(str(CONFIGS / f"{recipe}.yaml")))
    assert model.num_params() == pytest.approx(params, rel=1e-3)
    assert model.flops_per_image() == pytest.approx(macs, rel=1e-3)


@pytest.mark.parametrize("overrides,match", [
    (["objective.beta_schedule=cosine"], r"objective.beta_schedule='cosine' is not read with objective.name=rectified_flow"),
    (["objective.name=ddpm", "objective.time_shift=3", "sample.sampler=auto"],
     r"objective.time_shift=3.0 is not read with objective.name=ddpm"),
    (["objective.time_sampling=uniform", "objective.logit_normal_std=2"],
     r"objective.logit_normal_std=2.0 is not read .*time_sampling=uniform"),
    (["sample.ddim_eta=0.5"], r"sample.ddim_eta=0.5 is read by DDPM's ddim sampler only"),
    (["objective.name=ddpm", "sample.sampler=ancestral", "sample.ddim_eta=0.5"], r"sample.ddim_eta=0.5"),
])
def test_objective_and_sampler_keys_nothing_reads_are_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_objective_keys_that_are_read_pass():
    assert load_config(None, ["objective.name=ddpm", "objective.beta_schedule=cosine", "sample.sampler=auto",
                              "sample.ddim_eta=0.5"]).sample.ddim_eta == 0.5
    assert load_config(None, ["objective.time_shift=3", "objective.logit_normal_mean=-0.4"]).objective.time_shift == 3


def test_compile_mode_reaches_every_block(monkeypatch):
    from archirf import parallel
    from archirf.models import build_model

    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: seen.append(k))
    cfg = load_config(None, ["model.depth=2", "model.hidden_size=32", "model.num_heads=2"])
    model = build_model(cfg)
    parallel.parallelize(model, None, param_dtype=None, compile=True, shard=False, compile_mode="reduce-overhead")
    assert [k.get("mode") for k in seen] == ["reduce-overhead"] * 2
    seen.clear()
    parallel.parallelize(build_model(cfg), None, param_dtype=None, compile=True, shard=False)
    assert seen and all("mode" not in k for k in seen)


def test_a_saved_autoencoder_config_from_before_the_attention_style_keeps_its_network():
    """A run dir's config.yaml written before model.attn_style / encoder_out_kernel existed (every autoencoder then
    had LDM's attention and a 3x3 encoder output) reads back as that network, not as what Seed-f8c16 now names; a
    config written now round-trips with the seed's."""
    cfg = load_config("configs/ae_seed_64px.yaml")
    assert (cfg.model.attn_style, cfg.model.encoder_out_kernel) == ("seed", 1)
    assert from_yaml_text(to_yaml(cfg)) == cfg
    old = "\n".join(line for line in to_yaml(cfg).splitlines()
                    if not line.strip().startswith(("attn_style:", "encoder_out_kernel:")))
    back = from_yaml_text(old)
    assert (back.model.attn_style, back.model.encoder_out_kernel) == ("ldm", 3)
    assert back.model.preset == "Seed-f8c16" and back.model.mid_heads == 4


def test_the_seeds_qk_norm_needs_two_heads():
    with pytest.raises(ConfigError, match="only their signs; set model.mid_heads >= 2") as err:
        load_config("configs/ae_seed_64px.yaml", ["model.mid_heads=1"])
    assert "\n" not in str(err.value)
