"""EDM2's post-hoc EMA: the least-squares profile fit, a reconstruction from stored power-function EMAs of
synthetic weights against the target profile's moments, and the trainer's files, checkpoint and CLI."""

import math

import pytest
import torch

from archirf import checkpoint as ckpt
from archirf.config import ConfigError, load_config
from archirf.ema import power_function_exponent
from archirf.posthoc_ema import PostHocEMA, _inner, main, posthoc_coefficients, reconstruct, stored_profiles
from archirf.sample import load_for_sampling
from archirf.trainer import train

from test_trainer import tiny


def profile_error(times, widths, t_target, sigma_target, x) -> float:
    """Relative L2 distance between sum_i x_i p_i and the target profile (closed form, fp64)."""
    g = torch.tensor([power_function_exponent(s) for s in widths], dtype=torch.float64)
    t = torch.tensor(times, dtype=torch.float64) / t_target
    gt, one = torch.tensor(power_function_exponent(sigma_target), dtype=torch.float64), torch.tensor(1.0).double()
    A = _inner(g[:, None], t[:, None], g[None, :], t[None, :])
    b = _inner(g, t, gt, one)
    target = _inner(gt, one, gt, one)
    return math.sqrt(max((x @ A @ x - 2 * x @ b + target).item(), 0.0) / target.item())


@pytest.mark.parametrize("sigma_target,at", [(0.10, 16), (0.075, 16), (0.13, 12), (0.03, 16)])
def test_coefficients_fit_the_target_profile(sigma_target, at):
    times = [float(k) for k in range(1, 17) for _ in (0, 1)]
    widths = [0.05, 0.10] * 16
    x = posthoc_coefficients(times, widths, float(at), sigma_target)
    assert x.dtype == torch.float64 and x.shape == (32,)
    err = profile_error(times, widths, float(at), sigma_target, x)
    assert err < (1e-6 if (sigma_target, at) == (0.10, 16) else 0.05), err   # a stored profile: exact


def test_narrow_profiles_stay_finite():
    # min(s, u)^(a+b+1) / (s^(a+1) u^(b+1)) underflows to 0/0 for narrow widths over many saved times
    times = [float(k) for k in range(1, 1025) for _ in (0, 1)]
    x = posthoc_coefficients(times, [0.01, 0.05] * 1024, 1024.0, 0.03)
    assert torch.isfinite(x).all() and x.sum().item() == pytest.approx(1.0, abs=1e-3)


