"""GPU benchmark suites (pytest-benchmark): `pytest benchmarks --benchmark-only`.

Suites are `bench_<suite>.py` files (collected by benchmarks/conftest.py); `python -m benchmarks.record`
runs them and regenerates the committed results in benchmarks/results/<gpu>/.
"""
