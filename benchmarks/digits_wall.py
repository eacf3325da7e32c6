"""A training job's wall time from a cold start, and where its first seconds go: each named run is the real entry
point, `torchrun --nproc_per_node=1 -m archirf.train run_dir=<new> [overrides]`, with its own empty
TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR, one after the other.

    python -m benchmarks.digits_wall --out DIR/digits_wall.jsonl \
        --run "default" --run "plain model.kernels=reference model.attn_impl=sdpa optim.fused_update=false" \
        [--command N] [--logs] [--work DIR] [--standalone] [--timeout S] [key=value ...]

--run "LABEL [key=value ...]": a run's label, then its own overrides (default: one run, "default", none); the
trailing key=value overrides go to every run (the default digits job when there are none). The run's stdout and
stderr are read as one stream, in chunks as they come, and split into lines at both \\n and \\r (the progress bar
redraws itself with \\r); each line is stamped with the seconds since the command started (PYTHONUNBUFFERED=1: a
line's time is when it was printed). From them:
  wall            the command's start to its exit, as a shell measures it
  first line      the first output: imports, the config, the data and the network built
  -> progress bar the first progress-bar line showing images done: the first steps (a CUDA graph's capture and
                  warm-up, Triton's and inductor's compilation from the empty caches) up to the first log line
  loop to "done"  from there to "archirf: done" (the steps, sample grids, checkpoints, final pictures)
  "done" -> exit  to the end of the output (the process's exit, its teardown)
  steady rate     the progress bar's last img_s (metrics.jsonl's last img_per_s: the last log window's rate)
  final loss      the progress bar's last loss (the last log window's mean)
Writes one jsonl row per run (appended to --out, with the GPU, the torch and triton versions and the commit) and
prints the table; --logs keeps each run's stamped lines beside --out as <stem>_<label>.log. Each run is its own
process group: --timeout S kills it after S seconds (the row's timed_out), and an interrupt, SIGTERM or error kills
it before its folder is removed, so no job outlives the tool on the GPU.
"""

from __future__ import annotations

import argparse
import codecs
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
# tqdm's bar: "  4%|▍         | 5.12k/128k [00:01<00:20, 4.3kimg/s, img_s=43,663, loss=0.1389, lr=1.00e-03]"
BAR = re.compile(r"\|\s*([\d.]+)([kMGT]?)/[\d.]+[kMGT]?\s*\[")
IMG_S = re.compile(r"img_s=([\d,]+)")
LOSS = re.compile(r"loss=(nan|[-+\d.eE]+)")
DONE = "archirf: done"


def stamped_lines(chunks: Iterable[tuple[float, bytes]]) -> list[tuple[float, str]]:
    """(seconds, bytes read then) chunks -> (seconds, line): lines end at \\n or \\r, each stamped with the time
    of the chunk that ended it; blank ones dropped. Decoded incrementally (a chunk may split a character)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    lines, buf, t = [], "", 0.0
    for t, chunk in chunks:
        parts = re.split(r"[\r\n]", buf + decoder.decode(chunk))
        buf = parts.pop()
        lines += [(t, p) for p in parts if p.strip()]
    buf += decoder.decode(b"", final=True)
    if buf.strip():
        lines.append((t, buf))
    return lines


def derive(lines: list[tuple[float, str]], exit_s: float, wall_s: float) -> dict:
    """The row's timings (seconds since the start) and the last progress bar's rate and loss; None where the
    output lacked the line."""
    bars = [(t, line) for t, line in lines if BAR.search(line)]
    moving = [t for t, line in bars if float(BAR.search(line).group(1)) > 0]
    done = [t for t, line in lines if DONE in line]     # (stdout may follow a bar redraw on its line)
    rates = [IMG_S.search(line) for _, line in bars if IMG_S.search(line)]
    losses = [LOSS.search(line) for _, line in bars if LOSS.search(line)]
    loss = losses[-1].group(1) if losses else None
    return {"wall_s": round(wall_s, 2), "first_line_s": round(lines[0][0], 2) if lines else None,
            "progress_bar_s": round(moving[0], 2) if moving else None,
            "done_s": round(done[0], 2) if done else None, "exit_s": round(exit_s, 2),
            "steady_img_per_s": int(rates[-1].group(1).replace(",", "")) if rates else None,
            "final_loss": None if loss in (None, "nan") else float(loss)}


def run_env(work: Path, label: str) -> dict:
    """The run's environment: its own compile caches (the folders `run_one` makes empty) and unbuffered output."""
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor_{label}"),
            "TRITON_CACHE_DIR": str(work / f"triton_{label}"), "PYTHONUNBUFFERED": "1"}


