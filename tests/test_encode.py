"""archirf.encode: a trained autoencoder's latents of a dataset, the file the latents source reads.

1 and 2 ranks write the same file (bitwise, fp32 on the CPU); an interrupted encode continues from its
parts; --flips stores the mirrored images' encodings; the metadata names the autoencoder and the images;
a KL autoencoder's posterior std is stored and the channel statistics account for it.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_distributed import ENV, ROOT, torchrun

AE = ["model.name=autoencoder", "model.latent=kl", "model.channels=32", "model.channel_mult=[1,2]",
      "model.num_res_blocks=1", "model.attn_resolutions=[]", "model.z_channels=4", "data.resolution=16",
      "global_batch=16", "sample_every=0", "progress=false", "loss.disc_layers=2", "loss.disc_channels=32",
      "loss.perceptual_weight=0", "total_images=32"]


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory) -> Path:
    from archirf.config import load_config
    from archirf.trainer import train

    run = tmp_path_factory.mktemp("ae") / "run"
    train(load_config(None, AE + [f"run_dir={run}"]))
    return run


def _encode(*args, nproc: int = 0) -> subprocess.CompletedProcess:
    if nproc:
        return torchrun(nproc, *map(str, args), "--no-progress", module="archirf.encode")
    return subprocess.run([sys.executable, "-m", "archirf.encode", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)


def test_one_and_two_ranks_write_the_same_latents_and_the_metadata(ae_run, tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _encode(ae_run, "--out", one, "--chunk", 400, "--batch", 100, nproc=1)
    _encode(ae_run, "--out", two, "--chunk", 400, "--batch", 100, nproc=2)
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys() == {"latents", "latents_std", "labels", "channel_mean", "channel_std"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["latents"].shape == (1797, 4, 8, 8) and (a["latents_std"] > 0).all()
    assert torch.equal(a["labels"][:10], torch.arange(10))             # the digits in their order
    z, s = a["latents"].double(), a["latents_std"].double()
    var = z.var(dim=(0, 2, 3), unbiased=False) + s.square().mean(dim=(0, 2, 3))
    torch.testing.assert_close(a["channel_std"].double(), var.sqrt(), rtol=1e-5, atol=0)
    with safe_open(str(one), "pt") as f:
        meta = f.metadata()
    snapshot = sorted((ae_run / "snapshots").glob("ema-*.safetensors"))[-1]
    assert meta["autoencoder"] == str(snapshot) and len(meta["autoencoder_sha256"]) == 64
    assert json.loads(meta["images"]) == {"source": "digits", "root": None, "resolution": 16, "channels": 1,
                                          "count": 1797}
    assert meta["latent"] == "kl" and json.loads(meta["flips"]) is False
    assert not (tmp_path / "one.safetensors.parts").exists()


def test_the_latents_are_the_autoencoders_encodings_with_flips(ae_run, tmp_path):
    from archirf.data.digits import digits_tensors
    from archirf.encode import load_autoencoder

    out = tmp_path / "f.safetensors"
    _encode(ae_run, "--out", out, "--flips", "--batch", 256)
    t = load_file(str(out))
    assert t["latents"].shape[0] == 2 * 1797 and torch.equal(t["labels"][1797:], t["labels"][:1797])
    model, _, _, _ = load_autoencoder(ae_run, [])
    x = digits_tensors(16, 1)[0][:5]
    x = (((x + 1) * 127.5).round().clamp(0, 255)) / 127.5 - 1            # through uint8, as encoded
    with torch.no_grad():
        mean, logvar = model.encode(x)
        flipped, _ = model.encode(x.flip(-1))
    torch.testing.assert_close(t["latents"][:5], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t["latents_std"][:5], torch.exp(0.5 * logvar), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t["latents"][1797:1802], flipped, rtol=1e-5, atol=1e-6)


def test_an_interrupted_encode_continues_from_its_parts(ae_run, tmp_path):
    full = tmp_path / "full.safetensors"
    proc = _encode(ae_run, "--out", full, "--chunk", 500, "--keep-parts")
    assert proc.returncode == 0, proc.stderr
    parts = tmp_path / "full.safetensors.parts"
    assert len(list(parts.glob("chunk-*.safetensors"))) == 4
    again = tmp_path / "again.safetensors"
    shutil.copytree(parts, tmp_path / "again.safetensors.parts")
    (tmp_path / "again.safetensors.parts" / "chunk-000002.safetensors").unlink()   # killed before this one
    proc = _encode(ae_run, "--out", again, "--chunk", 500)
    assert proc.returncode == 0 and "continuing: 3 of 4 chunks" in proc.stdout
    a, b = load_file(str(full)), load_file(str(again))
    assert all(torch.equal(a[k], b[k]) for k in a)
    shutil.copytree(parts, tmp_path / "other.safetensors.parts")
    proc = _encode(ae_run, "--out", tmp_path / "other.safetensors", "--chunk", 400)
    assert proc.returncode == 2 and "with other chunk" in proc.stderr


def test_bad_input_is_one_line(ae_run, tmp_path):
    proc = _encode(tmp_path / "nope", "--out", tmp_path / "x.safetensors")
    assert proc.returncode == 2 and "no such autoencoder run dir" in proc.stderr
    proc = _encode(ae_run, "--out", tmp_path / "x.safetensors", "model.channels=64")
    assert proc.returncode == 2 and "data.*, precision and device overrides only" in proc.stderr
    proc = _encode(ae_run, "--out", tmp_path / "no" / "x.safetensors")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert all(len(p.stderr.strip().splitlines()) == 1 for p in [proc])


@pytest.fixture(scope="module")
def latents_file(ae_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lat") / "digits.safetensors"
    proc = _encode(ae_run, "--out", out, "--batch", 512)
    assert proc.returncode == 0, proc.stderr
    return out


def _loader(path: Path, *overrides: str, batch: int = 1797):
    from archirf.config import load_config
    from archirf.data import build_loader

    cfg = load_config(None, ["data.source=latents", f"data.root={path}", "data.channels=4", "data.resolution=8",
                             *overrides])
    return build_loader(cfg, batch, torch.device("cpu"))


def test_auto_shift_and_scale_and_posterior_draws(latents_file):
    t = load_file(str(latents_file))
    torch.manual_seed(3)
    x, y = next(_loader(latents_file, "data.latent_shift=auto", "data.latent_scale=auto"))
    assert x.shape == (1797, 4, 8, 8)
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.zeros(4), atol=0.05, rtol=0)              # unit statistics
    torch.testing.assert_close(std, torch.ones(4), atol=0.05, rtol=0)
    loader = _loader(latents_file, "data.latent_posterior=mode")
    mode, y = next(loader)
    order = torch.argsort(y, stable=True)                  # the served order is a permutation: match by content
    sums = lambda a: torch.sort(a.flatten(1).sum(1)).values   # noqa: E731
    torch.testing.assert_close(sums(mode), sums(t["latents"]))
    torch.manual_seed(3)
    a, _ = next(_loader(latents_file))                     # the default: a fresh draw from each posterior
    torch.manual_seed(3)
    b, _ = next(_loader(latents_file))
    torch.manual_seed(4)
    c, _ = next(_loader(latents_file))
    assert torch.equal(a, b) and not torch.equal(a, c)     # the draw follows the seeded generator
    assert (a - mode).abs().mean() > 0 and order.numel() == 1797


def test_latent_settings_are_checked(latents_file, tmp_path):
    from archirf.config import ConfigError, load_config
    from archirf.data import DataError
    from safetensors.torch import save_file

    with pytest.raises(ConfigError, match="data.latent_scale=auto reads the latents file"):
        load_config(None, ["data.latent_scale=auto"])
    with pytest.raises(ConfigError, match="data.latent_posterior=mode: read by data.source=latents only"):
        load_config(None, ["data.latent_posterior=mode"])
    plain = tmp_path / "plain.safetensors"
    save_file({"latents": torch.randn(8, 4, 8, 8), "labels": torch.arange(8) % 10}, str(plain))
    with pytest.raises(DataError, match="holds no channel_mean"):
        _loader(plain, "data.latent_scale=auto", batch=4)
    with pytest.raises(DataError, match="holds no 'latents_std'"):
        _loader(plain, "data.latent_posterior=sample", batch=4)


LATENT_DIT = ["data.source=latents", "data.channels=4", "data.resolution=8", "model.hidden_size=32", "model.depth=2",
              "model.num_heads=2", "model.patch_size=2", "model.num_register_tokens=0", "global_batch=32",
              "total_images=64", "sample.steps=2", "sample.per_class=2", "sample.classes=[0,1,2]",
              "sample.gif_frames=2", "progress=false", "log_every=32", "data.latent_shift=auto",
              "data.latent_scale=auto"]


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """Another autoencoder of the same shape (another seed)."""
    from archirf.config import load_config
    from archirf.trainer import train

    run = tmp_path_factory.mktemp("other") / "run"
    train(load_config(None, AE + [f"run_dir={run}", "seed=7"]))
    return run


def test_a_latent_model_decodes_its_samples_by_its_record(ae_run, latents_file, other, tmp_path):
    """model.autoencoder: the grids and archirf.sample show decoded images (the autoencoder's size, not the
    latents' preview). The run dir and its snapshots keep the latents' record (autoencoder hash, shift and scale
    as numbers, the images), so sampling needs neither the latents file nor its statistics; another autoencoder
    is refused, in training and on the command line."""
    from PIL import Image

    from archirf.config import ConfigError, load_config
    from archirf.trainer import train

    data = tmp_path / "latents.safetensors"
    shutil.copy(latents_file, data)
    run = tmp_path / "latent"
    train(load_config(None, LATENT_DIT + [f"run_dir={run}", f"data.root={data}", f"model.autoencoder={ae_run}",
                                          "ema.posthoc_sigma_rels=[0.05,0.1]", "ema.posthoc_every=32"]))
    side = lambda png: Image.open(png).size  # noqa: E731
    # 3 x 2 tiles of 16 px images upscaled 4x (a latent preview would be 8 px upscaled 8x: also 64, so count
    # colours: decoded digits are grey, a preview of 4 channels is coloured)
    grid = np.asarray(Image.open(run / "samples.png"))
    assert side(run / "samples.png") == (2 * 64 + 3 * 2, 3 * 64 + 4 * 2)
    assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()     # grey images
    record = json.loads((run / "latents.json").read_text())
    t = load_file(str(data))
    with safe_open(str(data), "pt") as f:
        assert record["autoencoder_sha256"] == f.metadata()["autoencoder_sha256"]
    torch.testing.assert_close(torch.tensor(record["latent_shift"]), t["channel_mean"])
    torch.testing.assert_close(torch.tensor(record["latent_scale"]), 1 / t["channel_std"])
    assert record["images"]["source"] == "digits" and record["latents"] == str(data.resolve())
    snapshot = sorted((run / "snapshots").glob("ema-*.safetensors"))[-1]
    with safe_open(str(snapshot), "pt") as f:
        assert json.loads(f.metadata()["latents"]) == record
    with pytest.raises(ConfigError, match="is not the autoencoder that encoded this model's latents"):
        train(load_config(None, LATENT_DIT + [f"run_dir={tmp_path / 'x'}", f"data.root={data}",
                                              f"model.autoencoder={other}"]))
    with pytest.raises(ConfigError, match="model.autoencoder=.*a latent model's decoder"):
        load_config(None, AE + [f"model.autoencoder={other}"])
    with safe_open(str(data), "pt") as f:                   # re-encoded in place: a resume is refused
        meta = f.metadata()
    from safetensors.torch import save_file

    save_file({**t, "channel_std": t["channel_std"] * 2}, str(data), metadata=meta)
    with pytest.raises(ConfigError, match="is not the latents this run trained on"):
        train(load_config(None, LATENT_DIT + [f"run_dir={run}", f"data.root={data}", f"model.autoencoder={ae_run}",
                                              "total_images=96"]))
    data.unlink()                                            # gone: the record suffices
    run_cmd = lambda *a: subprocess.run([sys.executable, "-m", "archirf.sample", *map(str, a), "--per-class", "1",  # noqa: E731
                                         "--classes", "3,4", "--steps", "2"], capture_output=True, text=True,
                                        timeout=300, env=ENV, cwd=ROOT)
    for source in (snapshot, run):
        out = tmp_path / f"{source.name}.png"
        proc = run_cmd(source, "--out", out)
        assert proc.returncode == 0 and "decoded by" in proc.stdout, proc.stderr
        assert side(out) == (64 + 2 * 2, 2 * 64 + 3 * 2)
    proc = run_cmd(snapshot, "--out", tmp_path / "t.png", "--autoencoder", other)
    assert proc.returncode == 2 and "is not the autoencoder that encoded this model's latents" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # a post-hoc EMA snapshot keeps the record
    from archirf.posthoc_ema import main as posthoc

    assert posthoc([str(run), "--sigma-rel", "0.07"]) == 0
    reconstructed = [p for p in (run / "snapshots").glob("*.safetensors") if "sigma" in p.name]
    with safe_open(str(reconstructed[0]), "pt") as f:
        assert len(reconstructed) == 1 and json.loads(f.metadata()["latents"]) == record
    # archirf.eval fid takes --autoencoder too, and refuses another one before any sampling or reference
    proc = subprocess.run([sys.executable, "-m", "archirf.eval", "fid", str(run), "--samples", "10",
                           "--autoencoder", str(other)], capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 2 and "is not the autoencoder that encoded this model's latents" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_decoder_inverts_the_loaders_shift_and_scale(ae_run, latents_file, tmp_path):
    from archirf.config import ConfigError, load_config
    from archirf.decoding import LatentDecoder
    from archirf.encode import load_autoencoder

    t = load_file(str(latents_file))
    cfg = load_config(None, LATENT_DIT + [f"data.root={latents_file}", f"model.autoencoder={ae_run}"])
    decoder = LatentDecoder(cfg, torch.device("cpu"), None)
    model, _, _, _ = load_autoencoder(ae_run, [])
    z = t["latents"][:4]
    x = (z - t["channel_mean"].reshape(1, -1, 1, 1)) / t["channel_std"].reshape(1, -1, 1, 1)    # the loader's
    with torch.no_grad():
        expected = model.decode(z).clamp(-1, 1)
    torch.testing.assert_close(decoder(x), expected, rtol=1e-4, atol=1e-5)
    assert decoder.image_config.data.source == "digits" and decoder.image_config.data.resolution == 16
    moved = tmp_path / "gone.safetensors"                   # the latents file is not needed with numbers ...
    numbers = load_config(None, [*LATENT_DIT[:-2], f"data.root={moved}", f"model.autoencoder={ae_run}",
                                 "data.latent_scale=0.5", "data.latent_shift=0.1"])
    torch.testing.assert_close(LatentDecoder(numbers, torch.device("cpu"), None)(z[:1] * 0),
                               model.decode(torch.full_like(z[:1], 0.1)).clamp(-1, 1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="which is not there"):           # ... but is with auto statistics
        LatentDecoder(load_config(None, LATENT_DIT + [f"data.root={moved}", f"model.autoencoder={ae_run}"]),
                      torch.device("cpu"), None)


def test_an_unreadable_image_stops_the_encode_in_one_line(ae_run, tmp_path):
    from PIL import Image

    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 20), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"not a png")
    proc = _encode(ae_run, "--out", tmp_path / "x.safetensors", "data.source=folder", f"data.root={folder.parent}",
                   "data.num_workers=1", "data.num_classes=1")
    assert proc.returncode == 2 and "3.png cannot be read" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_readmes_latent_pipeline_runs_end_to_end(tmp_path, tiny_net):
    """The README's four commands of the latent pipeline (train the digits autoencoder, encode, train the latent
    MMDiT, FID), run as written from a fresh folder with overrides that make them tiny; FID of the decoded
    samples while training and by the command, against the digits."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The latent pipeline"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [shlex.split(line) for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert [c[c.index("-m") + 1] for c in commands] == ["archirf.train", "archirf.encode", "archirf.train",
                                                        "archirf.eval"]
    tiny = {0: ["total_images=64", "global_batch=32", "log_every=32", "sample_every=0", "checkpoint_every=0",
                "loss.perceptual_weight=0", "loss.disc_start=32", "progress=false"],
            1: ["--batch", "512", "--no-progress"],
            2: ["total_images=64", "global_batch=32", "log_every=32", "sample.steps=2", "sample.per_class=1",
                "progress=false", "eval.every=64", "eval.num=20", "eval.batch=10", f"eval.inception={tiny_net}"],
            3: ["--samples", "20", "--batch", "10", "--inception", str(tiny_net), "--steps", "2", "--no-progress"]}
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for i, command in enumerate(commands):
        if command[0] == "torchrun":
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", *command[1:]]  # a free port
        elif command[0] == "python":
            command = [sys.executable, *command[1:]]
        proc = subprocess.run(command + tiny[i], capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path)
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-3000:])
    runs = tmp_path / "runs"
    assert (runs / "ae_digits" / "latents.safetensors").is_file()
    assert (runs / "latent_digits" / "samples.png").is_file() and (runs / "latent_digits" / "latents.json").is_file()
    # FID of decoded samples while training (at 64 images) and by archirf.eval fid, against the digits' images
    rows = [json.loads(line) for line in (runs / "latent_digits" / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["images_seen"] == 64 and all(r["fid"] > 0 for r in rows)
    assert [p.name.startswith("ref-digits-16px-") for p in (runs / "latent_digits" / "eval").glob("*.npz")] == [True]


def test_a_bf16_recipe_encodes_in_fp32_on_a_cpu_unless_told(tmp_path):
    """On a CPU the encoder runs in fp32 whatever the autoencoder trained in (bf16 autocast on a CPU is slow and
    loses precision for nothing); precision=bf16 among the overrides asks for bf16 and gets it."""
    from archirf.config import load_config
    from archirf.data.digits import digits_tensors
    from archirf.encode import encode, load_autoencoder
    from archirf.trainer import train

    run = tmp_path / "bf16"
    train(load_config(None, AE + [f"run_dir={run}", "precision=bf16", "total_images=16"]))
    model, cfg, _, _ = load_autoencoder(run, [])
    assert cfg.precision == "bf16"
    x = digits_tensors(16, 1)[0][:64]
    x = (((x + 1) * 127.5).round().clamp(0, 255)) / 127.5 - 1
    with torch.no_grad():
        want = model.encode(x)[0]
    got = {}
    for name, extra in (("default", []), ("bf16", ["precision=bf16"])):
        encode(run, tmp_path / f"{name}.safetensors", extra, batch=64, chunk=64, progress=False)
        got[name] = load_file(str(tmp_path / f"{name}.safetensors"))["latents"][:64]
    torch.testing.assert_close(got["default"], want, rtol=1e-5, atol=1e-6)
    assert (got["bf16"] - want).abs().max() > 1e-3            # bf16 autocast, as asked
    torch.testing.assert_close(got["bf16"], want, rtol=0.05, atol=0.05)