def test_reconstructed_ema_has_the_target_mean_and_width(tmp_path):
    # Weights [tau, tau^2] (tau = images / final images): an EMA's entries are its profile's first two moments.
    model = torch.nn.Module()
    model.p = torch.nn.Parameter(torch.zeros(2))
    posthoc = PostHocEMA(model, [0.05, 0.10])
    steps, batch = 2048, 4
    with torch.no_grad():
        for k in range(1, steps + 1):
            tau = k / steps
            model.p.copy_(torch.tensor([tau, tau * tau]))
            posthoc.update(model, k * batch, batch)
            if k % 128 == 0:
                posthoc.save(tmp_path, k * batch, is_main=True)
    assert [n for n, _ in stored_profiles(tmp_path)] == [128 * batch * i for i in range(1, 17)]
    for sigma, at in [(0.075, None), (0.13, None), (0.10, steps * batch // 2)]:
        weights, images, _ = reconstruct(tmp_path, sigma, at)
        assert images == (at or steps * batch)
        mean, second = weights["p"].tolist()
        g, end = power_function_exponent(sigma), images / (steps * batch)
        assert mean == pytest.approx(end * (g + 1) / (g + 2), rel=5e-3)
        assert math.sqrt(max(second - mean ** 2, 0)) / end == pytest.approx(sigma, rel=0.05)


def test_trainer_saves_resumes_and_the_cli_writes_a_snapshot(tmp_path, capsys):
    common = ["log_every=16", "checkpoint_every=0", "sample_every=0", "ema.posthoc_sigma_rels=[0.05,0.1]",
              "ema.posthoc_every=32"]
    straight = train(tiny(tmp_path / "a", "total_images=96", *common))
    train(tiny(tmp_path / "b", "total_images=48", *common))            # stops after 3 steps, then resumes
    train(tiny(tmp_path / "b", "total_images=96", *common))
    files = {run: stored_profiles(run) for run in (straight, tmp_path / "b")}
    assert [n for n, _ in files[straight]] == [32, 64, 96]
    assert [n for n, _ in files[tmp_path / "b"]] == [32, 48, 64, 96]     # + the end of the first leg
    from safetensors.torch import load_file
    a, b = load_file(str(files[straight][-1][1])), load_file(str(files[tmp_path / "b"][-1][1]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # the EMAs resumed exactly
    assert any(k.startswith("0.0500/") for k in a) and any(k.startswith("0.1000/") for k in a)

    capsys.readouterr()
    assert main([str(straight), "--sigma-rel", "0.08"]) == 0
    assert "sigma_rel 0.08 at 96 images from 6 stored EMAs" in capsys.readouterr().out
    model, cfg, _ = load_for_sampling(ckpt.latest_snapshot(straight, kind="ema_sigma0.08"))
    weights, _, _ = reconstruct(straight, 0.08)
    params = dict(model.named_parameters())
    assert cfg.total_images == 96 and weights.keys() == params.keys()
    assert all(torch.equal(params[k], weights[k]) for k in weights)       # the snapshot holds the reconstruction
    for args, message in [([str(tmp_path / "nothing")], "no post-hoc EMA files in"),
                          ([str(straight), "--at", "16"], "the first is at 32; choose --at between it and 96"),
                          ([str(straight), "--sigma-rel", "0.4"], "sigma_rel must be in")]:
        with pytest.raises(SystemExit):
            main(args + ([] if "--sigma-rel" in args else ["--sigma-rel", "0.08"]))
        assert message in capsys.readouterr().err


def test_files_of_an_abandoned_stretch_are_set_aside(tmp_path):
    run = tmp_path / "run"
    common = ["log_every=16", "sample_every=0", "ema.posthoc_sigma_rels=[0.05,0.1]", "ema.posthoc_every=32"]
    train(tiny(run, "total_images=96", "checkpoint_every=32", "keep_checkpoints=3", *common))
    older = run / "checkpoints" / f"images-{32:012d}"
    train(tiny(run, "total_images=64", f"resume={older}", *common))      # back to 32 images, then on to 64
    assert [n for n, _ in stored_profiles(run)] == [32, 64]
    aside = list((run / "posthoc").glob("abandoned-*/phema-*.safetensors"))
    assert sorted(p.name for p in aside) == [f"phema-{64:012d}.safetensors", f"phema-{96:012d}.safetensors"]
    train(tiny(run, "total_images=32", "resume=none", *common))           # a fresh run: the old files move aside
    assert [n for n, _ in stored_profiles(run)] == [32]


def test_posthoc_cannot_start_in_a_resumed_run(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, "total_images=32", "log_every=16", "sample_every=0"))
    with pytest.raises(ConfigError, match="holds no post-hoc EMA of sigma_rel 0.0500"):
        train(tiny(run, "total_images=64", "log_every=16", "sample_every=0", "ema.posthoc_sigma_rels=[0.05]",
                   "ema.posthoc_every=16"))
    train(tiny(tmp_path / "b", "total_images=32", "log_every=16", "sample_every=0", "ema.posthoc_sigma_rels=[0.05]",
               "ema.posthoc_every=16"))
    with pytest.raises(ConfigError, match="holds no post-hoc EMA of sigma_rel 0.1000"):   # a width added later
        train(tiny(tmp_path / "b", "total_images=64", "log_every=16", "sample_every=0",
                   "ema.posthoc_sigma_rels=[0.05,0.1]", "ema.posthoc_every=16"))


def test_config_checks():
    with pytest.raises(ConfigError, match="needs ema.posthoc_every > 0"):
        load_config(None, ["ema.posthoc_sigma_rels=[0.05]"])
    with pytest.raises(ConfigError, match="distinct widths in"):
        load_config(None, ["ema.posthoc_sigma_rels=[0.05,0.5]", "ema.posthoc_every=100"])