def run_one(label: str, overrides: list[str], work: Path, standalone: bool,
            timeout: Optional[float] = None) -> tuple[dict, list[tuple[float, str]]]:
    """One cold run: fresh run_dir and empty compile caches; -> (its derived fields, rc and timed_out, its stamped
    lines). The job is a new session: after `timeout` seconds, or on any exception here (SIGTERM included, see
    main), its whole process group (torchrun and its workers) is killed."""
    run_dir, inductor, triton = (work / f"{kind}_{label}" for kind in ("run", "inductor", "triton"))
    for d in (run_dir, inductor, triton):
        shutil.rmtree(d, ignore_errors=True)
    inductor.mkdir(parents=True)
    triton.mkdir(parents=True)
    env = run_env(work, label)
    cmd = [sys.executable, "-m", "torch.distributed.run", *(["--standalone"] if standalone else []),
           "--nproc_per_node=1", "-m", "archirf.train", f"run_dir={run_dir}", *overrides]
    chunks = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)
    timed_out = threading.Event()

    def kill():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, lambda: (timed_out.set(), kill())) if timeout else None
    try:
        if timer:
            timer.start()
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            chunks.append((time.perf_counter() - t0, chunk))
        exit_s = time.perf_counter() - t0     # the stream's end: the last process holding it has exited
        rc = proc.wait()
        wall_s = time.perf_counter() - t0
    except BaseException:
        kill()
        proc.wait()
        raise
    finally:
        if timer:
            timer.cancel()
        proc.stdout.close()
    lines = stamped_lines(chunks)
    return {**derive(lines, exit_s, wall_s), "rc": rc, "timed_out": timed_out.is_set()}, lines


def environment() -> dict:
    """The GPU (None on a CPU), the torch and triton versions, the commit (+ "-dirty" with uncommitted changes).
    Called after the runs: CUDA initialised here would hold memory beside them."""
    import torch

    def version(pkg: str) -> Optional[str]:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or None
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "triton": version("triton"), "commit": commit}


def table(rows: list[dict]) -> str:
    """The results page's table (markdown), the spans between the stamped points."""
    def s(v, unit=" s"):
        return "—" if v is None else f"{v:.1f}{unit}"

    def span(a, b):
        return None if a is None or b is None else b - a

    out = ["| command | run (overrides) | wall | first line | first line -> progress bar | loop to \"done\" | "
           "\"done\" -> exit | steady rate | final loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = "—" if r["steady_img_per_s"] is None else f"{r['steady_img_per_s'] / 1e3:.1f}k img/s"
        loss = "—" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        out.append(f"| {r['command']} | {r['run']} (`{r['overrides']}`) | {s(r['wall_s'])} | {s(r['first_line_s'])} | "
                   f"{s(span(r['first_line_s'], r['progress_bar_s']))} | {s(span(r['progress_bar_s'], r['done_s']))} | "
                   f"{s(span(r['done_s'], r['exit_s']))} | {rate} | {loss} |")
    return "\n".join(out)


def parse_run(spec: str) -> tuple[str, list[str]]:
    """"LABEL [key=value ...]" -> (label, overrides)."""
    label, *overrides = spec.split() or [""]
    if "=" in label or not re.fullmatch(r"[\w.-]+", label):
        raise SystemExit(f"--run {spec!r}: start with a label (letters, digits, _ . -), then its key=value "
                         f"overrides, e.g. --run \"plain model.kernels=reference\"")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"--run {spec!r}: {bad[0]!r} is not a key=value override")
    return label, overrides


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the jsonl the rows are appended to")
    ap.add_argument("--run", action="append", default=None, help='"LABEL [key=value ...]"; repeat for more runs')
    ap.add_argument("--command", type=int, default=1, help="this invocation's number in the results (the table's "
                                                           "first column)")
    ap.add_argument("--work", default=None, help="run dirs and caches go here (default: a temporary folder, "
                                                 "removed at the end)")
    ap.add_argument("--logs", action="store_true", help="keep each run's stamped lines as <out stem>_<label>.log")
    ap.add_argument("--standalone", action="store_true", help="torchrun --standalone: a free rendezvous port "
                                                              "(several jobs on one host)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds a run may take; then its process group "
                                                                   "is killed (timed_out in its row)")
    ap.add_argument("overrides", nargs="*", help="key=value for every run")
    args = ap.parse_args(argv)
    runs = [parse_run(spec) for spec in args.run or ["default"]]
    if len({label for label, _ in runs}) != len(runs):
        raise SystemExit("--run names a label twice: each run gets its own run dir and caches by its label")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="digits_wall_"))
    job = " ".join(["torchrun", *(["--standalone"] if args.standalone else []), "--nproc_per_node=1 -m archirf.train",
                    *(args.overrides or ["(defaults)"])])
    rows = []
    # SIGTERM (e.g. from `timeout`) raises here, so run_one kills the job and the folder goes after it
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        for label, overrides in runs:
            fields, lines = run_one(label, [*args.overrides, *overrides], work, args.standalone, args.timeout)
            if args.logs:
                (out.parent / f"{out.stem}_{label}.log").write_text("".join(f"{t:7.2f} {line}\n" for t, line in lines))
            if fields["rc"] != 0:
                tail = "\n".join(line for _, line in lines[-15:])
                why = " (killed at --timeout)" if fields["timed_out"] else ""
                print(f"digits_wall: run {label} exited with {fields['rc']}{why}; its last lines:\n{tail}",
                      file=sys.stderr)
            rows.append({"run": label, "command": args.command, "overrides": " ".join(overrides) or "default",
                         **fields, "inductor_cache": "empty", "triton_cache": "empty", "job": job})
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    env = environment()
    with open(out, "a") as f:
        for row in rows:
            row.update(env)
            f.write(json.dumps(row) + "\n")
    print(table(rows))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
