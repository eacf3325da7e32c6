"""Errors a user sees: bad input ends in one line naming the problem and the fix, exit 2, no traceback."""

import shutil
from pathlib import Path

import pytest

from archirf import checkpoint as ckpt
from archirf import sample as sample_cli
from archirf import train as train_cli
from archirf.config import ConfigError, load_config
from archirf.trainer import train

TINY = ["data.resolution=8", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
        "model.num_register_tokens=2", "global_batch=16", "sample.steps=2", "sample.per_class=1",
        "sample.classes=[0,1]", "sample.gif_frames=2", "progress=false", "total_images=16", "log_every=16",
        "checkpoint_every=0", "sample_every=0"]


def one_line_error(capsys, prog: str) -> str:
    """The command's stderr: exactly one line, starting with its name, and no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: ") and "Traceback" not in err, err
    return lines[0]


def train_fails(capsys, *argv) -> str:
    assert train_cli.main(list(argv)) == 2
    return one_line_error(capsys, "archirf.train")


def sample_fails(capsys, *argv) -> str:
    assert sample_cli.main(list(argv)) == 2
    return one_line_error(capsys, "archirf.sample")


# ------------------------------------------------------------------------------------------ --config


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  depth: 4\n  name: [dit\n")
    line = train_fails(capsys, "--config", str(recipe))
    assert str(recipe) in line and "line 3, column" in line and "YAML" in line


def test_yaml_with_a_tab_indent_names_the_line(tmp_path, capsys):
    recipe = tmp_path / "tab.yaml"
    recipe.write_text("model:\n\tdepth: 4\n")
    line = train_fails(capsys, "--config", str(recipe))
    assert str(recipe) in line and "line 2, column 1" in line


@pytest.mark.parametrize("content", ["- model\n- data\n", "42\n"])
def test_config_that_is_not_a_mapping(tmp_path, capsys, content):
    recipe = tmp_path / "x.yaml"
    recipe.write_text(content)
    line = train_fails(capsys, "--config", str(recipe))
    assert str(recipe) in line and "not a mapping of keys" in line and "key: value" in line


def test_config_that_is_a_directory_or_binary_or_missing(tmp_path, capsys):
    line = train_fails(capsys, "--config", str(tmp_path))
    assert f"{tmp_path} is a directory" in line and "YAML file" in line
    binary = tmp_path / "weights.safetensors"
    binary.write_bytes(b"\x80\x81\xff\x00" * 8)
    line = train_fails(capsys, "--config", str(binary))
    assert str(binary) in line and "not a text" in line
    line = train_fails(capsys, "--config", str(tmp_path / "nowhere.yaml"))
    assert "not found" in line and "nowhere.yaml" in line


def test_override_that_is_not_yaml_and_an_unresolved_interpolation(capsys):
    line = train_fails(capsys, "--print-config", "optim.betas=[0.9,x")
    assert "cannot parse override 'optim.betas=[0.9,x'" in line and "did not find expected" in line
    line = train_fails(capsys, "--print-config", "run_dir=${oc.env:ARCHIRF_TEST_UNSET_VARIABLE}")
    assert "'run_dir'" in line and "ARCHIRF_TEST_UNSET_VARIABLE" in line


def test_empty_config_file_is_the_defaults(tmp_path):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("# nothing yet\n")
    assert load_config(str(recipe)) == load_config(None)


# ------------------------------------------------------------------------------------------ run_dir


def test_run_dir_under_a_file_fails_before_training(tmp_path, capsys):
    afile = tmp_path / "hostname"
    afile.write_text("x")
    line = train_fails(capsys, *TINY, f"run_dir={afile / 'run'}")
    assert f"run_dir={afile / 'run'}" in line and f"{afile} is a file" in line


def test_run_dir_that_cannot_be_created(capsys):
    line = train_fails(capsys, *TINY, "run_dir=/proc/archirf-test/run")
    assert "run_dir=/proc/archirf-test/run" in line and "cannot be created" in line


# ------------------------------------------------------------------------------------------ sample keys


@pytest.mark.parametrize("override,match", [
    ("sample.per_class=0", "sample.per_class must be >= 1"),
    ("sample.gif_frames=0", "sample.gif_frames must be >= 1"),
    ("sample.classes=[]", "sample.classes must name at least one class"),
])
def test_sample_keys_are_validated(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_sample_classes_need_a_conditional_dataset():
    with pytest.raises(ConfigError, match="sample.classes.*data.num_classes=0"):
        load_config(None, ["data.num_classes=0", "sample.classes=[0]"])


# ------------------------------------------------------------------------------------------ sampling


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished run with two checkpoints (16 and 32 images)."""
    return train(load_config(None, TINY + [f"run_dir={tmp_path_factory.mktemp('errs') / 'run'}", "total_images=32",
                                           "checkpoint_every=16"]))


