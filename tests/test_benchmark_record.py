"""benchmarks/record.py turns pytest-benchmark JSON into the committed results: ratios, GB/s,
fraction of copy bandwidth and target verdicts computed right (CPU only, synthetic JSON)."""

import os
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("benchmarks_record", ROOT / "benchmarks" / "record.py")
record = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record)

GPU = "NVIDIA H100 80GB HBM3"
COPY_GBPS = 3000.0
BW_TARGET = {"metric": "copy_bw_fraction", "min": 0.85, "label": "≥ 85% of copy BW"}
RATIO_TARGET = {"metric": "vs_compiled_best", "min": 1.3, "label": "≥ 1.3× compiled"}


def bench(op, pass_, impl, median_ms, nbytes, targets=()):
    case = "dit-bf16"
    return {
        "group": f"{op} {pass_} {case}",
        "name": f"test_adaln[{case}-{op}-{pass_}-{impl}]",
        "fullname": f"benchmarks/bench_adaln.py::test_adaln[{case}-{op}-{pass_}-{impl}]",
        "stats": {"median": median_ms / 1e3, "min": median_ms / 1e3, "rounds": 3, "data": [median_ms / 1e3] * 3},
        "extra_info": {
            "suite": "adaln", "op": op, "pass": pass_, "case": case, "impl": impl,
            "shape": [64, 256, 1152], "dtype": "bfloat16", "mod_dtype": "bfloat16",
            "bytes": nbytes, "copy_gbps": COPY_GBPS, "first_call_s": 2.5, "host_us": 40.0,
            "targets": list(targets) if impl == "ours" else [], "env": {"gpu": GPU},
        },
    }


@pytest.fixture
def doc():
    fused, ada = "gated_residual_ada_layer_norm", "ada_layer_norm"
    return {
        "machine_info": {"archirf": {"gpu": GPU, "driver": "580.1", "cuda": "13.0", "torch": "2.11.0", "triton": "3.6.0",
                                     "copy_gbps": COPY_GBPS, "date": "2025-01-01T00:00:00+00:00", "rounds": 100,
                                     "baseline_notes": {"adaln": {"liger": ["liger-kernel not installed"]}}}},
        "datetime": "2025-01-01T00:00:00+00:00",
        "benchmarks": [
            # fused fwd+bwd: 2.4 GB in 1 ms = 2400 GB/s = 80% of copy; compiled 2 ms, max-autotune 1.6 ms, eager 4 ms
            bench(fused, "fwd+bwd", "ours", 1.0, 2_400_000_000, [RATIO_TARGET]),
            bench(fused, "fwd+bwd", "eager", 4.0, 2_400_000_000),
            bench(fused, "fwd+bwd", "compiled", 2.0, 2_400_000_000),
            bench(fused, "fwd+bwd", "compiled-max-autotune", 1.6, 2_400_000_000),
            # ada fwd: 1.35 GB in 0.5 ms = 2700 GB/s = 90% of copy (met); compiled faster than ours
            bench(ada, "fwd", "ours", 0.5, 1_350_000_000, [BW_TARGET]),
            bench(ada, "fwd", "eager", 1.0, 1_350_000_000),
            bench(ada, "fwd", "compiled", 0.4, 1_350_000_000),
            # ada fwd+bwd: 1.2× compiled, below the 1.3× target
            bench(ada, "fwd+bwd", "ours", 1.0, 1_000_000_000, [RATIO_TARGET]),
            bench(ada, "fwd+bwd", "compiled", 1.2, 1_000_000_000),
        ],
    }


