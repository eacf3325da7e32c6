"""Timing machinery of the benchmark suites (`pytest benchmarks --benchmark-only`, pytest-benchmark).

How a number is measured (so that what pytest-benchmark reports is GPU time, properly synchronised):

* Every benchmark here gets our timer through pytest-benchmark's public `benchmark(timer=...)`
  marker. `cuda_event_timer()` does not read a host clock: it records a CUDA event on the current
  stream and returns a stamp; pytest-benchmark computes a round as `end - start`, and subtracting
  two stamps synchronises on the later event and returns the GPU time between them. With
  `pedantic(iterations=1)` a round is exactly one call's GPU time, whatever the host does.
* pedantic's `setup` runs before each round, outside the timed region. It runs the suite's
  `prepare` if any (for a backward-only timing: a fresh forward, whose graph the round consumes, as
  in training; torch.compile's backward refuses `retain_graph=True`), then (1) flushes the L2 cache by
  zeroing a 256 MB buffer, as triton.testing.do_bench does, so inputs come from HBM and not from the
  50 MB L2 that would hold most of a 38 MB activation; and (2) queues a GPU sleep longer than the
  host needs to issue the call (measured first), so all the call's kernels are queued before the
  start event fires: a round times the kernels back to back, not Python or launch overhead, which is
  reported on its own as `host_us`. Without the sleep, eager baselines of many small kernels would be
  charged the host's launch gaps, inflating our ratios.
* Warm-up rounds are run and dropped. The first call (torch.compile, Triton JIT and autotuning) is
  made by the suite before any round and reported separately as `first_call_s`.
* The statistic everywhere is the median (as do_bench). GB/s = the minimal bytes the op must move
  (computed by the suite) / median time, also as a fraction of this GPU's device-to-device copy
  bandwidth, measured once per session with the same method (`y.copy_(x)`, 512 MiB each way).

extra_info of each benchmark: suite, op, pass, case, impl, shape, dtype, bytes, GB/s, copy-BW
fraction, first-call and host times, the environment (GPU, driver, CUDA, torch, triton), and,
added when the JSON is written (pytest_benchmark_update_json), `vs_<impl>` ratios against every
other implementation of the same case. On a machine without CUDA every benchmark is collected and
skipped with the reason. ARCHIRF_BENCH_SMOKE=1 runs the suites on CPU (tiny shapes, wall clock) to
check the harness itself; ARCHIRF_BENCH_ROUNDS / ARCHIRF_BENCH_WARMUP set the round counts;
ARCHIRF_BENCH_BUDGET_S skips what remains once that many seconds are spent.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time

import pytest
import torch

SMOKE = os.environ.get("ARCHIRF_BENCH_SMOKE") == "1"
ROUNDS = int(os.environ.get("ARCHIRF_BENCH_ROUNDS", "3" if SMOKE else "100"))
WARMUP_ROUNDS = int(os.environ.get("ARCHIRF_BENCH_WARMUP", "1" if SMOKE else "5"))
# Optional wall-clock budget for the session (seconds): once spent, the remaining benchmarks skip
# (counted in the results), so a run under a hard time limit still writes what it measured.
BUDGET_S = float(os.environ.get("ARCHIRF_BENCH_BUDGET_S") or 0)
L2_FLUSH_BYTES = 256 * 1024 * 1024  # well above any L2 (H100: 50 MB); do_bench uses 256 MB too
COPY_BYTES = 512 * 1024 * 1024  # per buffer for the copy-bandwidth measurement
TIMING = (
    "median GPU time per call between CUDA events; L2 flushed and the launch queued behind a GPU "
    "sleep before each round; warm-up and first (compile) call excluded"
)


def skip_reason() -> str | None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set (tests/conftest.py sets it): run benchmarks in their own pytest"
    if torch.cuda.is_available() or SMOKE:
        return None
    return "needs a CUDA GPU (ARCHIRF_BENCH_SMOKE=1 dry-runs the harness on CPU)"


# -- timing ---------------------------------------------------------------------------------------


class _GpuStamp:
    """A point on the current stream's timeline; `later - earlier` = GPU seconds in between."""

    __slots__ = ("event",)

    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, earlier: _GpuStamp) -> float:
        self.event.synchronize()  # note: host sync, after the timed call, once per round
        return earlier.event.elapsed_time(self.event) / 1e3


def cuda_event_timer():
    """pytest-benchmark timer: GPU-side stamps on CUDA; wall clock on CPU (smoke runs)."""
    return _GpuStamp() if torch.cuda.is_available() else time.perf_counter()