def test_sample_bad_class_ids(run, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    line = sample_fails(capsys, str(run), "--classes", "0,12", "--out", out)
    assert "--classes" in line and "[12]" in line and "0..9" in line
    line = sample_fails(capsys, str(run), "--classes", "0,cat", "--out", out)
    assert "--classes" in line and "'cat'" in line
    line = sample_fails(capsys, str(run), "--per-class", "0", "--out", out)
    assert "--per-class must be >= 1" in line
    line = sample_fails(capsys, str(run), "--steps", "0", "--out", out)
    assert "--steps must be >= 1" in line
    line = sample_fails(capsys, str(run), "--sampler", "ddim", "--out", out)
    assert "--sampler ddim" in line and "euler" in line
    line = sample_fails(capsys, str(run), "--grid", "edm", "--sampler", "heun", "--out", str(tmp_path / "no" / "x.png"))
    assert "--out" in line and str(tmp_path / "no") in line
    assert not Path(out).exists()


def test_sample_missing_path(tmp_path, capsys):
    line = sample_fails(capsys, str(tmp_path / "nowhere"))
    assert f"{tmp_path / 'nowhere'}: no such run dir or snapshot file" in line


def test_sample_empty_dir_and_non_snapshot_files(tmp_path, capsys):
    line = sample_fails(capsys, str(tmp_path))
    assert f"{tmp_path} holds no complete checkpoint" in line
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    line = sample_fails(capsys, str(text))
    assert str(text) in line and "not a .safetensors snapshot" in line
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    line = sample_fails(capsys, str(fake))
    assert str(fake) in line and "cannot be read as a snapshot" in line


def test_sample_safetensors_without_a_config(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    line = sample_fails(capsys, str(other))
    assert str(other) in line and "not an ArchiRF snapshot" in line


def test_sample_truncated_snapshot(run, tmp_path, capsys):
    snap = tmp_path / "cut.safetensors"
    data = ckpt.latest_snapshot(run).read_bytes()
    snap.write_bytes(data[: len(data) // 2])
    line = sample_fails(capsys, str(snap))
    assert str(snap) in line and "cannot be read as a snapshot" in line


def test_sample_corrupt_checkpoint_names_it_and_the_snapshots(run, tmp_path, capsys):
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    newest = ckpt.latest_checkpoint(broken)
    for shard in newest.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    line = sample_fails(capsys, str(broken))
    earlier = ckpt.complete_checkpoints(broken)[0]
    assert str(newest) in line and "is damaged" in line and "bytes, " in line and str(broken / "snapshots") in line
    assert f"the checkpoint before it: {earlier}" in line and "resume=" not in line   # no training advice
    line = sample_fails(capsys, str(newest))                    # the broken one named directly: the same line
    assert str(newest) in line and "is damaged" in line
    out = tmp_path / "earlier.png"
    assert sample_cli.main([str(earlier), "--classes", "0", "--per-class", "1", "--steps", "1", "--out", str(out)]) == 0
    assert f"EMA weights from checkpoint {earlier}" in capsys.readouterr().out and out.stat().st_size > 0


def test_sample_run_dir_without_config(run, tmp_path, capsys):
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    (broken / "config.yaml").unlink()
    line = sample_fails(capsys, str(broken))
    assert str(broken / "config.yaml") in line


def test_sample_still_works(run, tmp_path, capsys):
    out = tmp_path / "ok.png"
    assert sample_cli.main([str(run), "--classes", "1", "--per-class", "1", "--steps", "1", "--out", str(out)]) == 0
    assert out.stat().st_size > 0


# ------------------------------------------------------------------------------------------ image folders


def _png_tree(root: Path, counts: dict[str, int]) -> list[Path]:
    import numpy as np
    from PIL import Image

    paths = []
    for cls, count in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            paths.append(root / cls / f"img{i:02d}.png")
            Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(paths[-1])
    return paths


FOLDER = ["data.source=folder", "data.channels=3", "data.num_classes=2", "data.num_workers=0"]


def test_folder_of_only_bad_images_is_one_line_before_training(tmp_path, capsys):
    paths = _png_tree(tmp_path / "images", {"a": 2, "b": 2})
    for p in paths:
        p.write_bytes(b"garbage")
    line = train_fails(capsys, *TINY, *FOLDER, f"data.root={tmp_path / 'images'}", f"run_dir={tmp_path / 'run'}",
                       "data.num_workers=2")
    assert f"first: {paths[0]}: UnidentifiedImageError" in line and "none of the 4 images" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_skipped_images_are_counted_in_metrics_and_the_summary(tmp_path, capsys):
    paths = _png_tree(tmp_path / "images", {"a": 4, "b": 4})
    paths[5].write_bytes(b"garbage")
    cfg = load_config(None, TINY + FOLDER + [f"data.root={tmp_path / 'images'}", f"run_dir={tmp_path / 'run'}",
                                             "total_images=32"])
    with pytest.warns(UserWarning, match="img01.png"):
        train(cfg)
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in rows] == [1, 1]
    out = capsys.readouterr().out
    assert f"skipped 1 unreadable image(s) under data.root={tmp_path / 'images'}" in out



def test_a_single_value_where_a_section_belongs_names_the_section(tmp_path):
    recipe = tmp_path / "scalar.yaml"
    recipe.write_text("model: dit\n")
    with pytest.raises(ConfigError, match=r"config section 'model' .* must be a mapping of keys"):
        load_config(str(recipe))


def test_a_shape_error_says_the_preset_filled_the_other_key():
    with pytest.raises(ConfigError, match=r"hidden_size \(1152\) must be divisible by model.num_heads \(5\); "
                                          r"model.preset=DiT-XL/2 fills"):
        load_config(None, ["model.preset=DiT-XL/2", "model.num_heads=5", "data.resolution=32"])


def test_sample_snapshot_whose_weights_do_not_fit_its_config(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    snap = ckpt.latest_snapshot(run)
    from safetensors import safe_open
    with safe_open(str(snap), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(snap))
    tensors.pop(next(k for k in tensors if k.startswith("blocks.1.")))       # a tensor of the config's network gone
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign), metadata=meta)
    line = sample_fails(capsys, str(foreign))
    assert str(foreign) in line and "its weights do not fit the network its config describes" in line
