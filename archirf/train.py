"""Entry point: `torchrun -m archirf.train --config configs/X.yaml key=value ...` (or `python -m`).

With no arguments it trains the default: a small class-conditional rectified-flow DiT on the
embedded handwritten-digits dataset, on whatever device is present.
"""

from __future__ import annotations

import sys

from .config import ConfigError, parse_cli, to_yaml


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
    from .trainer import NonFiniteLoss, train

    try:
        train(cfg)
    except (ConfigError, DataError) as err:
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
    raise SystemExit(main())