class _Session:
    """Per-session state: environment, L2-flush buffer, sleep calibration, copy bandwidth."""

    def __init__(self):
        self.device: torch.device | None = None
        self.env: dict = {}
        self.flush_buffer: torch.Tensor | None = None
        self.cycles_per_s: float | None = None
        self.copy_gbps: float | None = None
        self.rows: list[dict] = []  # what the terminal summary renders
        self.baseline_notes: dict[str, dict[str, list[str]]] = {}
        self.started = time.monotonic()
        self.budget_skipped = 0

    def out_of_budget(self) -> bool:
        if BUDGET_S and time.monotonic() - self.started > BUDGET_S:
            self.budget_skipped += 1
            return True
        return False

    @property
    def cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def start(self, device: torch.device):
        if self.device is not None:
            return
        self.device = device
        self.env = environment(device)
        if self.cuda:
            self.flush_buffer = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
            self.cycles_per_s = _sleep_rate() if hasattr(torch.cuda, "_sleep") else None
        self.copy_gbps = self._copy_bandwidth()
        self.env["copy_gbps"] = self.copy_gbps

    def round_setup(self, host_s: float, prepare=None):
        """pedantic's setup: run `prepare` (e.g. the forward whose backward is timed), flush L2,
        then keep the GPU busy while the host issues the timed call."""
        cycles = 0
        if self.cuda and self.cycles_per_s:
            cycles = int(min(1.5 * host_s + 50e-6, 0.05) * self.cycles_per_s)
        if not self.cuda and prepare is None:
            return None

        def setup():
            args = prepare() if prepare is not None else None
            if self.cuda:
                self.flush_buffer.zero_()
                if cycles:
                    torch.cuda._sleep(cycles)
            return None if args is None else (tuple(args), {})

        return setup

    def gpu_times(self, fn, rounds: int, warmup: int = 3) -> list[float]:
        """Seconds per call, same method as the benchmarks, outside pytest-benchmark."""
        host_s = host_time(fn)
        setup = self.round_setup(host_s)
        times = []
        for i in range(warmup + rounds):
            if setup:
                setup()
            start = cuda_event_timer()
            fn()
            dt = cuda_event_timer() - start
            if i >= warmup:
                times.append(dt)
        return times

    def _copy_bandwidth(self) -> float:
        n = COPY_BYTES // 2 if self.cuda else 1 << 22
        src = torch.randn(n, device=self.device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        t = statistics.median(self.gpu_times(lambda: dst.copy_(src), rounds=20 if self.cuda else 3))
        return 2 * src.nbytes / t / 1e9


SESSION = _Session()


def _sleep_rate() -> float:
    """GPU clock cycles per second of torch.cuda._sleep, to size the pre-round sleep."""
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def host_time(fn, prepare=None, reps: int = 10) -> float:
    """Median host seconds to issue one call (GPU idle before each: nothing queued ahead)."""
    times = []
    for _ in range(reps):
        args = prepare() if prepare is not None else ()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # note: host sync, outside the measured span
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return statistics.median(times)


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    env = {
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rounds": ROUNDS,
        "warmup_rounds": WARMUP_ROUNDS,
        "timing": TIMING if device.type == "cuda" else "wall clock (CPU smoke run)",
        "smoke": SMOKE,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(
            gpu=p.name,
            sm_count=p.multi_processor_count,
            capability=f"sm_{p.major}{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            driver=_driver_version(),
        )
    else:
        env.update(gpu=f"cpu {platform.processor() or platform.machine()}".strip(), cuda=None, driver=None)
    return env


# -- what suites call -----------------------------------------------------------------------------


class Bench:
    """What a suite calls: `bench.run(fn, bytes_moved=..., info={...}, prepare=None)` times `fn`
    with pytest-benchmark and fills extra_info. `bench.benchmark` is the pytest-benchmark fixture."""

    def __init__(self, benchmark, device: torch.device):
        self.benchmark = benchmark
        self.device = device

    def run(self, fn, *, bytes_moved: int, info: dict, prepare=None, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS):
        """Time `fn(*prepare())` (or `fn()`); `prepare` runs before each round, untimed."""
        host_s = host_time(fn, prepare)  # also a few more warm-up calls
        self.benchmark.pedantic(
            fn, setup=SESSION.round_setup(host_s, prepare), rounds=rounds, warmup_rounds=warmup_rounds, iterations=1
        )
        extra = self.benchmark.extra_info
        extra.update(info)
        extra.update(bytes=int(bytes_moved), host_us=host_s * 1e6, copy_gbps=SESSION.copy_gbps, env=SESSION.env,
                     warmup_rounds=warmup_rounds)
        stats = getattr(self.benchmark.stats, "stats", None)  # None under --benchmark-disable
        if stats is not None:
            t = stats.median
            extra.update(median_ms=t * 1e3, gbps=bytes_moved / t / 1e9)
            if SESSION.copy_gbps:
                extra["copy_bw_fraction"] = extra["gbps"] / SESSION.copy_gbps
            SESSION.rows.append({"name": self.benchmark.name, "extra_info": extra, "stats": {"median": t, "rounds": rounds}})


def note_baseline(suite: str, impl: str, reason: str):
    """Record why a baseline did not run (shown under the suite's results table), then skip."""
    reasons = SESSION.baseline_notes.setdefault(suite, {}).setdefault(impl, [])
    if reason not in reasons:
        reasons.append(reason)
    pytest.skip(f"{impl}: {reason}")




# -- shared by the op suites --------------------------------------------------------------------------

def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()  # note: host sync (setup only)


def pass_target(pass_: str, fn, inputs, grads):
    """(target, prepare) for Bench.run timing `pass_` ("fwd", "bwd" or "fwd_bwd") of fn(*inputs) with
    output gradients `grads`. "bwd" builds a fresh graph before each round, untimed (prepare); the
    round runs its backward."""
    if pass_ == "fwd":
        return (lambda: fn(*inputs)), None
    if pass_ == "bwd":
        return (lambda outs: torch.autograd.grad(outs, inputs, grads)), (lambda: (as_tuple(fn(*inputs)),))
    return (lambda: torch.autograd.grad(as_tuple(fn(*inputs)), inputs, grads)), None


def fwd_bwd_once(fn, inputs, grads):
    """(seconds, outputs, input gradients) of one synchronised fwd+bwd: a first call's compile / JIT /
    autotune time, and what the suites check against their references."""
    sync = torch.cuda.synchronize if inputs[0].is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    outs = as_tuple(fn(*inputs))
    dins = torch.autograd.grad(outs, inputs, grads)
    sync()
    return time.perf_counter() - t0, outs, dins
