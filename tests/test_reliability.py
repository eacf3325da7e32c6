"""Faults a run must survive without losing or silently damaging it (docs/reliability.md holds the drills):
checksummed checkpoints and resume=auto's fallback, a failed resume that changes nothing, a log without
repeated lines, one save per stop, bounded NaN skips, a full disk, and the SLURM script's reading of a stop."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from archirf import checkpoint as ckpt
from archirf.config import ConfigError
from archirf.trainer import NonFiniteLoss, train
from test_trainer import ENV, TINY, _poison, losses, tiny

ROOT = Path(__file__).resolve().parents[1]


def _shard(checkpoint: Path) -> Path:
    return next(checkpoint.glob("*.distcp"))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte": (lambda c: _flip_byte(_shard(c)), "no longer matches its checksum"),
    "truncated shard": (lambda c: os.truncate(_shard(c), _shard(c).stat().st_size // 2), "bytes, [0-9]+ were written"),
    "deleted shard": (lambda c: _shard(c).unlink(), "is missing"),
    "empty .metadata": (lambda c: (c / ".metadata").write_bytes(b""), ".metadata is 0 bytes"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_named_not_loaded(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(ckpt, "_BLOCK", 4096)  # several blocks per file: the digest of digests is exercised
    path = ckpt.save_checkpoint(tmp_path, 10, {"w": torch.arange(4096.0), "n": 10}, keep=2)
    damage, reason = DAMAGE[kind]
    damage(path)
    with pytest.raises(ckpt.DamagedCheckpoint, match=reason) as err:
        ckpt.load_checkpoint(path, {"w": torch.zeros(4096), "n": 0})
    assert str(path) in str(err.value) and "resume=PATH" in str(err.value)


def test_a_checkpoint_from_before_checksums_still_loads(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 10, {"w": torch.arange(8.0)}, keep=2)
    marker = json.loads((path / ckpt.MARKER).read_text())
    assert set(marker["files"]) == {".metadata", _shard(path).name}
    (path / ckpt.MARKER).write_text(json.dumps({"images_seen": 10, "time": marker["time"]}))
    assert torch.equal(ckpt.load_checkpoint(path, {"w": torch.zeros(8)})["w"], torch.arange(8.0))


def _two_checkpoints(run, *extra):
    """A run of 64 images with checkpoints at 32 and 64, and its metric lines (one per 16 images)."""
    train(tiny(run, "total_images=64", "log_every=16", "checkpoint_every=32", *extra))
    return losses(run)


def test_resume_auto_sets_a_damaged_checkpoint_aside_and_falls_back(tmp_path, capsys):
    run = tmp_path / "run"
    straight = _two_checkpoints(run)
    newest = ckpt.latest_checkpoint(run)
    _flip_byte(_shard(newest))
    capsys.readouterr()
    train(tiny(run, "total_images=64", "log_every=16", "checkpoint_every=32"))
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged" in out and "images-000000000032 at 32 images" in out
    assert (run / "checkpoints" / f"damaged-{newest.name}").is_dir()  # moved aside, not deleted
    assert ckpt.damage(ckpt.latest_checkpoint(run)) is None and ckpt.latest_checkpoint(run).name == newest.name
    # the lines logged after image 32 were logged again by the resumed run and moved aside, not repeated
    assert losses(run) == straight
    orphaned = (run / "metrics.orphaned-32.jsonl").read_text().splitlines()
    assert [json.loads(line)["images_seen"] for line in orphaned] == [48, 64]


def test_resume_auto_with_no_intact_checkpoint_says_what_to_do(tmp_path):
    run = tmp_path / "run"
    _two_checkpoints(run)
    for path in ckpt.complete_checkpoints(run):
        os.truncate(_shard(path), 10)
    with pytest.raises(ConfigError, match="no intact checkpoint .*images-000000000064: .*resume=PATH"):
        train(tiny(run, "total_images=96", "log_every=16"))
    with pytest.raises(ConfigError, match="images-000000000032 is damaged"):
        train(tiny(run, "total_images=96", "log_every=16", f"resume={run}/checkpoints/images-000000000032"))
    assert len(ckpt.complete_checkpoints(run)) == 2  # a failed resume moves nothing


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_failed_resume_changes_nothing_in_the_run_dir(tmp_path):
    run = tmp_path / "run"
    posthoc = ["ema.posthoc_sigma_rels=[0.1]", "ema.posthoc_every=16"]
    train(tiny(run, "total_images=32", "log_every=16", *posthoc))
    before = _files(run)
    with pytest.raises(ConfigError, match=r"was trained as another network \(model.hidden_size: 32 -> 64"):
        train(tiny(run, "total_images=64", "log_every=16", "model.hidden_size=64", *posthoc))
    assert _files(run) == before  # config.yaml included: the run can still be sampled
    (run / "config.yaml").rename(tmp_path / "config.yaml")          # without it, the checkpoint's shapes decide
    before = _files(run)
    with pytest.raises(ConfigError, match="does not fit this config .*Size mismatch"):
        train(tiny(run, "total_images=64", "log_every=16", "model.hidden_size=64", *posthoc))
    assert _files(run) == before


def test_a_killed_run_resumes_without_repeating_metric_lines(tmp_path):
    run = tmp_path / "run"
    straight = _two_checkpoints(run)
    # as if killed after logging image 64 but before its checkpoint: the one at 32 is the newest
    shutil.rmtree(ckpt.latest_checkpoint(run))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"images_seen": 80, "lo')  # a line cut short by the kill
    train(tiny(run, "total_images=64", "log_every=16", "checkpoint_every=32"))
    assert losses(run) == straight
    aside = (run / "metrics.orphaned-32.jsonl").read_text().splitlines()
    assert [json.loads(line)["images_seen"] for line in aside[:2]] == [48, 64] and aside[2].startswith('{"images_')


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, capsys):
    run = tmp_path / "run"
    _two_checkpoints(run)
    train(tiny(run, "total_images=48", "log_every=16", f"resume={run}/checkpoints/images-000000000032"))
    # resume=auto of a later launch continues this stretch, not the abandoned one at 64
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["images-000000000032", "images-000000000048"]
    assert (run / "checkpoints" / "abandoned-images-000000000064").is_dir()
    assert "moved checkpoint" in capsys.readouterr().out
    assert [images for images, _ in losses(run)] == [16, 32, 48]


def _signal_on_loss_call(monkeypatch, n):
    """SIGTERM to this process during the objective's n-th loss call (the trainer's handler is set by then)."""
    def bad(call):
        if call == n:
            signal.raise_signal(signal.SIGTERM)
        return False
    _poison(monkeypatch, bad)


def test_a_stop_on_a_checkpoint_step_saves_once_and_logs_its_steps(tmp_path, monkeypatch):
    saves, real_save = [], ckpt.save_training_state

    def counting(run_dir, images, *args, **kwargs):
        saves.append(images)
        return real_save(run_dir, images, *args, **kwargs)
    monkeypatch.setattr(ckpt, "save_training_state", counting)
    _signal_on_loss_call(monkeypatch, 2)  # the step ending at image 32, a checkpoint step
    train(tiny(tmp_path, "total_images=160", "log_every=64", "checkpoint_every=32"))
    assert saves == [32]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["images_seen"], r["steps"]) for r in rows] == [(32, 2)]  # the unfinished interval, flushed
    assert json.loads((tmp_path / "stopped.json").read_text())["images_seen"] == 32


def test_nan_skip_gives_up_after_the_limit(tmp_path, monkeypatch):
    def bad(call):
        if call > 40:
            raise RuntimeError("the skip loop never gave up")
        return call > 2
    _poison(monkeypatch, bad)
    with pytest.raises(NonFiniteLoss, match="3 consecutive steps .* at 32 images.*images-000000000032 is the last"):
        train(tiny(tmp_path, "total_images=1600", "log_every=16", "checkpoint_every=16", "nan_policy=skip",
                   "nan_skip_limit=3"))
    assert ckpt.latest_checkpoint(tmp_path).name == "images-000000000032"
    with pytest.raises(NonFiniteLoss, match="at 32 images; stopped without saving, so no checkpoint was written"):
        train(tiny(tmp_path / "new", "total_images=1600", "nan_policy=skip", "nan_skip_limit=2"))
    with pytest.raises(ConfigError, match="nan_skip_limit applies to nan_policy=skip"):
        tiny(tmp_path, "nan_skip_limit=3")


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import torch.distributed.checkpoint.filesystem as fs

    from archirf.train import main

    saves, real_save, real_write = [], ckpt.save_training_state, fs._write_item

    def counting(run_dir, images, *args, **kwargs):
        saves.append(images)
        return real_save(run_dir, images, *args, **kwargs)

    def write(*args, **kwargs):
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)
    monkeypatch.setattr(ckpt, "save_training_state", counting)
    monkeypatch.setattr(fs, "_write_item", write)
    rc = main([f"run_dir={tmp_path}", *TINY, "total_images=96", "log_every=16", "checkpoint_every=32"])
    err = capsys.readouterr().err
    assert rc == 4 and len(err.strip().splitlines()) == 1, err
    assert "the disk is full" in err and ".tmp-images-000000000064" in err and "MiB free there" in err
    assert "images-000000000032) is intact" in err
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["images-000000000032"]  # no partial copy
    assert ckpt.damage(tmp_path / "checkpoints" / "images-000000000032") is None
    assert ckpt.is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4310"))


def _fake_slurm(tmp_path: Path) -> dict:
    """srun runs its command here; scontrol names this host and logs a requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\n[[ $1 == show ]] && echo localhost && exit 0\n'
                                      f'echo "$@" >> {tmp_path}/scontrol.log\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**ENV, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{ENV['PATH']}", "SLURM_JOB_NODELIST": "x",
            "SLURM_NNODES": "1", "SLURM_JOB_ID": "7", "GPUS_PER_NODE": "1", "RDZV_PORT": "29731"}


