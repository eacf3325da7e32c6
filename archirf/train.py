"""Entry point: `torchrun -m archirf.train --config configs/X.yaml key=value ...` (or `python -m`).

With no arguments it trains the default: a small class-conditional rectified-flow DiT on the
embedded handwritten-digits dataset, on whatever device is present.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .config import ConfigError, parse_cli, to_yaml


def _check_run_dir(run_dir: str) -> None:
    """Creates run_dir and proves it writable, so that a bad path fails before the model is built."""
    path = Path(run_dir)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ConfigError(f"run_dir={run_dir}: {existing} is a file, not a folder; choose another run_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        raise ConfigError(f"run_dir={run_dir} cannot be created or written ({err.strerror}{where}); "
                          f"choose a folder you can write to") from None


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, print_only = parse_cli(argv)
    except ConfigError as err:
        print(f"archirf.train: config error: {err}", file=sys.stderr)
        return 2
    if print_only:
        print(to_yaml(cfg), end="")
        return 0
    from .checkpoint import DiskFull
    from .data import DataError
    from .eval import DetectorError, EvalError
    from .trainer import NonFiniteLoss, train

    try:
        _check_run_dir(cfg.run_dir)
        train(cfg)
    except (ConfigError, DataError, DetectorError, EvalError) as err:
        print(f"archirf.train: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"archirf.train: {err}", file=sys.stderr)
        return 3
    except DiskFull as err:
        print(f"archirf.train: {err}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    from . import exit_now

    exit_now(main())
