"""The latents source: values, labels, exact resume, rank shards, every error, and training on a file."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from test_data import assert_resumes_exactly, assert_same_batches, take
from test_trainer import TINY, run_cli

from archirf.config import Config, ConfigError, DataConfig, load_config
from archirf.data import DataError, build_loader
from archirf.data.latents import storage_device

CPU = torch.device("cpu")
N, C, R, CLASSES = 12, 4, 8, 3


def write_latents(path, n=N, shape=(C, R, R), dtype=torch.float16, with_labels=True, **tensors):
    """A latents file of n random samples and labels i % CLASSES; `tensors` replace or add; returns them."""
    gen = torch.Generator().manual_seed(0)
    content = {"latents": (torch.randn((n, *shape), generator=gen) * 3 + 1).to(dtype)}
    if with_labels:
        content["labels"] = torch.arange(n) % CLASSES
    content.update(tensors)
    save_file(content, str(path))
    return content


def latent_cfg(path, seed=0, **data) -> Config:
    data = {"source": "latents", "root": None if path is None else str(path), "channels": C, "resolution": R, "num_classes": CLASSES, **data}
    return Config(seed=seed, data=DataConfig(**data))


def sample_ids(x, expected):
    """Which sample of `expected` (N, C, R, R) each row of x is, exactly or mirrored: (ids, mirrored)."""
    same = (x[:, None] == expected[None]).flatten(2).all(2)                # (B, N)
    mirrored = (x[:, None] == expected.flip(-1)[None]).flatten(2).all(2)   # (B, N)
    found = same | mirrored
    assert (found.sum(1) == 1).all(), "every row must be exactly one sample, scaled and shifted"
    ids = found.int().argmax(1)
    return ids, mirrored[torch.arange(len(x)), ids] & ~same[torch.arange(len(x)), ids]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_batches_are_scaled_shifted_latents_with_their_labels(tmp_path, dtype):
    stored = write_latents(tmp_path / "l.safetensors", dtype=dtype)
    loader = build_loader(latent_cfg(tmp_path / "l.safetensors", latent_scale=0.5, latent_shift=1.25), 4, CPU)
    assert loader.num_samples == N and loader.num_classes == CLASSES
    # f16/bf16/f32 stay as stored (no float32 copy of a large set); float64 becomes float32 once
    assert loader.images.dtype == (dtype if dtype != torch.float64 else torch.float32)
    expected = (stored["latents"].float() - 1.25) * 0.5
    batches = take(loader, 3)                                               # one epoch
    for x, y in batches:
        assert x.shape == (4, C, R, R) and x.dtype == torch.float32 and y.dtype == torch.long
        ids, mirrored = sample_ids(x, expected)
        assert not mirrored.any()                                           # random_flip is off
        assert torch.equal(y, stored["labels"][ids])                        # labels travel with their latent
    ids = torch.cat([sample_ids(x, expected)[0] for x, _ in batches])
    assert sorted(ids.tolist()) == list(range(N))                           # one epoch: every sample once


def test_flips_mirror_the_width_and_resume_exactly(tmp_path):
    stored = write_latents(tmp_path / "l.safetensors")
    cfg = latent_cfg(tmp_path / "l.safetensors", seed=3, random_flip=True)
    loader, _, _ = assert_resumes_exactly(lambda: build_loader(cfg, 5, CPU), k=4, m=5)   # across epochs
    x = torch.cat([b[0] for b in take(loader, 6)])
    mirrored = sample_ids(x, stored["latents"].float())[1]
    assert mirrored.any() and not mirrored.all()


def test_two_ranks_get_disjoint_shards_covering_the_epoch(tmp_path):
    stored = write_latents(tmp_path / "l.safetensors")
    cfg = latent_cfg(tmp_path / "l.safetensors", seed=1)
    ranks = [build_loader(cfg, 3, CPU, rank=r, world_size=2) for r in range(2)]
    ids = [torch.cat([sample_ids(x, stored["latents"].float())[0] for x, _ in take(loader, 2)]) for loader in ranks]
    assert not set(ids[0].tolist()) & set(ids[1].tolist())
    assert sorted(ids[0].tolist() + ids[1].tolist()) == list(range(N))     # 2 ranks x 2 batches x 3 = one epoch
    assert ranks[0].state_dict() == ranks[1].state_dict() == {"epoch": 1, "index": 0}
    # the state written by two ranks resumes on one at the same place: its next batch is the next 6 samples
    one = build_loader(cfg, 6, CPU)
    one.load_state_dict(ranks[0].state_dict())
    assert_same_batches(take(one, 1), [tuple(torch.cat(parts) for parts in zip(*[next(r) for r in ranks]))])


def test_unconditional_sets_have_label_zero(tmp_path):
    write_latents(tmp_path / "none.safetensors", with_labels=False)
    write_latents(tmp_path / "some.safetensors")
    for name in ("none", "some"):                # num_classes=0 ignores labels, as the other sources do
        _, y = next(build_loader(latent_cfg(tmp_path / f"{name}.safetensors", num_classes=0), N, CPU))
        assert not y.any()


def test_the_global_rng_is_left_alone(tmp_path):
    write_latents(tmp_path / "l.safetensors")
    loader = build_loader(latent_cfg(tmp_path / "l.safetensors", random_flip=True), 5, CPU)
    before = torch.get_rng_state()
    take(loader, 3)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_the_set_is_read_from_the_file_mapping_not_copied(tmp_path):
    write_latents(tmp_path / "l.safetensors", n=64, dtype=torch.bfloat16)
    loader = build_loader(latent_cfg(tmp_path / "l.safetensors"), 4, CPU)
    address = loader.images.data_ptr()
    mapped = [line.split()[-1] for line in open("/proc/self/maps").read().splitlines()
              if int(line.split("-")[0], 16) <= address < int(line.split()[0].split("-")[1], 16)]
    assert mapped == [str(tmp_path / "l.safetensors")], mapped   # ranks of a node share the page cache


def test_storage_setting():
    latents = torch.zeros(2, C, R, R)
    cuda = torch.device("cuda", 0)               # a device object only: nothing is allocated on it
    assert storage_device("host", latents, cuda) == CPU and storage_device("device", latents, cuda) == cuda
    assert storage_device("auto", latents, CPU) == CPU and storage_device("host", latents, CPU) == CPU


def bad_file(tmp_path, case):
    """The path of one broken latents file (or of no file)."""
    path = tmp_path / "l.safetensors"
    nan = torch.zeros(N, C, R, R)
    nan[5, 1, 2, 3] = float("nan")
    inf = torch.zeros(N, C, R, R)
    inf[7, 0, 0, 0] = float("-inf")
    writers = {
        "no key": lambda: save_file({"x": torch.zeros(2), "y": torch.zeros(2)}, str(path)),
        "rank": lambda: write_latents(path, shape=(R, R)),
        "empty": lambda: write_latents(path, n=0),
        "integer": lambda: write_latents(path, dtype=torch.int16),
        "non-square": lambda: write_latents(path, shape=(C, R, R + 2)),
        "channels": lambda: write_latents(path, shape=(3, R, R)),
        "resolution": lambda: write_latents(path, shape=(C, 16, 16)),
        "both": lambda: write_latents(path, shape=(3, 16, 16)),
        "no labels": lambda: write_latents(path, with_labels=False),
        "labels length": lambda: write_latents(path, labels=torch.zeros(N - 1, dtype=torch.long)),
        "float labels": lambda: write_latents(path, labels=torch.zeros(N)),
        "labels range": lambda: write_latents(path, labels=torch.arange(N)),
        "negative labels": lambda: write_latents(path, labels=-torch.ones(N, dtype=torch.long)),
        "nan": lambda: write_latents(path, latents=nan),
        "inf": lambda: write_latents(path, latents=inf.half()),
        "not safetensors": lambda: path.write_bytes(b"\x00\x01 this is not a safetensors file"),
        "folder": lambda: path.mkdir(),
        "missing": lambda: None,
    }
    writers[case]()
    return path


@pytest.mark.parametrize("case, words", [
    ("no key", ["'latents'", "found: x, y", "save_file"]),
    ("rank", ["(N, C, H, W)", "(12, 8, 8)"]),
    ("empty", ["no samples"]),
    ("integer", ["torch.int16", "float"]),
    ("non-square", ["8x10", "square"]),
    ("channels", ["3x8x8", "set data.channels=3"]),
    ("resolution", ["4x16x16", "set data.resolution=16"]),
    ("both", ["set data.channels=3 data.resolution=16"]),
    ("no labels", ["no 'labels'", "data.num_classes=0"]),
    ("labels length", ["'labels'", "(11,)", "(12,)"]),
    ("float labels", ["'labels'", "torch.float32", "integer"]),
    ("labels range", ["[0, 11]", "data.num_classes=3", "set data.num_classes=12"]),
    ("negative labels", ["[-1, -1]", ">= 0"]),
    ("nan", ["NaN or inf", "1 samples", "sample 5"]),
    ("inf", ["NaN or inf", "sample 7"]),
    ("not safetensors", ["not a readable safetensors file", "save_file"]),
    ("folder", ["is a folder", "data.root"]),
    ("missing", ["does not exist", "data.root"]),
])
def test_bad_files_fail_before_training_naming_the_fix(tmp_path, case, words):
    path = bad_file(tmp_path, case)
    with pytest.raises(DataError) as err:
        build_loader(latent_cfg(path), 4, CPU)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_missing_root_and_bad_scale_are_refused(tmp_path):
    with pytest.raises(DataError, match="needs data.root="):
        build_loader(latent_cfg(None), 4, CPU)
    with pytest.raises(ConfigError, match="needs data.root="):     # the CLI's check, before anything starts
        load_config(None, ["data.source=latents"])
    with pytest.raises(ConfigError, match="data.latent_scale"):
        load_config(None, ["data.latent_scale=0"])
    with pytest.raises(ConfigError, match="data.storage"):
        load_config(None, ["data.storage=disk"])


def test_per_channel_scale_and_shift(tmp_path):
    stored = write_latents(tmp_path / "l.safetensors", dtype=torch.float32)
    shift, scale = [0.5 * c - 1 for c in range(C)], [0.25 * (c + 1) for c in range(C)]
    cfg = load_config(None, ["data.source=latents", f"data.root={tmp_path / 'l.safetensors'}", f"data.channels={C}",
                             f"data.resolution={R}", f"data.num_classes={CLASSES}",
                             f"data.latent_shift={shift}", f"data.latent_scale={scale}"])
    assert cfg.data.latent_shift == shift and cfg.data.latent_scale == scale
    expected = (stored["latents"] - torch.tensor(shift).view(1, C, 1, 1)) * torch.tensor(scale).view(1, C, 1, 1)
    for x, _ in take(build_loader(cfg, 4, CPU), 3):
        sample_ids(x, expected)                                             # each row one sample, per channel
    for bad, match in [([1.0] * (C + 1), f"one finite number or {C} of them"),
                       (["a"] * C, f"one finite number or {C} of them"),
                       ([0.0] + [1.0] * (C - 1), "must be non-zero")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [f"data.channels={C}", f"data.latent_scale={bad}"])
    with pytest.raises(ConfigError, match="data.latent_shift='x' must be a finite number"):
        load_config(None, ["data.latent_shift=x"])
    assert load_config(None, ['data.latent_scale="0.18215"']).data.latent_scale == 0.18215   # quoted in YAML


def test_a_tiny_model_trains_on_latents_through_the_entry_point(tmp_path):
    write_latents(tmp_path / "l.safetensors", n=40, with_labels=False)
    data = ["data.source=latents", f"data.root={tmp_path / 'l.safetensors'}", f"data.channels={C}",
            "data.num_classes=0", "data.latent_scale=0.33", "data.latent_shift=1", "data.random_flip=true",
            "sample.classes=null"]                                          # unconditional: one grid row
    run = tmp_path / "run"
    args = [f"run_dir={run}", *TINY, *data, "total_images=64", "log_every=32",
            "checkpoint_every=32", "sample_every=32"]
    proc = run_cli("archirf.train", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in rows] == [32, 64] and all(0 < r["loss"] < 10 for r in rows)
    for name in ("samples.png", "trajectory.gif", "samples/images-000000000032.png"):   # 4 channels: a preview
        assert (run / name).stat().st_size > 0, name
    # relaunching with more images resumes at the loader's saved place in the latent stream
    proc = run_cli("archirf.train", *args[:-4], "total_images=96", "log_every=32", "checkpoint_every=0",
                   "sample_every=0")
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["images_seen"] == 96

    # a file that does not fit the recipe stops the entry point before training, naming the key
    write_latents(tmp_path / "wide.safetensors", shape=(8, R, R))
    proc = run_cli("archirf.train", f"run_dir={tmp_path / 'bad'}", *TINY, *data,
                   f"data.root={tmp_path / 'wide.safetensors'}")
    assert proc.returncode == 2 and "set data.channels=8" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device and host storage differ only on a GPU")
def test_device_and_host_storage_give_the_same_batches_on_a_gpu(tmp_path):
    write_latents(tmp_path / "l.safetensors", dtype=torch.bfloat16)
    cuda = torch.device("cuda")
    loaders = {s: build_loader(latent_cfg(tmp_path / "l.safetensors", storage=s, random_flip=True,
                                          latent_scale=0.5), 5, cuda) for s in ("device", "host", "auto")}
    assert loaders["host"].images.device == CPU and loaders["device"].images.is_cuda
    assert loaders["auto"].images.is_cuda                          # a tiny set fits the GPU
    batches = {s: take(loader, 6) for s, loader in loaders.items()}
    for x, y in batches["host"]:
        assert x.is_cuda and y.is_cuda and x.dtype == torch.float32
    assert_same_batches(batches["host"], batches["device"])
    assert_same_batches(batches["auto"], batches["device"])
    cpu = take(build_loader(latent_cfg(tmp_path / "l.safetensors", random_flip=True, latent_scale=0.5), 5, CPU), 6)
    assert_same_batches([(x.cpu(), y.cpu()) for x, y in batches["device"]], cpu)
