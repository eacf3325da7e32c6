"""Scale-out on CPU / gloo: the real entry point under torchrun with 1, 2 and 3 ranks on a tiny recipe.

A run's steps do not depend on the world size (fixed micro batch): 1 rank, 2 ranks (FSDP2) and
2 ranks (HSDP) take the same steps up to fp summation order; a sharded checkpoint of 2 ranks
resumes bitwise on 2 and within fp tolerance on 1 and 3; a SIGTERM that reaches one rank stops
all of them with one complete checkpoint; compile + FSDP2 + activation checkpointing train.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from archirf import checkpoint as ckpt
from archirf.config import ConfigError, load_config

# global_batch 24 = micro 4 x accum 6 / 3 / 2 on 1 / 2 / 3 ranks; no warm-up so the weights move.
TINY = ["data.resolution=8", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
        "model.num_register_tokens=2", "global_batch=24", "micro_batch=4", "optim.warmup_images=0",
        "optim.lr=3e-3", "sample.steps=4", "sample.per_class=2", "sample.classes=[0,1,2]", "sample.gif_frames=3",
        "progress=false", "ema.half_life_images=100", "log_every=24", "sample_every=0", "checkpoint_every=0",
        "ema.posthoc_sigma_rels=[0.05,0.1]", "ema.posthoc_every=48"]   # post-hoc EMAs: sharded, gathered, resumed
STEPS = 6
# CPU / gloo on any machine: GPUs hidden (a 2-rank run on a 1-GPU host would otherwise ask for a second
# device), and Triton kernels, where a recipe asks for them, in the interpreter.
# PYTHONFAULTHANDLER: a rank that dies of a signal (SIGABRT, SIGSEGV) prints every thread's Python stack.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1",
       "PYTHONFAULTHANDLER": "1"}
ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, *args: str, timeout: int = 240, module: str = "archirf.train",
             env: dict | None = None) -> subprocess.CompletedProcess:
    target = ["-m", module] if not module.endswith(".py") else [module]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})}, cwd=ROOT)
    assert proc.returncode == 0, failure_report(proc)
    return proc


def failure_report(proc: subprocess.CompletedProcess) -> str:
    """What a failed multi-rank run printed that says why: every rank's traceback or fault-handler stack (the
    ranks' stderr interleave, and torchrun's own summary alone can fill the tail), then the tails."""
    err = proc.stderr
    starts = [m.start() for m in re.finditer(r"Traceback \(most recent call last\)|Fatal Python error", err)]
    stacks = [err[i:i + 3000] for i in starts[:4]]
    return "\n----\n".join([*stacks, "stdout tail:\n" + proc.stdout[-2000:], "stderr tail:\n" + err[-3000:]])


def train(nproc: int, run_dir: Path, *extra: str, steps: int = STEPS, env: dict | None = None):
    return torchrun(nproc, f"run_dir={run_dir}", *TINY, f"total_images={24 * steps}", *extra, env=env)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_snapshot(ckpt.latest_snapshot(run_dir))[0]


def posthoc(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from archirf.posthoc_ema import stored_profiles
    images, path = stored_profiles(run_dir)[-1]
    assert images == 24 * STEPS
    return load_file(str(path))


def buffers(run_dir: Path) -> set[str]:
    """The snapshot's buffer entries (the post-hoc files hold parameters only)."""
    from archirf.sample import load_for_sampling
    model, _, _ = load_for_sampling(run_dir, "ema")
    return {n for n, _ in model.named_buffers()}


def assert_same_steps(a: list[dict], b: list[dict], rel: float) -> None:
    assert [r["images_seen"] for r in a] == [r["images_seen"] for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=rel), (x, y)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=rel), (x, y)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Straight runs on 1 rank, 2 ranks, 2 ranks HSDP and 2 ranks with the one-pass update; the 2-rank run's checkpoint halfway resumed on 1, 2, 3
    ranks, and the 1-rank run's (no FSDP2) on 2."""
    root = tmp_path_factory.mktemp("dist")
    names = ("one", "one_fsdp", "two", "hsdp", "two_fused", "resume1", "resume2", "resume3", "resume_from1")
    out = {name: root / name for name in names}
    half = f"checkpoint_every={24 * STEPS // 2}"             # a checkpoint halfway; the steps are the same
    train(1, out["one"], half)
    train(1, out["one_fsdp"], "parallel.shard_single_rank=true")
    train(2, out["two"], half)
    train(2, out["hsdp"], "parallel.hsdp_replicate=2")
    train(2, out["two_fused"], "optim.fused_update=true")   # the one-pass update on local shards (interpreted)

    def halfway(run: Path, copy: Path) -> None:             # the run as it was when its halfway checkpoint was new
        shutil.copytree(run, copy)
        shutil.rmtree(copy / "checkpoints" / f"images-{24 * STEPS:012d}")
        for end in (copy / "snapshots").glob(f"*-{24 * STEPS:012d}.*"):   # the resumed run must write its own
            end.unlink()

    for n in (1, 2, 3):
        halfway(out["two"], out[f"resume{n}"])
        proc = train(n, out[f"resume{n}"], half)
        assert f"resumed from {out[f'resume{n}']}/checkpoints/images-{24 * STEPS // 2:012d}" in proc.stdout
    halfway(out["one"], out["resume_from1"])
    assert "resumed from" in train(2, out["resume_from1"], half).stdout
    return out


