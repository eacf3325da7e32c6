import json

import numpy as np
import pytest
import torch
from PIL import Image

import archirf.metrics as metrics_module
from archirf.metrics import Metrics, peak_flops
from archirf.visualize import make_grid, plot_loss_curve, save_gif, save_grid

CPU = torch.device("cpu")


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(metrics_module, "_now", fake)
    return fake


def make_metrics(tmp_path, **kw):
    args = dict(total_images=10_000, start_images=0, flops_per_image=None, device=CPU, progress=False)
    args.update(kw)
    return Metrics(tmp_path, **args)


def read_lines(tmp_path):
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_step_never_reads_tensors_and_means_are_exact(tmp_path, clock, monkeypatch):
    monkeypatch.delenv("ARCHIRF_PEAK_TFLOPS", raising=False)
    m = make_metrics(tmp_path, flops_per_image=1000)
    losses = [0.5, 0.25, float("nan"), 1.0, float("inf")]
    grads = [2.0, 4.0, 8.0, 6.0, 1.0]
    # every way of pulling a tensor's value to the host fails the test while step() runs
    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "cpu"):
            mp.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"Tensor.{_n} in step()"))
        for loss, grad in zip(losses, grads):
            m.step(torch.tensor(loss), torch.tensor(grad), images=32, data_wait_s=0.1)
        # accumulators stay tensors on the device
        assert isinstance(m._sums, torch.Tensor) and isinstance(m._nonfinite, torch.Tensor)
    clock.t += 2.0
    rec = m.log(images_seen=160, lr=1e-4)

    # the two non-finite steps are counted and left out of both means
    assert rec["loss"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    assert rec["grad_norm"] == pytest.approx((2.0 + 4.0 + 6.0) / 3)
    assert rec["nonfinite"] == 2 and m.nonfinite_count() == 2
    assert rec["steps"] == 5
    assert rec["img_per_s"] == pytest.approx(160 / 2.0)
    assert rec["data_wait_frac"] == pytest.approx(0.5 / 2.0)
    assert rec["tflops_per_gpu"] == pytest.approx(6 * 1000 * 80 / 1e12)
    assert "mfu" not in rec  # no peak known on CPU
    assert "peak_mem_gib" not in rec  # CUDA only

    # accumulators reset; the non-finite counter is for the whole process
    m.step(torch.tensor(3.0), torch.tensor(1.0), images=32, data_wait_s=0.0)
    clock.t += 1.0
    rec2 = m.log(images_seen=192, lr=2e-4)
    assert rec2["loss"] == pytest.approx(3.0) and rec2["steps"] == 1 and rec2["nonfinite"] == 2
    assert rec2["img_per_s"] == pytest.approx(32.0)

    lines = read_lines(tmp_path)
    assert len(lines) == 2
    expected_keys = {"images_seen", "loss", "grad_norm", "lr", "img_per_s", "steps", "nonfinite",
                     "data_wait_frac", "time", "elapsed_s", "tflops_per_gpu"}
    assert expected_keys <= set(lines[0])
    assert lines[0]["images_seen"] == 160 and lines[1]["lr"] == 2e-4
    assert lines[1]["elapsed_s"] == pytest.approx(3.0)
    m.close()


def test_window_of_only_nonfinite_steps_logs_null_loss(tmp_path, clock):
    m = make_metrics(tmp_path)
    m.step(torch.tensor(float("nan")), torch.tensor(1.0), images=8, data_wait_s=0.0)
    clock.t += 1.0
    rec = m.log(images_seen=8, lr=1e-3, extra={"ema_loss": float("nan"), "epoch": 1})
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["nonfinite"] == 1
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line  # strict JSON
    assert json.loads(line)["ema_loss"] is None and json.loads(line)["epoch"] == 1


def test_finite_flag_overrides_loss_check(tmp_path, clock):
    m = make_metrics(tmp_path)
    # loss finite but grad norm overflowed: the trainer says the step does not count
    m.step(torch.tensor(1.0), torch.tensor(float("inf")), images=8, data_wait_s=0.0, finite=torch.tensor(False))
    m.step(torch.tensor(2.0), torch.tensor(3.0), images=8, data_wait_s=0.0, finite=torch.tensor(True))
    clock.t += 1.0
    rec = m.log(images_seen=16, lr=1e-3)
    assert rec["loss"] == pytest.approx(2.0) and rec["grad_norm"] == pytest.approx(3.0)
    assert rec["nonfinite"] == 1


def test_mfu_with_peak_override_and_world_size(tmp_path, clock, monkeypatch):
    monkeypatch.setenv("ARCHIRF_PEAK_TFLOPS", "1e-6")  # 1e6 FLOP/s
    assert peak_flops(CPU) == pytest.approx(1e6)
    m = make_metrics(tmp_path, flops_per_image=500, world_size=2)
    for _ in range(4):
        m.step(torch.tensor(1.0), torch.tensor(1.0), images=100, data_wait_s=0.0)
    clock.t += 4.0
    rec = m.log(images_seen=400, lr=1e-3)
    assert rec["img_per_s"] == pytest.approx(100.0)  # global
    # per GPU: 6 * 500 FLOP/img * (100 / 2) img/s = 150,000 FLOP/s over a 1e6 peak
    assert rec["mfu"] == pytest.approx(0.15)


def test_peak_flops_none_on_cpu(monkeypatch):
    monkeypatch.delenv("ARCHIRF_PEAK_TFLOPS", raising=False)
    assert peak_flops(CPU) is None


def test_reduce_hook_sums_over_ranks(tmp_path, clock):
    # pretend a second rank saw exactly the same numbers: sums double, means stay
    m = make_metrics(tmp_path, reduce=lambda t: t * 2)
    m.step(torch.tensor(float("nan")), torch.tensor(1.0), images=8, data_wait_s=0.0)
    m.step(torch.tensor(4.0), torch.tensor(2.0), images=8, data_wait_s=0.0)
    clock.t += 1.0
    rec = m.log(images_seen=16, lr=1e-3)
    assert rec["loss"] == pytest.approx(4.0) and rec["nonfinite"] == 2 and m.nonfinite_count() == 2


def test_paused_time_is_left_out_of_throughput(tmp_path, clock):
    m = make_metrics(tmp_path)
    m.step(torch.tensor(1.0), torch.tensor(1.0), images=50, data_wait_s=0.0)
    clock.t += 1.0
    with m.paused():
        clock.t += 10.0  # e.g. a checkpoint
    rec = m.log(images_seen=50, lr=1e-3)
    assert rec["img_per_s"] == pytest.approx(50.0)
    assert rec["paused_s"] == pytest.approx(10.0)              # and reported on its own
    m.step(torch.tensor(1.0), torch.tensor(1.0), images=50, data_wait_s=0.0)
    clock.t += 1.0
    assert m.log(images_seen=100, lr=1e-3)["paused_s"] == 0.0  # per interval


def test_non_main_rank_writes_nothing_and_progress_bar_advances(tmp_path, clock, capsys):
    other = make_metrics(tmp_path / "rank1", is_main=False, progress=True)
    other.step(torch.tensor(1.0), torch.tensor(1.0), images=8, data_wait_s=0.0)
    clock.t += 1.0
    assert other.log(images_seen=8, lr=1e-3)["loss"] == 1.0
    assert not (tmp_path / "rank1").exists() and other._bar is None

    main = make_metrics(tmp_path, total_images=1000, start_images=200, progress=True)
    main.step(torch.tensor(1.0), torch.tensor(1.0), images=64, data_wait_s=0.0)
    assert main._bar.n == 264 and main._bar.total == 1000
    main.log(images_seen=264, lr=1e-3)
    main.close()
    assert "img" in capsys.readouterr().err


def test_make_grid_shapes_and_values():
    grey = torch.linspace(-1, 1, 5 * 1 * 4 * 4).reshape(5, 1, 4, 4)
    g = make_grid(grey, nrow=3, pad=1)
    assert g.dtype == np.uint8 and g.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert g.min() == 0 and g.max() == 255
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()  # grey stays grey
    assert (g[1:5, 1:5, 0] == grey[0, 0].add(1).mul(127.5).round().numpy()).all()  # first tile in place

    rgb = torch.zeros(2, 3, 8, 8)
    rgb[:, 0] = 5.0  # out of range clamps to 255
    rgb[:, 1] = -5.0  # clamps to 0
    g = make_grid(rgb, nrow=2, pad=2, upscale=4)
    assert g.shape == (32 + 4, 2 * 32 + 6, 3)
    tile = g[2:34, 2:34]
    assert (tile[..., 0] == 255).all() and (tile[..., 1] == 0).all() and (tile[..., 2] == 128).all()

    with pytest.raises(ValueError, match="got shape"):
        make_grid(torch.zeros(2, 8, 8), nrow=2)


def test_latents_get_a_preview_grid():
    """4-channel latents (no decoder at hand) are shown as their first three channels, scaled."""
    torch.manual_seed(0)
    lat = torch.randn(6, 4, 8, 8) * 3 + 5
    g = make_grid(lat, nrow=3, pad=0)
    assert g.shape == (16, 24, 3)
    assert 90 < g.mean() < 165 and g.std() > 30         # centred and spread, not clamped flat
    ref = make_grid(lat[:, :3], nrow=3, pad=0).astype(float)
    assert not (ref == g).all()                           # raw latents would clamp; the preview rescales
    ch0 = lat[:, 0]
    assert np.corrcoef(g[:8, :8, 0].ravel(), ch0[0].ravel().numpy())[0, 1] > 0.9
    assert make_grid(torch.randn(2, 2, 4, 4), nrow=2, pad=0).shape == (4, 8, 3)


def test_save_grid_and_gif(tmp_path):
    torch.manual_seed(0)
    frames = [torch.randn(4, 1, 8, 8).clamp(-1, 1) for _ in range(5)]
    png = save_grid(frames[-1], tmp_path / "grid.png", nrow=2, upscale=2)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (2 * 16 + 6, 2 * 16 + 6)

    gif = save_gif(frames, tmp_path / "traj.gif", nrow=2, duration_ms=50, upscale=2, hold_last_ms=700)
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 5 and im.info.get("loop") == 0
        im.seek(4)
        assert im.info["duration"] == 700
        # grey frames survive the palette exactly
        assert (np.asarray(im.convert("RGB")) == make_grid(frames[4], nrow=2, upscale=2)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "traj.gif"]  # no temp files left


def _write_jsonl(path, rows):
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_plot_loss_curve_single_point_and_resumed_run(tmp_path):
    from archirf.visualize import _read_metrics

    jsonl = tmp_path / "metrics.jsonl"
    _write_jsonl(jsonl, [{"images_seen": 100, "loss": 0.9, "lr": 1e-4, "elapsed_s": 1.0}])
    out = plot_loss_curve(jsonl, tmp_path / "loss.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100

    # first run logs to 300 then dies; the resumed run restarts from its 200 checkpoint
    _write_jsonl(jsonl, [{"images_seen": s, "loss": 1.0 / s, "lr": 1e-4, "elapsed_s": s / 100} for s in (200, 300)])
    with open(jsonl, "a") as f:
        f.write('{"images_seen": 31')  # torn line from the crash
        f.write("\n")
    _write_jsonl(jsonl, [{"images_seen": s, "loss": 2.0 / s, "lr": 2e-4, "elapsed_s": s / 1000} for s in (250, 350)])
    records, resumes = _read_metrics(jsonl)
    assert [r["images_seen"] for r in records] == [100, 200, 250, 350]
    assert resumes == [250]
    out = plot_loss_curve(jsonl, tmp_path / "loss.png")
    with Image.open(out) as im:
        im.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]