def row(markdown: str, op: str, pass_: str) -> dict[str, str]:
    """The cells of the results-table row of (op, pass), keyed by the table's header."""
    lines = [line for line in markdown.splitlines() if line.startswith("| op | pass |")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(header) and cells[:2] == [f"`{op}`", pass_]:
            return dict(zip(header, cells))
    raise AssertionError(f"no row for {op} {pass_}")


def test_annotate_ratios(doc):
    record.annotate(doc)
    info = {tuple(b["extra_info"][k] for k in ("op", "pass", "impl")): b["extra_info"] for b in doc["benchmarks"]}
    ours = info["gated_residual_ada_layer_norm", "fwd+bwd", "ours"]
    assert ours["vs_eager"] == pytest.approx(4.0)
    assert ours["vs_compiled"] == pytest.approx(2.0)
    assert ours["vs_compiled-max-autotune"] == pytest.approx(1.6)
    assert ours["vs_compiled_best"] == pytest.approx(1.6)  # against the faster compile mode
    assert ours["gbps"] == pytest.approx(2400) and ours["copy_bw_fraction"] == pytest.approx(0.8)
    assert info["gated_residual_ada_layer_norm", "fwd+bwd", "eager"]["vs_ours"] == pytest.approx(0.25)
    assert info["ada_layer_norm", "fwd", "ours"]["vs_compiled_best"] == pytest.approx(0.8)


def test_table_cells(doc):
    md = record.render_suite("adaln", doc)
    fused = row(md, "gated_residual_ada_layer_norm", "fwd+bwd")
    assert (fused["ours ms"], fused["eager ms"], fused["compiled ms"], fused["max-autotune ms"]) == ("1", "4", "2", "1.6")
    assert (fused["ours GB/s"], fused["% of copy BW"]) == ("2400", "80.0%")
    assert (fused["vs compiled"], fused["vs eager"]) == ("1.60×", "4.00×")
    assert fused["shape (B×N×C)"] == "64×256×1152" and fused["dtype"] == "bf16"
    assert fused["target"] == "≥ 1.3× compiled: met"

    ada_fwd = row(md, "ada_layer_norm", "fwd")
    assert (ada_fwd["ours GB/s"], ada_fwd["% of copy BW"], ada_fwd["vs compiled"]) == ("2700", "90.0%", "0.80×")
    assert ada_fwd["max-autotune ms"] == "—" and ada_fwd["target"] == "≥ 85% of copy BW: met"
    ada = row(md, "ada_layer_norm", "fwd+bwd")
    assert ada["vs compiled"] == "1.20×" and ada["eager ms"] == "—" and ada["vs eager"] == "—"
    assert ada["target"] == "≥ 1.3× compiled: **missed**"
    assert "### Targets (2 of 3 met)" in md
    assert "liger: liger-kernel not installed" in md


def test_record_from_json_writes_results(doc, tmp_path):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(doc))
    assert record.main(["--from-json", str(src), "--out", str(tmp_path / "results")]) == 0
    folder = tmp_path / "results" / "nvidia-h100-80gb-hbm3"
    readme = (folder / "README.md").read_text()
    assert readme.startswith(f"# Benchmark results: {GPU}") and "3000 GB/s" in readme and "580.1 / 13.0" in readme
    assert row(readme, "gated_residual_ada_layer_norm", "fwd+bwd")["vs compiled"] == "1.60×"
    saved = json.loads((folder / "adaln.json").read_text())
    assert len(saved["benchmarks"]) == len(doc["benchmarks"])
    assert all("data" not in b["stats"] and "env" not in b["extra_info"] for b in saved["benchmarks"])
    # Re-rendering the committed JSON alone gives the same table.
    assert record.render_readme({"adaln": saved}) == readme


