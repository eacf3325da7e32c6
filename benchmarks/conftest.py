"""pytest hooks and fixtures of the benchmark suites; the timing method is in benchmarks/harness.py.

Collects bench_<suite>.py files, installs the CUDA-event timer on every benchmark, skips `cuda`-marked
benchmarks with the reason where no GPU is usable, and adds the environment and the ratios between
implementations to pytest-benchmark's JSON and the terminal summary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from . import record
from .harness import BUDGET_S, SESSION, Bench, cuda_event_timer, skip_reason

HERE = Path(__file__).resolve().parent


# -- collection -----------------------------------------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped with the reason elsewhere")


def pytest_collect_file(file_path, parent):
    """Suites are bench_<suite>.py (pytest would only collect test_*.py). A file named on the command
    line pytest collects itself: collecting it here too would run every benchmark twice."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue
        marker = item.get_closest_marker("benchmark")
        options = dict(marker.kwargs) if marker else {}
        options.setdefault("timer", cuda_event_timer)
        options.setdefault("disable_gc", True)
        item.add_marker(pytest.mark.benchmark(**options))


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") and (reason := skip_reason()):
        pytest.skip(reason)
    if HERE in Path(item.path).resolve().parents and SESSION.out_of_budget():
        pytest.skip(f"ARCHIRF_BENCH_BUDGET_S={BUDGET_S:g} s spent")


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def device() -> torch.device:
    if reason := skip_reason():
        pytest.skip(reason)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    SESSION.start(dev)
    return dev


@pytest.fixture
def bench(benchmark, device) -> Bench:
    return Bench(benchmark, device)


# -- reporting ------------------------------------------------------------------------------------


def _archirf_info() -> dict:
    if not SESSION.env:
        return {}
    return dict(SESSION.env, baseline_notes=SESSION.baseline_notes, budget_skipped=SESSION.budget_skipped)


def pytest_benchmark_update_machine_info(config, machine_info):
    if SESSION.env:
        machine_info["archirf"] = _archirf_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    record.annotate(output_json)  # vs_<impl> ratios between implementations of the same case


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if not SESSION.rows:
        return
    doc = {"machine_info": {"archirf": _archirf_info()}, "benchmarks": SESSION.rows}
    record.annotate(doc)
    terminalreporter.write_sep("=", "archirf benchmark summary (benchmarks/record.py renders the same)")
    for suite in sorted({record.suite_of(r) for r in SESSION.rows}):
        terminalreporter.write_line(record.render_suite(suite, doc))