@pytest.mark.parametrize("sender", ["scheduler", "script", "crash"])
def test_slurm_script_reads_a_checkpointed_stop_as_success(tmp_path, sender):
    """SIGTERM to the whole job (scancel, time limit) or USR1 to the script (pre-emption warning): the worker
    checkpoints and exits 0 but torchrun exits 1 (its SignalException). The script exits 0 either way, and
    requeues on USR1 only; a run that fails without a stop checkpoint stays a failure."""
    run = tmp_path / "run"
    data = ["data.source=folder", f"data.root={tmp_path}/none"] if sender == "crash" else []
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "slurm.sbatch"), f"run_dir={run}", *TINY, *data,
                             "total_images=100000000", "log_every=16", "checkpoint_every=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_fake_slurm(tmp_path),
                            cwd=ROOT, start_new_session=True)
    if sender == "crash":
        out = proc.communicate(timeout=180)[0]
        assert proc.returncode == 1 and "DataError" in out and not (run / "stopped.json").exists(), out[-3000:]
        return
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    if sender == "scheduler":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "checkpointed at" in out and "torchrun exited 1" in out, out[-3000:]
    assert json.loads((run / "stopped.json").read_text())["images_seen"] >= 16
    requeued = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    assert requeued == ("requeue 7\n" if sender == "script" else "")


