"""Regenerate the committed benchmark results: one JSON per suite and a markdown table per GPU.

The one command (repository root, on the GPU machine):

    python -m benchmarks.record

runs `python -m pytest benchmarks --benchmark-only --benchmark-json=<tmp>` and writes
benchmarks/results/<gpu-slug>/<suite>.json (pytest-benchmark's JSON for that suite, per-round
samples dropped) and benchmarks/results/<gpu-slug>/README.md, which re-renders every suite JSON in
that folder, so one suite can be re-run alone. Variants:

    python -m benchmarks.record --suite adaln               # only benchmarks/bench_adaln.py
    python -m benchmarks.record --out "$OUT/results"        # write under another root
    python -m benchmarks.record -- -k "dit-bf16 and ours"   # extra pytest arguments after --
    python -m benchmarks.record --from-json FILE [--print]  # re-render an existing JSON (no GPU)

Exit status: pytest's (results are still written when some benchmarks failed), or 1 when no
benchmark ran (no CUDA GPU: everything skips). Standard library only, so rendering runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMPL_ORDER = ("ours", "eager", "compiled", "compiled-max-autotune", "liger", "apex")
PASS_LABEL = {"fwd_bwd": "fwd+bwd"}
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


# -- reading pytest-benchmark JSON ------------------------------------------------------------------


def _recorded(doc: dict) -> list[dict]:
    return [b for b in doc.get("benchmarks", []) if {"op", "pass", "impl", "case"} <= set(b.get("extra_info", {}))]


def _impl_key(e: dict) -> tuple:
    return *_key(e), e["extra_info"]["impl"]


def entries(doc: dict) -> list[dict]:
    """The benchmarks of `doc` written by this harness (their extra_info names op, pass, impl), each
    once: of a benchmark recorded twice (its suite collected twice) the later run."""
    return list({_impl_key(e): e for e in _recorded(doc)}.values())


def cold_first_calls(doc: dict) -> dict[tuple, float | None]:
    """first_call_s of each benchmark's first run: a repeat's first call found everything compiled."""
    cold: dict[tuple, float | None] = {}
    for e in _recorded(doc):
        cold.setdefault(_impl_key(e), e["extra_info"].get("first_call_s"))
    return cold


def repeats(doc: dict, suite: str) -> int:
    """How many of `suite`'s recorded benchmarks repeat an earlier one (left out by `entries`)."""
    def count(items):
        return sum(suite_of(e) == suite for e in items)
    return count(_recorded(doc)) - count(entries(doc))


def suite_of(entry: dict) -> str:
    suite = entry.get("extra_info", {}).get("suite")
    if suite:
        return suite
    m = re.search(r"bench_(\w+)\.py", entry.get("fullname", ""))
    return m.group(1) if m else "misc"


def median_s(entry: dict) -> float | None:
    return (entry.get("stats") or {}).get("median")


def environment(doc: dict) -> dict:
    env = dict(doc.get("machine_info", {}).get("archirf") or {})
    if not env:  # fall back to the copy each benchmark carries
        for e in entries(doc):
            env = dict(e["extra_info"].get("env") or {}, copy_gbps=e["extra_info"].get("copy_gbps"))
            break
    return env


def gpu_slug(doc_or_name: dict | str) -> str:
    name = doc_or_name if isinstance(doc_or_name, str) else environment(doc_or_name).get("gpu") or "unknown-gpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def _key(e: dict) -> tuple:
    i = e["extra_info"]
    return suite_of(e), i["case"], i["op"], i["pass"]


