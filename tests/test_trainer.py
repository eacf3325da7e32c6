"""The trainer end to end on tiny recipes: entry point, outputs, exact resume, faults, sampling CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from archirf import checkpoint as ckpt
from archirf.config import load_config
from archirf.trainer import NonFiniteLoss, train

TINY = ["data.resolution=8", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
        "model.num_register_tokens=2", "global_batch=16", "sample.steps=4", "sample.per_class=2",
        "sample.classes=[0,1,2]", "sample.gif_frames=3", "progress=false", "ema.half_life_images=200"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def tiny(run_dir, *extra):
    return load_config(None, TINY + [f"run_dir={run_dir}", *extra])


def losses(run_dir) -> list[tuple[int, float]]:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return [(r["images_seen"], r["loss"]) for r in map(json.loads, lines)]


def run_cli(module, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_commands_exit_after_their_threads_atexit_handlers_and_output(tmp_path):
    """exit_now (the end of archirf.train / eval / encode / prepare) skips only the interpreter's teardown: an
    executor's queued work finishes, atexit handlers run, buffered output reaches the pipe, the code is kept."""
    code = f"""
import atexit, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from archirf import exit_now
pool = ThreadPoolExecutor(1)
pool.submit(lambda: (time.sleep(0.3), Path({str(tmp_path / "late")!r}).write_text("done")))
atexit.register(lambda: print("atexit ran"))
print("buffered", end="")
exit_now(3)
print("never")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "bufferedatexit ran\n" and (tmp_path / "late").read_text() == "done"


def test_entry_point_end_to_end(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "archirf.train",
           f"run_dir={run}", *TINY, "total_images=64", "log_every=32", "checkpoint_every=32", "sample_every=32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.yaml", "metrics.jsonl", "samples.png", "trajectory.gif", "loss.png"):
        assert (run / name).stat().st_size > 0, name
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["images-000000000032.png",
                                                                  "images-000000000064.png"]
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["images-000000000032", "images-000000000064"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in rows] == [32, 64]
    assert all(r["loss"] > 0 and r["img_per_s"] > 0 for r in rows)
    assert load_config(None, TINY + [f"run_dir={run}", "total_images=64", "log_every=32", "checkpoint_every=32",
                                     "sample_every=32"]) == \
        __import__("archirf.config").config.from_yaml_text((run / "config.yaml").read_text())

    # the sampling CLI works on the run dir and on the snapshot, and says which weights it used
    out = tmp_path / "x.png"
    proc = run_cli("archirf.sample", str(run), "--classes", "0,1", "--steps", "3", "--out", str(out), "--gif")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EMA weights from checkpoint" in proc.stdout and out.stat().st_size > 0
    assert out.with_suffix(".gif").stat().st_size > 0
    snap = ckpt.latest_snapshot(run)
    proc = run_cli("archirf.sample", str(snap), "--classes", "2", "--steps", "2", "--out", str(tmp_path / "y.png"))
    assert proc.returncode == 0 and "ema weights from snapshot" in proc.stdout, proc.stderr[-3000:]


def test_resume_is_bitwise_exact(tmp_path, capsys):
    common = ["log_every=16", "checkpoint_every=0", "sample_every=0"]
    straight = train(tiny(tmp_path / "a", "total_images=96", *common))
    train(tiny(tmp_path / "b", "total_images=48", *common))  # stop after 3 steps ...
    capsys.readouterr()
    train(tiny(tmp_path / "b", "total_images=96", *common))  # ... then the same command continues
    # the changed key is reported and the earlier config kept beside the new one
    assert "total_images: 48 -> 96" in capsys.readouterr().out
    assert "total_images: 48" in (tmp_path / "b" / "config.1.yaml").read_text()
    assert "total_images: 96" in (tmp_path / "b" / "config.yaml").read_text()
    assert losses(straight) == losses(tmp_path / "b")  # bitwise: json round-trips floats exactly
    a, b = (ckpt.load_snapshot(ckpt.latest_snapshot(d))[0] for d in (straight, tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_none_moves_the_old_run_aside(tmp_path):
    run = tmp_path / "r"
    train(tiny(run, "total_images=32", "log_every=16"))
    train(tiny(run, "total_images=32", "log_every=16", "resume=none"))
    previous = list(run.glob("previous-*"))
    assert len(previous) == 1 and (previous[0] / "checkpoints").is_dir()
    assert len(losses(run)) == 2  # the new run's metrics alone


def _poison(monkeypatch, bad):
    """Makes the objective's loss NaN on the loss calls (1-based) for which bad(call) is true."""
    import archirf.tasks.generative as generative

    real = generative.build_objective

    def build(cfg):
        obj = real(cfg)
        loss, calls = obj.loss, [0]

        def poisoned(model_fn, x, y):
            calls[0] += 1
            out = loss(model_fn, x, y)
            return out * float("nan") if bad(calls[0]) else out
        obj.loss = poisoned
        return obj
    monkeypatch.setattr(generative, "build_objective", build)


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from archirf.sample import load_for_sampling

    _poison(monkeypatch, lambda call: call > 4)
    with pytest.raises(NonFiniteLoss, match="last good state"):
        train(tiny(tmp_path, "total_images=160", "log_every=32", "checkpoint_every=32"))
    assert ckpt.latest_checkpoint(tmp_path).name == "images-000000000064"  # before step 5 went bad
    for weights in ("ema", "raw"):
        model = load_for_sampling(tmp_path, weights)[0]
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_skip_policy_skips_the_step(tmp_path, monkeypatch):
    _poison(monkeypatch, lambda call: call == 3)
    train(tiny(tmp_path, "total_images=64", "log_every=16", "nan_policy=skip"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in rows] == [16, 32, 48, 64]
    assert all(r["loss"] == r["loss"] for r in rows)  # no NaN reached the metrics
    assert rows[-1]["skipped_steps"] == 1


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    run = tmp_path / "run"
    posthoc = ["ema.posthoc_sigma_rels=[0.05]", "ema.posthoc_every=100000000"]
    args = [f"run_dir={run}", *TINY, *posthoc, "total_images=100000000", "log_every=16", "checkpoint_every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "archirf.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "received signal" in out
    last = ckpt.latest_checkpoint(run)
    assert last is not None and int(last.name.split("-")[1]) >= 16
    # the post-hoc EMAs are saved at the stop too (their cadence is far off)
    assert (run / "posthoc" / f"phema-{last.name.split('-')[1]}.safetensors").exists()
    # relaunching the same command resumes from it
    proc = run_cli("archirf.train", *args[:-3], "total_images=" + str(int(last.name.split("-")[1]) + 16),
                   "log_every=16")
    assert proc.returncode == 0 and f"resumed from {last}" in proc.stdout, proc.stderr[-3000:]


def test_bad_config_and_missing_data_fail_before_training(tmp_path):
    proc = run_cli("archirf.train", f"run_dir={tmp_path}/a", "model.depht=3")
    assert proc.returncode == 2 and "model.depht" in proc.stderr and "did you mean 'depth'" in proc.stderr
    assert not (tmp_path / "a").exists()
    proc = run_cli("archirf.train", f"run_dir={tmp_path}/b", "data.source=folder", f"data.root={tmp_path}/none")
    assert proc.returncode == 2 and "none" in proc.stderr
    assert not list((tmp_path / "b").glob("checkpoints/*"))


def test_print_config():
    proc = run_cli("archirf.train", "--print-config", "optim.lr=0.25")
    assert proc.returncode == 0 and "lr: 0.25" in proc.stdout


def test_gradient_accumulation_equals_one_big_batch(tmp_path, monkeypatch):
    """global_batch=16 as 2 micro batches of 8 takes the same steps as one batch of 16."""
    import archirf.tasks.generative as generative
    from archirf.objectives import RectifiedFlow
    from archirf.sample import load_for_sampling

    class FixedNoiseFlow(RectifiedFlow):  # no random draws in the loss: both runs see identical terms
        def loss(self, model_fn, x, y):
            return super().loss(model_fn, x, y, noise=torch.zeros_like(x), t=torch.full((x.shape[0],), 0.5))

    monkeypatch.setattr(generative, "build_objective", lambda cfg: FixedNoiseFlow(cfg.objective))
    common = ["total_images=48", "log_every=16", "model.class_dropout_prob=0"]
    train(tiny(tmp_path / "one", *common, "micro_batch=16"))
    train(tiny(tmp_path / "accum", *common, "micro_batch=8"))
    one, accum = (load_for_sampling(tmp_path / name, "raw")[0].state_dict() for name in ("one", "accum"))
    assert all(torch.allclose(one[k], accum[k], atol=1e-6, rtol=1e-5) for k in one)
    rows = [[json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", "accum")]
    assert [r["images_seen"] for r in rows[0]] == [r["images_seen"] for r in rows[1]] == [16, 32, 48]
    assert rows[0][-1]["loss"] < rows[0][0]["loss"]  # training moved the weights: the comparison is not vacuous
    for a, b in zip(*rows):  # the same loss and the same gradient (norm) per step
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_relaunching_a_finished_run_changes_nothing(tmp_path, capsys):
    cfg = tiny(tmp_path, "total_images=32", "log_every=16")
    train(cfg)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "config.yaml"}
    train(cfg)
    assert "already complete" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "config.yaml"}
    assert before == after