def test_nothing_to_record(tmp_path):
    src = tmp_path / "empty.json"
    src.write_text(json.dumps({"benchmarks": []}))
    assert record.main(["--from-json", str(src), "--out", str(tmp_path)]) == 1
    assert record.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_training_step_suite_reports_img_per_s_and_mfu():
    # bench_models.py: a round is one training step of `images` images worth `flops` FLOPs.
    def step(impl, median_ms, targets=()):
        b = bench("mmdit-xl2", "train step", impl, median_ms, 0, targets)
        b["extra_info"].update(suite="models", case="mmdit-xl2", shape=[64, 4, 32, 32], shape_label="B×C×H×W",
                               images=64, flops=64 * 6 * 120e9, peak_tflops=770.0)
        return b
    mfu_target = {"metric": "mfu", "min": 0.6, "label": "≥ 60% MFU"}
    doc = {"machine_info": {"archirf": {"gpu": GPU, "date": "2025-01-01T00:00:00+00:00"}},
           "benchmarks": [step("ours", 100.0, [RATIO_TARGET, mfu_target]), step("compiled", 150.0), step("eager", 300.0)]}
    record.annotate(doc)
    ours = doc["benchmarks"][0]["extra_info"]
    assert ours["img_per_s"] == pytest.approx(640) and ours["tflops"] == pytest.approx(460.8)
    assert ours["mfu"] == pytest.approx(460.8 / 770) and ours["vs_compiled_best"] == pytest.approx(1.5)
    md = record.render_suite("models", doc)
    assert "ours 640 img/s (59.8% MFU), compiled 427 img/s (39.9% MFU), eager 213 img/s (19.9% MFU)" in md
    assert "≥ 60% MFU — **missed** (59.8%)" in md and "≥ 1.3× compiled — met (1.50×)" in md


def test_a_named_suite_is_collected_once(tmp_path):
    # `python -m benchmarks.record --suite models` names the file; pytest collected it itself and through
    # the suites' collection hook, so every benchmark ran twice.
    cmd = record.pytest_command(["models"], tmp_path / "out.json", ["--collect-only", "-q", "-p", "no:cacheprovider"])
    # not as an xdist worker: pytest-benchmark reads PYTEST_XDIST_WORKER and then refuses --benchmark-only
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert out.returncode == 0 and ids, out.stdout + out.stderr
    assert len(ids) == len(set(ids)), f"{len(ids)} items collected for {len(set(ids))} benchmarks"


def models_step(impl, median_ms, first_call_s):
    b = bench("dit-xl2", "train step", impl, median_ms, 0)
    b["extra_info"].update(suite="models", case="dit-xl2", first_call_s=first_call_s, warmup_rounds=3)
    b["stats"]["rounds"] = 20
    return b


def test_a_benchmark_recorded_twice_shows_its_cold_first_call():
    # A suite collected twice recorded each benchmark twice: the repeat's "first call" found everything
    # compiled, so the first-call column takes the first run's; the times are the later run's.
    doc = {"machine_info": {"archirf": {"gpu": GPU, "rounds": 100, "warmup_rounds": 5}},
           "benchmarks": [models_step("ours", 100.0, 30.0), models_step("compiled", 150.0, 20.0),
                          models_step("ours", 90.0, 1.5), models_step("compiled", 140.0, 1.2)]}
    md = record.render_suite("models", doc)
    first = [line for line in md.splitlines() if line.startswith("| `dit-xl2` |")]
    assert [line.split("|")[4].strip() for line in first[-2:]] == ["30.00", "20.00"], md
    step = row(md, "dit-xl2", "train step")
    assert (step["ours ms"], step["vs compiled"], step["shape (B×N×C)"], step["dtype"]) == ("90", "1.56×", "64×256×1152", "bf16")
    assert "ours GB/s" not in step  # a training step counts no bytes moved
    assert len(first) == 3  # one results row, one first-call row per implementation
    assert "2 benchmarks were recorded twice" in md


def test_header_gives_the_rounds_the_suite_ran():
    # bench_models.py runs 20 rounds after 3 warm-up rounds where the session default is 100 after 5.
    doc = {"machine_info": {"archirf": {"gpu": GPU, "rounds": 100, "warmup_rounds": 5}},
           "benchmarks": [models_step("ours", 100.0, 30.0), models_step("compiled", 150.0, 20.0)]}
    assert "median of 20 rounds after 3 warm-up rounds." in record.render_suite("models", doc)