def _groups(items: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(suite, case, op, pass) -> {impl: entry}, in first-seen order."""
    groups: dict[tuple, dict[str, dict]] = {}
    for e in items:
        groups.setdefault(_key(e), {})[e["extra_info"]["impl"]] = e
    return groups


def annotate(doc: dict) -> dict:
    """Add to every entry's extra_info: median_ms, gbps, copy_bw_fraction and `vs_<impl>` =
    that impl's median / this entry's (> 1: this entry is faster), plus `vs_compiled_best`
    against the fastest torch.compile mode measured. Idempotent; returns `doc`."""
    for group in _groups(entries(doc)).values():
        medians = {impl: median_s(e) for impl, e in group.items() if median_s(e)}
        for impl, e in group.items():
            info, t = e["extra_info"], medians.get(impl)
            if not t:
                continue
            info["median_ms"] = t * 1e3
            if info.get("bytes"):
                info["gbps"] = info["bytes"] / t / 1e9
                if info.get("copy_gbps"):
                    info["copy_bw_fraction"] = info["gbps"] / info["copy_gbps"]
            for other, t_other in medians.items():
                if other != impl:
                    info[f"vs_{other}"] = t_other / t
            compiled = [t_o for o, t_o in medians.items() if o.startswith("compiled") and o != impl]
            if compiled:
                info["vs_compiled_best"] = min(compiled) / t
            # families of baselines (e.g. attention's eager-<SDPA backend>, sdpa-<backend>): the best of each
            for family in ("eager", "sdpa"):
                times = [t_o for o, t_o in medians.items() if o != impl and (o == family or o.startswith(family + "-"))]
                if times:
                    info[f"vs_{family}_best"] = min(times) / t
            if info.get("flops"):
                info["tflops"] = info["flops"] / t / 1e12
                if info.get("peak_tflops"):  # suites that time whole training steps (bench_models.py)
                    info["mfu"] = info["tflops"] / info["peak_tflops"]
            if info.get("images"):
                info["img_per_s"] = info["images"] / t
    return doc


def evaluate_targets(entry: dict) -> list[tuple[str, float | None, bool | None]]:
    """[(label, value, met)] for the targets the suite attached to this entry; met is None when
    the metric could not be computed (e.g. the baseline did not run)."""
    out = []
    for t in entry["extra_info"].get("targets") or []:
        value = entry["extra_info"].get(t["metric"])
        out.append((t["label"], value, None if value is None else value >= t["min"]))
    return out


# -- rendering ------------------------------------------------------------------------------------


def _ms(e: dict | None) -> str:
    t = median_s(e) if e else None
    return f"{t * 1e3:.4g}" if t else "—"


def _span(values: list) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def _ratio(v: float | None) -> str:
    return f"{v:.2f}×" if v else "—"


def _dtype_label(info: dict) -> str:
    act = SHORT_DTYPE.get(info.get("dtype", ""), info.get("dtype", "?"))
    mod = SHORT_DTYPE.get(info.get("mod_dtype") or "", info.get("mod_dtype"))
    return f"{act} / {mod} mod" if mod and mod != act else act


def _shape_label(info: dict) -> str:
    return "×".join(str(s) for s in info.get("shape", [])) or "?"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _target_cell(e: dict | None) -> str:
    if not e:
        return ""
    cells = []
    for label, _, met in evaluate_targets(e):
        cells.append(f"{label}: " + ("n/a" if met is None else "met" if met else "**missed**"))
    return "; ".join(cells)


def render_suite(suite: str, doc: dict) -> str:
    """Markdown for one suite: the ratio table, the target summary, first-call and host times."""
    annotate(doc)
    items = [e for e in entries(doc) if suite_of(e) == suite]
    groups = _groups(items)
    present = {impl for g in groups.values() for impl in g}
    extra = [i for i in IMPL_ORDER[3:] if i in present] + sorted(present - set(IMPL_ORDER))
    env = environment(doc)

    shape_label = next((e["extra_info"]["shape_label"] for e in items if e["extra_info"].get("shape_label")), "B×N×C")
    has_flops = any(e["extra_info"].get("flops") for e in items)
    header = ["op", "pass", f"shape ({shape_label})", "dtype", "ours ms", "eager ms", "compiled ms"]
    header += [f"{'max-autotune' if i == 'compiled-max-autotune' else i} ms" for i in extra]
    header += ["ours TFLOP/s"] if has_flops else []
    has_bytes = any(e["extra_info"].get("bytes") for e in items)  # training-step suites count no bytes
    header += ["ours GB/s", "% of copy BW"] if has_bytes else []
    header += ["vs compiled", "vs eager"]
    header += [f"vs {i}" for i in extra if not i.startswith("compiled")]
    header += ["target"]
    rows, verdicts = [], []
    for (_, case, op, pass_), g in groups.items():
        any_e = next(iter(g.values()))
        ours = g.get("ours")
        oi = ours["extra_info"] if ours else {}
        info0 = any_e["extra_info"]
        cells = [PASS_LABEL.get(pass_, pass_), _shape_label(info0), _dtype_label(info0)]  # "train step": a space
        label = " ".join(cells)
        row = [f"`{op}`", *cells]
        row += [_ms(g.get(i)) for i in ("ours", "eager", "compiled", *extra)]
        row += [f"{oi['tflops']:.0f}" if oi.get("tflops") else "—"] if has_flops else []
        if has_bytes:
            row += [f"{oi['gbps']:.0f}" if oi.get("gbps") else "—"]
            row += [f"{oi['copy_bw_fraction']:.1%}" if oi.get("copy_bw_fraction") else "—"]
        row += [_ratio(oi.get("vs_compiled_best")), _ratio(oi.get("vs_eager_best", oi.get("vs_eager")))]
        row += [_ratio(oi.get(f"vs_{i}")) for i in extra if not i.startswith("compiled")]
        row += [_target_cell(ours)]
        rows.append(row)
        for target, value, met in evaluate_targets(ours) if ours else []:
            shown = "not measured" if value is None else f"{value:.1%}" if "%" in target else f"{value:.2f}×"
            verdict = "n/a" if met is None else "met" if met else "**missed**"
            verdicts.append(f"- `{op}` {label}: {target} — {verdict} ({shown})")

    throughput = []  # training-step suites: every implementation's img/s and MFU, not only ours'
    for (_, case, op, pass_), g in groups.items():
        cells = [f"{impl} {e['extra_info']['img_per_s']:.0f} img/s"
                 + (f" ({e['extra_info']['mfu']:.1%} MFU)" if e["extra_info"].get("mfu") else "")
                 for impl, e in g.items() if e["extra_info"].get("img_per_s")]
        if cells:
            throughput.append(f"- `{op}`{'' if case == op else ' ' + case}: " + ", ".join(cells))

    out = [f"## {suite}", ""]
    copy = env.get("copy_gbps")
    # A suite may set its own round counts (bench_models.py: 20 / 3), so they come from its entries;
    # the session's defaults only for JSON written before entries recorded their warm-up rounds.
    rounds = sorted({e["stats"]["rounds"] for e in items if (e.get("stats") or {}).get("rounds")})
    warmup = sorted({e["extra_info"]["warmup_rounds"] for e in items if "warmup_rounds" in e["extra_info"]})
    if not warmup and rounds in ([], [env.get("rounds")]):
        warmup = [env["warmup_rounds"]] if "warmup_rounds" in env else []
    out.append(
        f"Run {env.get('date', doc.get('datetime', '?'))}; measured copy bandwidth "
        + (f"{copy:.0f} GB/s" if copy else "not measured")
        + f"; median of {_span(rounds or [env.get('rounds', '?')])} rounds"
        + f" after {_span(warmup or ['?'])} warm-up rounds."
    )
    if n := repeats(doc, suite):
        out += ["", f"{n} benchmarks were recorded twice (their suite collected twice): times are the later "
                "run's, first calls the first run's."]
    out += ["", _table(header, rows), ""]
    out.append(
        "ms: median GPU time per call. GB/s: the minimal bytes the op must move (see the suite) / ours' "
        "time; % of copy BW against the copy bandwidth above. vs X: X's time / ours' (> 1: ours "
        "faster); vs compiled: against the faster torch.compile mode measured; vs eager: against the fastest "
        "eager variant measured. TFLOP/s (where the suite counts FLOPs): ours' matmul FLOPs / time."
    )
    if throughput:
        peak = next((e["extra_info"]["peak_tflops"] for e in items if e["extra_info"].get("peak_tflops")), None)
        out += ["", "Throughput" + (f" (MFU against the measured {peak:.0f} TFLOP/s bf16 matmul peak)" if peak else "")
                + ":", "", *throughput]
    notes = (env.get("baseline_notes") or {}).get(suite) or {}
    if notes:
        said = (f"{k}: {', '.join([v] if isinstance(v, str) else v)}" for k, v in sorted(notes.items()))
        out += ["", "Baselines not run: " + "; ".join(said) + "."]
    if env.get("budget_skipped"):
        out += ["", f"**Incomplete: {env['budget_skipped']} benchmarks skipped when ARCHIRF_BENCH_BUDGET_S ran out.**"]
    if verdicts:
        met = sum("— met" in v for v in verdicts)
        out += ["", f"### Targets ({met} of {len(verdicts)} met)", "", *verdicts]

    first_rows, cold = {}, cold_first_calls(doc)
    for (_, case, op, pass_), g in groups.items():
        for impl, e in g.items():
            info = e["extra_info"]
            r = first_rows.setdefault((op, case, impl), {"first": cold[_impl_key(e)], "host": {}})
            r["host"][PASS_LABEL.get(pass_, pass_)] = info.get("host_us")
    if first_rows:
        passes = ["fwd", "bwd", "fwd+bwd"]
        body = []
        for (op, case, impl), r in first_rows.items():
            first = f"{r['first']:.2f}" if r["first"] is not None else "—"
            host = [f"{r['host'][p]:.0f}" if r["host"].get(p) is not None else "—" for p in passes]
            body.append([f"`{op}`", case, impl, first, *host])
        out += ["", "### First call and host time", ""]
        out.append(
            "First call: wall time of the first fwd+bwd (torch.compile, Triton JIT and autotuning), excluded "
            "from the times above. Host µs: CPU time to issue one call (hidden behind the GPU in the timings)."
        )
        out += ["", _table(["op", "case", "impl", "first call s", *[f"host µs {p}" for p in passes]], body)]
    return "\n".join(out) + "\n"


def render_readme(docs: dict[str, dict]) -> str:
    """The per-GPU README: environment header, then one section per suite."""
    newest = max(docs.values(), key=lambda d: environment(d).get("date") or d.get("datetime") or "")
    env = environment(newest)
    head = [f"# Benchmark results: {env.get('gpu', 'unknown GPU')}", ""]
    if env.get("smoke"):
        head += ["**Smoke run (ARCHIRF_BENCH_SMOKE=1): tiny shapes, timings meaningless.**", ""]
    head.append("Regenerate with `python -m benchmarks.record` from the repository root on this GPU.")
    copy = env.get("copy_gbps")
    rows = [
        ["GPU", f"{env.get('gpu', '?')} ({env.get('sm_count', '?')} SMs, {env.get('capability', '?')}, "
                f"{env.get('memory_gib', '?')} GiB)"],
        ["driver / CUDA", f"{env.get('driver', '?')} / {env.get('cuda', '?')}"],
        ["torch / triton / python", f"{env.get('torch', '?')} / {env.get('triton', '?')} / {env.get('python', '?')}"],
        ["date", str(env.get("date", newest.get("datetime", "?")))],
        ["measured copy bandwidth", f"{copy:.0f} GB/s (read + write of a large `y.copy_(x)`)" if copy else "not measured"],
        ["timing", env.get("timing", "?")],
    ]
    head += ["", _table(["", ""], rows), ""]
    return "\n".join(head) + "\n" + "\n".join(render_suite(s, d) for s, d in sorted(docs.items()))


# -- writing --------------------------------------------------------------------------------------


def split_by_suite(doc: dict) -> dict[str, dict]:
    suites: dict[str, dict] = {}
    for b in doc.get("benchmarks", []):
        # Committed copy: no per-round samples, and the environment once (machine_info.archirf).
        stats = {k: v for k, v in (b.get("stats") or {}).items() if k != "data"}
        b = dict(b, stats=stats, extra_info={k: v for k, v in b.get("extra_info", {}).items() if k != "env"})
        s = suites.setdefault(suite_of(b), {k: v for k, v in doc.items() if k != "benchmarks"})
        s.setdefault("benchmarks", []).append(b)
    return suites


def write_results(doc: dict, out_root: Path) -> Path:
    """Write <out_root>/<gpu-slug>/<suite>.json for each suite in `doc` and re-render README.md
    from every suite JSON in that folder. Returns the folder."""
    folder = Path(out_root) / gpu_slug(doc)
    folder.mkdir(parents=True, exist_ok=True)
    for suite, sdoc in split_by_suite(annotate(doc)).items():
        (folder / f"{suite}.json").write_text(json.dumps(sdoc, indent=1) + "\n")
    docs = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    (folder / "README.md").write_text(render_readme(docs))
    return folder


def pytest_command(suites: list[str] | None, json_path: Path, pytest_args: list[str]) -> list[str]:
    files = [f"benchmarks/bench_{s}.py" for s in suites] if suites else ["benchmarks"]
    cmd = [sys.executable, "-m", "pytest", *files, "--benchmark-only", f"--benchmark-json={json_path}"]
    return cmd + ["--benchmark-columns=median,iqr,min,rounds", "-rs", *pytest_args]


def run_pytest(suites: list[str] | None, pytest_args: list[str]) -> tuple[int, dict | None]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "benchmarks.json"
        cmd = pytest_command(suites, path, pytest_args)
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        return rc, json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.record", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", action="append", help="benchmarks/bench_<SUITE>.py only; repeatable; default all")
    p.add_argument("--out", type=Path, default=RESULTS, help="results root (default benchmarks/results)")
    p.add_argument("--from-json", type=Path, help="render this pytest-benchmark JSON instead of running pytest")
    p.add_argument("--print", action="store_true", help="print the markdown only; write nothing")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args(argv)

    if args.from_json:
        rc, doc = 0, json.loads(args.from_json.read_text())
    else:
        rc, doc = run_pytest(args.suite, args.pytest_args)
    if not doc or not entries(doc):
        print("record: no benchmark ran (they need a CUDA GPU); nothing written", file=sys.stderr)
        return rc or 1
    annotate(doc)
    if args.print:
        suites = split_by_suite(doc)
        print(render_readme(suites))
        return rc
    if environment(doc).get("smoke") and args.out.resolve() == RESULTS.resolve():
        print("record: smoke-run results are not written to benchmarks/results (pass --out)", file=sys.stderr)
        return rc or 1
    folder = write_results(doc, args.out)
    print((folder / "README.md").read_text())
    print(f"record: wrote {folder}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