def test_a_resume_into_another_network_is_refused_not_truncated(tmp_path):
    """DCP loads only the keys it is asked for: without these checks a depth-1 relaunch of a depth-2 run
    trained on with the second block silently dropped, a depth-3 one was blamed on the checkpoint, and
    a relaunch with other heads (the same shapes) trained on as another network."""
    run = tmp_path / "run"
    train(tiny(run, "total_images=32", "log_every=16"))
    before = _files(run)
    for change in ("model.depth=1", "model.num_heads=4"):
        with pytest.raises(ConfigError, match=rf"was trained as another network \(model.{change[6:-2]}: 2 -> "):
            train(tiny(run, "total_images=64", "log_every=16", change))
    (run / "config.yaml").rename(tmp_path / "config.yaml")          # without it, the checkpoint's tensors decide
    before = _files(run)
    with pytest.raises(ConfigError, match=r"does not fit this config: it holds \d+ model tensors the configured "
                                          r"network lacks \(e.g. blocks\.1\."):
        train(tiny(run, "total_images=64", "log_every=16", "model.depth=1"))
    with pytest.raises(ConfigError, match=r"does not fit this config: it holds none of \d+ tensors the configured "
                                          r"network has \(e.g. blocks\.2\."):
        train(tiny(run, "total_images=64", "log_every=16", "model.depth=3"))
    assert _files(run) == before


def test_resume_path_of_a_damaged_checkpoint_is_one_line(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, "total_images=32", "log_every=16", "ema.posthoc_sigma_rels=[0.1]", "ema.posthoc_every=16"))
    newest = ckpt.latest_checkpoint(run)
    (newest / ".metadata").write_bytes(b"")
    before = _files(run)
    with pytest.raises(ConfigError, match=r"is damaged: .metadata is 0 bytes"):
        train(tiny(run, "total_images=64", "log_every=16", f"resume={newest}", "ema.posthoc_sigma_rels=[0.1]",
                   "ema.posthoc_every=16"))
    assert _files(run) == before


def test_a_small_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    target.write_text("the old config\n")

    def full(path, text):
        Path(path).write_text(text[:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_fsync_write", full)
    with pytest.raises(OSError, match="No space left") as err:
        ckpt.write_atomic(target, "the new config\n")
    assert err.value.filename == str(target) and ckpt.is_disk_full(err.value)
    assert target.read_text() == "the old config\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
