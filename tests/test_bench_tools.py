"""The benchmark tools behind the results pages, on the CPU: benchmarks/digits_wall.py (a cold job's stamped output
and the spans derived from it) and benchmarks/train_step_variants.py (the variant grammar, its refusals, a tiny
run's SUMMARY, the captured step's side with an eager stand-in for the graph)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from archirf.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.resolution=8", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
        "model.num_register_tokens=2"]
# one step's network: the fused update's kernel runs in Triton's interpreter here, whose time grows with the weights
STEP = ["data.resolution=8", "model.hidden_size=16", "model.depth=1", "model.num_heads=1",
        "model.num_register_tokens=1"]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")     # (parse_variant reads only the type: no GPU needed)


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wall = _load("digits_wall")
tsv = _load("train_step_variants")


# -- digits_wall ----------------------------------------------------------------------------------------------
def test_lines_end_at_both_line_ends_and_keep_a_character_split_between_chunks():
    block = "█".encode()                                     # three bytes: the chunks split it
    chunks = [(0.5, b"archirf: first\n\r  0%|"), (1.0, block[:2]), (1.5, block[2:] + b"| 0.00/640 [\r"),
              (2.0, b" 20%|" + block + b"| 128/640 [00:00, img_s=3,339, loss=1.7329]"), (2.5, b"\n\n  \ntail")]
    assert wall.stamped_lines(chunks) == [
        (0.5, "archirf: first"), (1.5, "  0%|█| 0.00/640 ["),
        (2.5, " 20%|█| 128/640 [00:00, img_s=3,339, loss=1.7329]"), (2.5, "tail")]


def test_the_spans_come_from_the_first_moving_bar_the_done_line_and_the_last_bar():
    lines = [(3.0, "archirf: DiT 0.05M params"), (3.1, "  0%|          | 0.00/128k [00:00<?, ?img/s]"),
             (9.0, "  4%|▍         | 5.12k/128k [00:06<00:20, img_s=40,100, loss=0.2000, lr=1e-3]"),
             (20.0, "100%|██████████| 128k/128k [00:17<00:00, img_s=43,663, loss=0.1389, lr=1e-3]"
                    "archirf: checkpoint x"),
             (21.0, "archirf: done; samples in x"),
             (21.0, "100%|██████████| 128k/128k [00:18<00:00, 7kimg/s]")]
    row = wall.derive(lines, exit_s=22.46, wall_s=22.51)
    assert row == {"wall_s": 22.51, "first_line_s": 3.0, "progress_bar_s": 9.0, "done_s": 21.0, "exit_s": 22.46,
                   "steady_img_per_s": 43663, "final_loss": 0.1389}
    # a stdout line printed after a bar redraw, without its own line end, is still the done line
    glued = lines[:3] + [(20.5, "100%|█| 128k/128k [00:18, img_s=43,663, loss=nan]archirf: done; samples")]
    row = wall.derive(glued, exit_s=21.0, wall_s=21.0)
    assert (row["done_s"], row["final_loss"]) == (20.5, None)
    assert wall.derive([], exit_s=1.0, wall_s=1.2) == {
        "wall_s": 1.2, "first_line_s": None, "progress_bar_s": None, "done_s": None, "exit_s": 1.0,
        "steady_img_per_s": None, "final_loss": None}


@pytest.mark.parametrize("spec, why", [("model.kernels=reference", "start with a label"),
                                       ("plain reference", "is not a key=value override"), ("", "start with")])
def test_a_run_is_a_label_then_its_overrides(spec, why):
    assert wall.parse_run("plain model.kernels=reference optim.fused_update=false") == (
        "plain", ["model.kernels=reference", "optim.fused_update=false"])
    with pytest.raises(SystemExit, match=why):
        wall.parse_run(spec)


def _record_popen(monkeypatch, cmd=None):
    """digits_wall's Popen of a job (the one given an environment), recorded (its command and environment) and run,
    with `cmd` in place of the job's. (The module is subprocess itself: the tool's `git` calls pass through.)"""
    calls, real = [], subprocess.Popen

    def popen(args, **kwargs):
        if "env" not in kwargs:
            return real(args, **kwargs)
        calls.append((list(args), kwargs["env"]))
        return real(cmd or args, **kwargs)

    monkeypatch.setattr(wall.subprocess, "Popen", popen)
    return calls


def test_digits_wall_times_a_run_cold_and_reads_its_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    calls = _record_popen(monkeypatch)
    out, work = tmp_path / "wall.jsonl", tmp_path / "work"
    job = [*TINY, "global_batch=32", "total_images=320", "log_every=64", "sample_every=0", "checkpoint_every=0",
           "sample.steps=2", "sample.per_class=1", "sample.gif_frames=2"]
    rc = wall.main(["--out", str(out), "--work", str(work), "--standalone", "--logs", "--command", "2",
                    "--run", "fast optim.lr=3e-3", *job])
    assert rc == 0
    # the job's own empty caches and unbuffered output reach the child, and its overrides follow every run's
    [(cmd, env)] = calls
    assert (env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"], env["PYTHONUNBUFFERED"]) == (
        str(work / "inductor_fast"), str(work / "triton_fast"), "1")
    assert cmd[-len(job) - 2:] == [f"run_dir={work / 'run_fast'}", *job, "optim.lr=3e-3"]
    [r] = [json.loads(line) for line in out.read_text().splitlines()]
    assert (r["run"], r["command"], r["overrides"], r["rc"], r["timed_out"]) == (
        "fast", 2, "optim.lr=3e-3", 0, False)
    metrics = [json.loads(line) for line in (work / "run_fast" / "metrics.jsonl").read_text().splitlines()]
    # the bar's last postfix is the last log window's rate and loss
    assert r["steady_img_per_s"] == round(metrics[-1]["img_per_s"])
    assert r["final_loss"] == round(metrics[-1]["loss"], 4)
    assert 0 < r["first_line_s"] <= r["progress_bar_s"] <= r["done_s"] <= r["exit_s"] <= r["wall_s"]
    assert (r["gpu"], r["torch"], r["inductor_cache"]) == (None, torch.__version__, "empty")
    assert r["job"].endswith(" ".join(job)) and r["commit"]
    log = (tmp_path / "wall_fast.log").read_text().splitlines()
    assert log[0].split(None, 1) == [f"{r['first_line_s']:.2f}", log[0].split(None, 1)[1]]
    assert log[0].split(None, 1)[1].startswith("archirf: ")
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and table[2].startswith("| 2 | fast (`optim.lr=3e-3`) |")


def _hang(pid_file):
    """A stand-in job: it starts a child, writes the child's pid, and both sleep; only a kill of the whole process
    group ends the child before its sleep does."""
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " open(sys.argv[1], 'w').write(str(c.pid)); time.sleep(60)")
    return [sys.executable, "-c", code, str(pid_file)]


def _gone(pid, within=10.0):
    """The process has exited (or is a zombie waiting to be reaped) within `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def test_a_run_past_its_timeout_is_killed_with_its_children(tmp_path, monkeypatch):
    _record_popen(monkeypatch, _hang(tmp_path / "pid"))
    t0 = time.monotonic()
    fields, _ = wall.run_one("hang", [], tmp_path, standalone=False, timeout=3)
    assert time.monotonic() - t0 < 30 and (fields["timed_out"], fields["rc"]) == (True, -signal.SIGKILL)
    assert _gone(int((tmp_path / "pid").read_text()))


def test_a_sigterm_kills_the_job_before_its_folder_goes(tmp_path, monkeypatch):
    pid_file, out = tmp_path / "pid", tmp_path / "wall.jsonl"
    calls = _record_popen(monkeypatch, _hang(pid_file))
    dead_before_removal, real_rmtree = [], wall.shutil.rmtree

    def rmtree(path, **kwargs):
        if pid_file.exists():       # (not the run's own folders, emptied before it starts)
            dead_before_removal.append(_gone(int(pid_file.read_text()), within=5.0))
        return real_rmtree(path, **kwargs)

    def terminate_once_started():
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(wall.shutil, "rmtree", rmtree)
    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_once_started, daemon=True).start()
    with pytest.raises(SystemExit) as exit_:
        wall.main(["--out", str(out), "--run", "hang"])
    monkeypatch.undo()
    assert exit_.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    work = Path(calls[0][1]["TRITON_CACHE_DIR"]).parent
    # the job's group killed first, then the temporary folder removed, and no row written
    assert dead_before_removal[-1] and not work.exists() and not out.exists()


# -- train_step_variants ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    return load_config(str(ROOT / "configs" / "digits.yaml"), STEP)


@pytest.mark.parametrize("name, device, kind, mode, kernels, fused, compile_mode", [
    ("plain", CPU, "plain", None, "auto", False, "default"),
    ("plain_fu_cg", CPU, "plain", "reduce-overhead", "auto", True, "reduce-overhead"),
    ("whole_tri_fu_mat", CPU, "whole", "max-autotune-no-cudagraphs", "triton", True, "default"),
    ("fsdp_ref", CPU, "fsdp", None, "reference", False, "default"),
    ("eager_ref_fu", CPU, "eager", None, "reference", True, "default"),
    ("graph", CUDA, "graph", None, "auto", False, "default"),
    ("graph_ref_compiled", CUDA, "graph", "default", "reference", False, "default"),
    ("graph_fu_mat", CUDA, "graph", "max-autotune-no-cudagraphs", "auto", True, "max-autotune-no-cudagraphs"),
    ("graph_plain", CUDA, "graph", None, "reference", False, "default"),
    ("graph_plain_fu", CUDA, "graph", None, "reference", True, "default"),
])
def test_a_variant_name_sets_its_kind_kernels_update_and_mode(base, name, device, kind, mode, kernels, fused,
                                                              compile_mode):
    cfg, got_kind, got_mode = tsv.parse_variant(name, base, device)
    assert (got_kind, got_mode) == (kind, mode)
    assert (cfg.model.kernels, cfg.optim.fused_update, cfg.compile_mode) == (kernels, fused, compile_mode)
    assert (base.model.kernels, base.optim.fused_update, base.compile_mode) == ("auto", None, "default")  # a copy


@pytest.mark.parametrize("name, device, why", [
    ("turbo", CPU, "unknown variant 'turbo'"),
    ("plain_fu_ref", CPU, "unknown variant"),                 # suffixes out of order
    ("plain_cg_mat", CPU, "unknown variant"),                 # two modes
    ("graph_compiled_mat", CUDA, "unknown variant"),
    ("eager_mat", CPU, "eager compiles nothing"),
    ("fsdp_cg", CPU, "one rank without FSDP2"),
    ("plain_compiled", CPU, "_compiled picks a compiled graph variant"),
    ("graph_cg", CUDA, "both replay CUDA graphs.*use graph_compiled"),
    ("graph", CPU, "replays a CUDA graph, and this run is on cpu: run it on a GPU"),
    ("graph_ref_compiled", CPU, "this run is on cpu"),
    ("plain_plain", CPU, "_plain is the trainer's eager captured step"),
    ("graph_plain_compiled", CUDA, "_plain is the trainer's eager captured step"),
    ("graph_plain_ref", CUDA, "unknown variant"),
])
def test_a_variant_the_tool_cannot_time_is_refused_by_name(base, name, device, why):
    with pytest.raises(SystemExit, match=why):
        tsv.parse_variant(name, base, device)


def test_graph_plain_is_the_config_the_trainer_builds_its_small_captured_step_from(base):
    from archirf import trainer
    from archirf.parallel import Env

    cfg, _, _ = tsv.parse_variant("graph_plain", base, CUDA)
    want, keys = trainer._plain_ops(base, Env(device=CUDA), step_graph=True, use_compile=False)
    assert keys and (cfg.model, cfg.optim.fused_update) == (want.model, False)
    assert (cfg.model.kernels, cfg.model.attn_impl, cfg.model.attn_backend) == ("reference", "sdpa", None)
    # graph_ref keeps attn_impl as given (auto: the Triton QK-norm attention where the model has it)
    assert tsv.parse_variant("graph_ref", base, CUDA)[0].model.attn_impl == "auto"
    # explicit choices stay, as in the trainer; a step the trainer keeps fused is refused, not timed as graph
    kept = load_config(str(ROOT / "configs" / "digits.yaml"), [*STEP, "model.kernels=triton", "model.attn_impl=sdpa"])
    with pytest.raises(SystemExit, match="resolves nothing here.*time graph_fu"):
        tsv.parse_variant("graph_plain_fu", kept, CUDA)
    big = load_config(str(ROOT / "configs" / "dit_xl2_latent.yaml"), ["global_batch=64", "micro_batch=64"])
    with pytest.raises(SystemExit, match="resolves nothing here"):
        tsv.parse_variant("graph_plain", big, CUDA)


@pytest.mark.parametrize("capture", [False, True])
def test_a_graph_rows_peak_memory_counts_from_before_its_capture(monkeypatch, capture):
    calls = []
    monkeypatch.setattr(tsv.torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    monkeypatch.setattr(tsv.torch.cuda, "max_memory_allocated", lambda: calls.append("peak") or 3 * 2**30)
    variant = types.SimpleNamespace(device=CUDA, capture=capture, time=lambda steps: calls.append("time") or 0.01,
                                    result=lambda sec, **extra: extra)
    # a replay allocates nothing: a reset after the capture would leave its activations out of the peak
    assert tsv.measure(variant, 3, None) == {"peak_mem_gib": 3.0}
    assert calls == (["time", "peak"] if capture else ["reset", "time", "peak"])


def test_variants_run_through_main_and_sum_up(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    config = str(ROOT / "configs" / "digits.yaml")
    assert tsv.main(["--config", config, "--variants", "eager,eager_ref_fu", "--batch", "4", "--steps", "1",
                     "--rounds", "2", *STEP]) == 0
    out = capsys.readouterr().out.splitlines()
    summary = json.loads(out[-1].removeprefix("SUMMARY "))
    assert out[-1].startswith("SUMMARY ") and [r["variant"] for r in summary] == ["eager", "eager_ref_fu"]
    for r in summary:
        assert len(r["round_ms"]) == 2 and r["ms"] == pytest.approx(sorted(r["round_ms"])[0] / 2
                                                                  + sorted(r["round_ms"])[1] / 2, abs=2e-3)
        assert r["img_per_s"] == pytest.approx(4 / r["ms"] * 1e3) and r["first_step_s"] > 0
    # 1 first step + 3 warm-up + 2 rounds of 1: all but the first (which makes the state) in the one pass
    assert "fused_steps" not in summary[0] and summary[1]["fused_steps"] == "5/6"
    with pytest.raises(SystemExit, match="names a variant twice"):
        tsv.main(["--config", config, "--variants", "eager,eager", *STEP])
    with pytest.raises(SystemExit, match="without --rounds"):
        tsv.main(["--config", config, "--rounds", "2", "--profile", "x", *STEP])


class _EagerGraph:
    """StepGraph's contract without CUDA: each call writes the gradients afresh (test_step_graph's stand-in)."""

    made = []

    def __init__(self, step_fn, params, buffers=(), warmup=2):
        self.step_fn, self.params, self.calls = step_fn, params, 0
        _EagerGraph.made.append(self)

    def __call__(self, *inputs):
        self.calls += 1
        for p in self.params:
            p.grad = None
        return self.step_fn(*inputs)


@pytest.mark.parametrize("fused", [False, True])
def test_the_graph_variant_steps_through_the_capture_and_keeps_its_gradients(base, monkeypatch, fused):
    from archirf.models import build_model

    monkeypatch.setattr(tsv, "StepGraph", _EagerGraph)
    _EagerGraph.made.clear()
    cfg, _, _ = tsv.parse_variant("graph_fu" if fused else "graph", base, CUDA)
    kept, weights, shadows = {}, {}, {}
    for capture in (False, True):
        torch.manual_seed(0)
        variant = tsv.Variant("graph", cfg, build_model(cfg).train(), CPU, None, 4, capture=capture)
        variant.time(1)
        kept[capture] = [p.grad for p in variant.model.parameters() if p.requires_grad]
        weights[capture] = [p.detach().clone() for p in variant.model.parameters()]
        shadows[capture] = {n: t.clone() for n, t in variant.ema.shadow.items()}
        if fused:       # (the first step makes the optimizer's state: unfused)
            assert variant.fused_steps == variant.steps - 1 == 4
    assert len(_EagerGraph.made) == 1 and _EagerGraph.made[0].calls == 1 + 3 + 1
    assert all(g is None for g in kept[False])                 # the eager step unsets them
    assert all(g is not None for g in kept[True])              # the graph's tensors: the next replay rewrites them
    # the captured step clips, updates and averages as the eager one does: the same weights and EMA after 5 steps
    assert all(torch.equal(a, b) for a, b in zip(weights[False], weights[True], strict=True))
    assert shadows[False].keys() == shadows[True].keys()
    assert all(torch.equal(shadows[False][n], shadows[True][n]) for n in shadows[False])
    torch.manual_seed(0)        # (and the steps moved them: not a comparison of untouched weights)
    first = [p.detach() for p in build_model(cfg).parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(first, weights[True], strict=True))