def test_one_and_two_ranks_take_the_same_steps(runs):
    one, one_fsdp, two, hsdp = (rows(runs[k]) for k in ("one", "one_fsdp", "two", "hsdp"))
    assert len(one) == STEPS and two[-1]["loss"] < two[0]["loss"], "training must move the weights"
    assert_same_steps(one, two, rel=1e-5)        # one rank trains the plain module, two ranks FSDP2
    assert_same_steps(one_fsdp, one, rel=1e-5)   # FSDP2 on one rank: the same steps
    assert_same_steps(hsdp, two, rel=1e-5)
    assert two[0]["img_per_s_per_gpu"] == pytest.approx(two[0]["img_per_s"] / 2)
    a, b = snapshot(runs["one"]), snapshot(runs["two"])
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_the_one_pass_update_on_local_shards_takes_the_unfused_steps(runs):
    """optim.fused_update (the default on CUDA) under FSDP2: AdamW and the EMAs (post-hoc ones too) of each rank's
    shards in one pass, the clipping scale global; the same steps, weights and EMAs as torch's AdamW + lerps."""
    assert_same_steps(rows(runs["two_fused"]), rows(runs["two"]), rel=1e-4)
    for get in (snapshot, posthoc):
        a, b = get(runs["two"]), get(runs["two_fused"])
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-3, atol=5e-5, msg=k)
        # the pass ran (AdamW.fused_update declines silently where it cannot): its rounding differs from torch's
        assert any(not torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint_resumes_on_one_two_and_three_ranks(runs):
    straight = rows(runs["two"])
    # same world size: bitwise (json round-trips floats exactly), EMA snapshot too
    steps = lambda rs: [(r["images_seen"], r["loss"], r["grad_norm"]) for r in rs]  # noqa: E731
    assert steps(rows(runs["resume2"])) == steps(straight)
    a, b = snapshot(runs["two"]), snapshot(runs["resume2"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    p, q, r = (posthoc(runs[k]) for k in ("two", "resume2", "one"))   # the post-hoc EMAs too, and 1 rank = 2
    assert p.keys() == q.keys() == r.keys() and len(p) == 2 * len(a.keys() - buffers(runs["two"]))
    assert all(torch.equal(p[k], q[k]) and torch.allclose(p[k].float(), r[k].float(), rtol=1e-3, atol=1e-5) for k in p)
    for n in (1, 3):  # resharded (on 1 rank into the plain module): the same trajectory within fp tolerance
        assert_same_steps(rows(runs[f"resume{n}"]), straight, rel=1e-5)
    assert_same_steps(rows(runs["resume_from1"]), straight, rel=1e-5)  # a plain 1-rank checkpoint on 2 ranks
    # the sampling CLI's loader reads the 2-rank sharded checkpoint into one full model
    from archirf.sample import load_for_sampling

    model, _, which = load_for_sampling(runs["two"], "ema")
    assert "EMA" in which and all(torch.allclose(p, a[n], rtol=0, atol=0) for n, p in model.named_parameters())


_INIT_SCRIPT = '''
import sys, torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from archirf import parallel
from archirf.config import load_config
from archirf.ema import EMA

cfg = load_config(None, sys.argv[2:])
with parallel.distributed(cfg) as env:
    model, _ = parallel.build_training_model(cfg, env, param_dtype=None, compile=False)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # one backward on 8 fixed samples, split over the ranks: the clipped norm must be the global one
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 1, 8, 8, generator=gen), torch.rand(8, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    part = slice(env.rank * 8 // env.world_size, (env.rank + 1) * 8 // env.world_size)
    (model(x[part], t[part], y[part]) - x[part]).square().mean().backward()
    params = [p for p in model.parameters()]
    norm = parallel.clip_grad_norm_(params, 1e-3)
    clipped = parallel.clip_grad_norm_(params, 0.0)
    ema = EMA(model, decay=0.5)
    ema_full = ema.full_state_dict(keep=env.is_main)
    if env.is_main:
        torch.save({"weights": full, "norm": norm, "clipped": clipped, "ema": ema_full}, sys.argv[1])
'''


def test_initial_weights_grad_norm_and_ema_gather_do_not_depend_on_the_world_size(tmp_path):
    from archirf.models import build_model

    script = tmp_path / "init.py"
    script.write_text(_INIT_SCRIPT)
    args = [*TINY, "model.class_dropout_prob=0"]
    for n in (1, 2):
        torchrun(n, str(tmp_path / f"w{n}.pt"), *args, module=str(script))
    one, two = (torch.load(tmp_path / f"w{n}.pt") for n in (1, 2))
    cfg = load_config(None, args)
    torch.manual_seed(cfg.seed)
    plain = build_model(cfg).state_dict()  # the single-device model the seed has always meant
    assert plain.keys() == one["weights"].keys() == two["weights"].keys()  # every parameter and buffer
    assert all(torch.equal(plain[k], one["weights"][k]) and torch.equal(plain[k], two["weights"][k]) for k in plain)
    assert all(torch.equal(two["ema"][k], plain[k]) for k in two["ema"])
    assert one["norm"] > 1e-3 and two["norm"] == pytest.approx(one["norm"].item(), rel=1e-5)
    assert two["clipped"] == pytest.approx(1e-3, rel=1e-3)  # clipping scaled the global norm down to max_norm


_STEP_SCRIPT = '''
import sys, torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.tensor import DTensor
from archirf import parallel
from archirf.config import load_config
from archirf.optim import build_optimizer

cfg = load_config(None, sys.argv[2:])
torch_steps = [0]  # calls of torch's own AdamW.step (the shard-local step makes one, to create the state)
_step = torch.optim.AdamW.step
def _counted(self, *args, **kwargs):
    torch_steps[0] += 1
    return _step(self, *args, **kwargs)
torch.optim.AdamW.step = _counted
def fsdp_units(model):  # distinct FSDP2 parameter groups: one per fully_shard call with parameters
    from torch.distributed.fsdp import FSDPModule
    states = [m._get_fsdp_state() for m in model.modules() if isinstance(m, FSDPModule)]
    return len({id(st._fsdp_param_group) for st in states if st._fsdp_param_group is not None})
paths = {"torch": {}, "local": {}, "grouped": {"parallel.blocks_per_shard": 2, "parallel.reshard_after_forward": False}}
with parallel.distributed(cfg) as env:
    out = {}
    for path, knobs in paths.items():
        cfg.parallel.blocks_per_shard = knobs.get("parallel.blocks_per_shard", 1)
        cfg.parallel.reshard_after_forward = knobs.get("parallel.reshard_after_forward", True)
        model, _ = parallel.build_training_model(cfg, env, param_dtype=None, compile=False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = build_optimizer(model, cfg.optim, env.device)
        if path == "torch":  # torch's own step and clipping, through DTensor dispatch under FSDP2
            opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                    weight_decay=cfg.optim.weight_decay, fused=True)
        gen, norms, torch_steps[0] = torch.Generator().manual_seed(1), [], 0
        for step in range(3):  # 8 fixed samples a step, split over the ranks
            x, t = torch.randn(8, 1, 8, 8, generator=gen), torch.rand(8, generator=gen)
            y = torch.randint(0, 10, (8,), generator=gen)
            part = slice(env.rank * 8 // env.world_size, (env.rank + 1) * 8 // env.world_size)
            (model(x[part], t[part], y[part]) - x[part]).square().mean().backward()
            if path == "torch":
                norm = torch.nn.utils.clip_grad_norm_(params, 1e-2, foreach=True)
                norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            else:
                norm = parallel.clip_grad_norm_(params, 1e-2)
            opt.step()
            opt.zero_grad(set_to_none=True)
            norms.append(norm.item())
        weights, state = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        out[path] = {"norms": norms, "weights": weights, "state": state.get("state"),  # rank 0 holds them
                     "torch_steps": torch_steps[0], "units": fsdp_units(model)}
    if env.is_main:
        torch.save(out, sys.argv[1])
'''


@pytest.fixture(scope="module")
def optimizer_paths(tmp_path_factory) -> dict[str, dict]:
    """Three steps of AdamW (weight decay, clipped) by torch's own step and clip, by the shard-local ones,
    and by the shard-local ones on grouped fully_shard units: plain on 1 rank, FSDP2 on 1 and 2 ranks."""
    root = tmp_path_factory.mktemp("optim")
    script = root / "steps.py"
    script.write_text(_STEP_SCRIPT)
    args = [*TINY, "model.depth=3", "model.class_dropout_prob=0", "optim.weight_decay=0.1", "optim.lr=1e-2"]
    runs = {"plain": (1, []), "fsdp1": (1, ["parallel.shard_single_rank=true"]), "fsdp2": (2, [])}
    for name, (n, extra) in runs.items():
        torchrun(n, str(root / f"{name}.pt"), *args, *extra, module=str(script))
    return {name: torch.load(root / f"{name}.pt") for name in runs}


def _flat(tree) -> dict[str, torch.Tensor]:
    """Nested dicts of tensors -> {dotted key: tensor}."""
    if isinstance(tree, torch.Tensor):
        return {"": tree}
    return {f"{k}.{sub}" if sub else str(k): t for k, v in tree.items() for sub, t in _flat(v).items()}


@pytest.mark.parametrize("run", ["plain", "fsdp1", "fsdp2"])
def test_shard_local_optimizer_and_clip_equal_torchs_own(optimizer_paths, run):
    """The shard-local AdamW step and clipping take bitwise torch's steps; grouped units the same within fp."""
    ref, local, grouped = (optimizer_paths[run][p] for p in ("torch", "local", "grouped"))
    assert ref["norms"][0] > 1e-2 and ref["norms"] == local["norms"]    # clipped, the same global norm
    assert len(set(ref["norms"])) == 3                                 # the steps moved the weights
    for key in ("weights", "state"):
        a, b, c = _flat(ref[key]), _flat(local[key]), _flat(grouped[key])
        assert a.keys() == b.keys() == c.keys() and len(a) > 10
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
        assert all(torch.allclose(a[k], c[k], rtol=1e-6, atol=1e-7) for k in a)
    assert grouped["norms"] == pytest.approx(ref["norms"], rel=1e-6)
    # the fast paths ran: torch's step only once (it creates the state), and the blocks grouped
    assert (ref["torch_steps"], local["torch_steps"], grouped["torch_steps"]) == (3, 1, 1)
    sharded = run != "plain"                                            # depth 3: 3 units + root, or 2 + root
    assert (local["units"], grouped["units"]) == ((4, 3) if sharded else (0, 0))


def test_shard_local_steps_do_not_depend_on_the_world_size(optimizer_paths):
    one, fsdp1, two = (_flat(optimizer_paths[r]["local"]["state"]) for r in ("plain", "fsdp1", "fsdp2"))
    assert one.keys() == two.keys() == fsdp1.keys()
    assert all(torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-7) and torch.allclose(one[k], fsdp1[k], rtol=1e-5,
                                                                                     atol=1e-7) for k in one)
    assert optimizer_paths["fsdp2"]["local"]["norms"] == pytest.approx(optimizer_paths["plain"]["local"]["norms"],
                                                                        rel=1e-5)


def test_host_overhead_benchmark_times_every_phase_on_two_ranks(tmp_path):
    """benchmarks/host_overhead.py runs the trainer's step under torchrun and accounts for its time."""
    out = tmp_path / "ho.jsonl"
    torchrun(2, "--steps", "2", "--warmup", "1", "--compile", "off", "--run-dir", str(tmp_path / "run"), "--out", str(out),
             "--variants", "torch_step;parallel.blocks_per_shard=3+parallel.reshard_after_forward=false",
             module="benchmarks.host_overhead")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["torch_step", "parallel.blocks_per_shard=3+parallel.reshard_after_forward=false"]
    for r in rows:
        assert r["world_size"] == 2 and r["fsdp"] and r["micro_batch"] == 2
        phases = sum(r[f"{k}_ms"] for k in ("forward_backward", "clip", "optimizer_step", "zero_grad", "ema", "other"))
        assert phases == pytest.approx(r["host_ms_per_step"], rel=1e-3) and 0 < phases <= r["ms_per_step"] * 1.01


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (Linux /proc)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        if "RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


def test_sigterm_to_one_rank_stops_every_rank_with_one_complete_checkpoint(tmp_path):
    """Also a model with an empty parameter (no register tokens, as DiT-XL/2): it resumes on 1 rank."""
    run = tmp_path / "run"
    args = [f"run_dir={run}", *TINY, "model.num_register_tokens=0", "parallel.stop_check_steps=4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "archirf.train", *args,
           "total_images=100000000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            time.sleep(0.2)
        workers = _worker_pids(proc.pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGTERM)  # rank 1 only: rank 0 must learn of it and stop too
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-4000:]
    assert f"received signal {int(signal.SIGTERM)}" in out
    done = ckpt.complete_checkpoints(run)
    assert len(done) == 1 and not list((run / "checkpoints").glob(".tmp-*"))
    assert sorted(p.name for p in done[0].glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    images = int(done[0].name.split("-")[1])
    assert images % 24 == 0 and images >= rows(run)[-1]["images_seen"] >= 24
    proc = torchrun(1, *args, f"total_images={images + 24}")
    assert f"resumed from {done[0]}" in proc.stdout and rows(run)[-1]["images_seen"] == images + 24


def test_two_ranks_agree_to_pass_over_a_damaged_checkpoint(tmp_path):
    """Rank 0 checks the checksums and tells rank 1: both resume from the older checkpoint."""
    run = tmp_path / "run"
    train(2, run, "checkpoint_every=48", steps=4)
    newest = ckpt.latest_checkpoint(run)
    shard = newest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 1
    shard.write_bytes(bytes(data))
    proc = train(2, run, "checkpoint_every=48")
    assert f"checkpoint {newest} is damaged (__1_0.distcp no longer matches its checksum" in proc.stdout
    assert f"resumed from {run}/checkpoints/images-{48:012d}" in proc.stdout
    assert (newest.parent / f"damaged-{newest.name}").is_dir()
    assert [r["images_seen"] for r in rows(run)] == [24 * (i + 1) for i in range(STEPS)]


@pytest.mark.parametrize("nproc", [2, 1])
def test_compile_fsdp_and_activation_checkpointing_train_together(tmp_path, runs, nproc):
    """Per-block compile (fullgraph: a graph break is an error) over checkpointed blocks, sharded on 2
    ranks, plain on 1; the second block reuses the first one's graph (a recompile would be logged)."""
    proc = train(nproc, tmp_path / "c", "compile=on", "parallel.activation_checkpointing=selective", steps=2,
                 env={"TORCH_LOGS": "recompiles"})
    assert ("FSDP2 mesh" if nproc == 2 else "one rank, no FSDP2") in proc.stdout
    assert "compile=True checkpointing=selective" in proc.stdout
    assert "Recompiling function" not in proc.stderr, proc.stderr[-3000:]
    assert_same_steps(rows(tmp_path / "c"), rows(runs["two"])[:2], rel=1e-4)


def test_hsdp_replicas_must_divide_the_world_size(tmp_path):
    from archirf.trainer import train as train_in_process

    with pytest.raises(ConfigError, match="hsdp_replicate=2 must divide the world size 1"):
        train_in_process(load_config(None, [*TINY, f"run_dir={tmp_path}", "parallel.hsdp_replicate=2"]))


@pytest.mark.parametrize("override, words", [
    ("parallel.stop_check_steps=0", "parallel.stop_check_steps must be >= 1"),
    ("parallel.hsdp_replicate=0", "parallel.hsdp_replicate must be >= 1"),
    ("parallel.blocks_per_shard=0", "parallel.blocks_per_shard must be >= 1"),
    ("parallel.reference_img_per_s=0", "parallel.reference_img_per_s must be > 0"),
    ("parallel.activation_checkpointing=some", "none"),
])
def test_parallel_config_is_validated(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, [override])


def test_per_gpu_throughput_and_scaling_efficiency(tmp_path):
    from archirf.metrics import Metrics

    m = Metrics(tmp_path, total_images=64, start_images=0, flops_per_image=None, device=torch.device("cpu"),
                progress=False, world_size=4, reference_img_per_s=10.0)
    m.step(torch.tensor(1.0), torch.tensor(1.0), images=64, data_wait_s=0.0)
    rec = m.log(images_seen=64, lr=1e-3)
    assert rec["img_per_s_per_gpu"] == pytest.approx(rec["img_per_s"] / 4)
    assert rec["scaling_efficiency"] == pytest.approx(rec["img_per_s"] / 4 / 10.0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_recomputes_the_same_dropout(mode):
    """A UNet with dropout: checkpointed blocks recompute with the forward's random numbers, so the
    gradients equal those without checkpointing."""
    from archirf import parallel
    from archirf.models import build_model

    cfg = load_config(None, ["model.name=adm_unet", "model.channels=32", "model.num_res_blocks=1",
                             "model.dropout=0.3", "data.resolution=8"])
    grads = []
    for ac in ("none", mode):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        with torch.no_grad():                     # off the zero init, so every block gets a gradient
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        parallel.parallelize(model, None, param_dtype=None, compile=False, activation_checkpointing=ac, shard=False)
        gen = torch.Generator().manual_seed(1)
        x, t = torch.randn(4, 1, 8, 8, generator=gen), torch.rand(4, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        torch.manual_seed(2)                      # the dropout masks of the forward
        model(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])
