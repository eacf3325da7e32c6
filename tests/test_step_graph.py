"""cuda_graph: the step's forward and backward as one CUDA graph (archirf/step_graph.py).

On every machine: how compile, compile_mode and cuda_graph resolve (auto's rule: a small step on one NVIDIA GPU is
captured and not compiled) and the refusals. On a GPU: the captured step trains exactly as the eager one (the same
draws, losses and weights) for each model family and objective, resumes exactly, and keeps its gradients across the
optimizer's steps."""

import copy

import pytest
import torch

from archirf import checkpoint as ckpt
from archirf import trainer
from archirf.config import ConfigError, load_config
from archirf.parallel import Env
from test_trainer import losses

CUDA = torch.cuda.is_available()


def plan(overrides, device="cuda", world_size=1):
    """(compile, per-block graphs, whole-step graph) of cuda_graph=auto unless the overrides say otherwise."""
    return trainer._plan_compile(load_config(None, ["cuda_graph=auto", *overrides]),
                                 Env(torch.device(device), world_size=world_size))


AE = ["model.name=autoencoder", "model.preset=Seed-f8c16", "data.resolution=64", "data.channels=3"]
XL = ["model.preset=DiT-XL/2", "data.resolution=32", "data.channels=4", "global_batch=64"]


def test_auto_captures_a_small_step_on_one_gpu_and_compiles_a_large_one():
    assert plan([]) == (False, False, True)                 # the digits job: captured, nothing compiled
    assert plan([], device="cpu") == (False, False, False)
    assert plan(XL) == (True, False, False)                 # DiT-XL/2: compiled, not captured
    assert plan(XL + ["cuda_graph=on"]) == (True, False, True)      # inductor's kernels inside the captured step
    assert plan(["cuda_graph=off"]) == (True, False, False)
    assert plan(["compile=on"]) == (True, False, True)
    assert plan(["compile_mode=reduce-overhead"]) == (True, True, False)        # per-block graphs instead
    assert plan(["compile_mode=reduce-overhead", "parallel.activation_checkpointing=full"]) == (True, True, False)
    # where auto leaves it off: two ranks, accumulation, checkpointing, fp8, an autoencoder
    assert plan([], world_size=2) == (True, False, False)
    assert plan(["micro_batch=32"]) == (True, False, False)
    assert plan(["parallel.activation_checkpointing=full"]) == (True, False, False)
    assert plan(["precision=fp8-rowwise"]) == (True, False, False)
    assert plan(["model.name=autoencoder", "model.preset=Seed-f8c16", "data.resolution=64",
                 "data.channels=3"]) == (True, False, False)


def test_the_rule_counts_the_micro_batch_multiply_adds(monkeypatch):
    from archirf.models import build_model

    cfg = load_config(None, [])
    torch.manual_seed(0)
    assert trainer._step_macs(cfg, Env(torch.device("cuda"), world_size=1)) == \
        build_model(cfg).flops_per_image() * cfg.global_batch
    monkeypatch.setattr(trainer, "SMALL_STEP_MACS", 1e6)      # the same job, counted large
    assert plan([]) == (True, False, False)


def test_auto_leaves_rocm_alone(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    assert plan([]) == (True, False, False)


@pytest.mark.parametrize("extra,device,world_size,match", [
    ([], "cpu", 1, "cuda_graph=on replays the step as a CUDA graph, and this run is on cpu: run on a GPU, or set "
                   "cuda_graph=off"),
    ([], "cuda", 2, "one rank without FSDP2; this run shards the model over 2 ranks: set cuda_graph=off"),
    (["parallel.shard_single_rank=true"], "cuda", 1, "set parallel.shard_single_rank=false, or set cuda_graph=off"),
    (["micro_batch=32"], "cuda", 1, "one micro-batch per step; this run accumulates 4 .*set micro_batch=128, or set "
                                    "cuda_graph=off"),
    (["parallel.activation_checkpointing=selective"], "cuda", 1, "saves and restores the random state"),
    (["compile_mode=reduce-overhead"], "cuda", 1, "both replay CUDA graphs"),
    (AE + ["compile_mode=reduce-overhead"], "cuda", 1, "an autoencoder's captured step .*: set cuda_graph=off"),
    (AE, "cuda", 1, "an autoencoder's captured step has not matched its eager step on a GPU yet .*: set "
                    "cuda_graph=off"),
])
def test_cuda_graph_on_is_refused_where_it_cannot_run(extra, device, world_size, match):
    with pytest.raises(ConfigError, match=match):
        plan(["cuda_graph=on", *extra], device=device, world_size=world_size)


def test_compile_mode_is_refused_where_the_run_cannot_use_it():
    assert plan(["compile_mode=max-autotune-no-cudagraphs"]) == (True, False, False)
    # a mode asks for compile: a captured small step then holds the tuned kernels
    assert plan(["compile_mode=max-autotune-no-cudagraphs", "cuda_graph=on"]) == (True, False, True)
    assert plan(["compile_mode=max-autotune-no-cudagraphs", "compile=on"], device="cpu") == (True, False, False)
    with pytest.raises(ConfigError, match="replays CUDA graphs, and this run is on cpu: run on a GPU, or use "
                                          "compile_mode=default"):
        plan(["compile_mode=reduce-overhead", "compile=on"], device="cpu")
    with pytest.raises(ConfigError, match="compiles nothing"):
        plan(["compile_mode=reduce-overhead"], device="cpu")
    with pytest.raises(ConfigError, match="compiles nothing"):
        plan(["compile_mode=max-autotune-no-cudagraphs", "compile=off"])
    with pytest.raises(ConfigError, match="one micro-batch per step; this run accumulates 4"):
        plan(["compile_mode=reduce-overhead", "micro_batch=32"])
    with pytest.raises(ConfigError, match="one rank without FSDP2"):
        plan(["compile_mode=reduce-overhead"], world_size=2)
    with pytest.raises(ConfigError, match="shard_single_rank=true shards the model on this one: set "
                                          "parallel.shard_single_rank=false, or use compile_mode=default"):
        plan(["compile_mode=reduce-overhead", "parallel.shard_single_rank=true"])
    with pytest.raises(ConfigError, match=r"for generative runs; .*several passes: use compile_mode=default$"):
        plan(["compile_mode=reduce-overhead"] + AE)
    with pytest.raises(ConfigError):
        load_config(None, ["compile_mode=fast"])


class _EagerGraph:
    """StepGraph's contract without CUDA, for the tasks' side of it: each call writes the gradients afresh."""

    def __init__(self, step_fn, params, buffers=(), warmup=2):
        self.step_fn, self.params, self.calls = step_fn, params, 0

    def __call__(self, *inputs):
        self.calls += 1
        for p in self.params:
            p.grad = None
        return self.step_fn(*inputs)


@pytest.fixture
def eager_graphs(monkeypatch):
    """The trainer's cuda_graph path on the CPU: the plan says capture, the graph runs eagerly."""
    from archirf import step_graph

    made = []

    def make(*args, **kwargs):
        made.append(_EagerGraph(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(step_graph, "StepGraph", make)
    monkeypatch.setattr(trainer, "_plan_compile", lambda cfg, env: (False, False, cfg.cuda_graph == "on"))
    return made


def _tiny(path, *extra):
    from test_trainer import TINY

    return trainer.train(load_config(None, TINY + [f"run_dir={path}", "device=cpu", "log_every=16", "checkpoint_every=0",
                                                   "sample_every=0", *extra]))


def test_the_tasks_graph_path_trains_as_the_eager_one(tmp_path, eager_graphs):
    extra = ["nan_policy=skip"]         # the skip policy's finiteness check after each replay
    eager = _tiny(tmp_path / "a", "total_images=96", *extra)
    graph = _tiny(tmp_path / "b", "total_images=96", "cuda_graph=on", *extra)
    assert losses(graph) == losses(eager) and len(losses(graph)) == 6
    assert len(eager_graphs) == 1 and eager_graphs[0].calls == 6         # one graph, every step through it
    se, sg = (ckpt.load_snapshot(ckpt.latest_snapshot(r))[0] for r in (eager, graph))
    assert all(torch.equal(se[k], sg[k]) for k in se)


def test_the_autoencoder_gets_one_graph_per_phase(tmp_path, eager_graphs):
    from test_autoencoder import AE_TINY

    ae = AE_TINY + ["data.channels=1", "loss.perceptual_weight=0", "loss.disc_start=48", "total_images=96",
                    "log_every=16", "checkpoint_every=0", "device=cpu"]
    runs = [trainer.train(load_config(None, ae + [f"run_dir={tmp_path / n}", *x]))
            for n, x in (("a", []), ("b", ["cuda_graph=on"]))]
    a, b = (metric_lines(r) for r in runs)
    timing = ("per_s", "per_gpu", "frac", "paused", "mfu", "elapsed", "time")
    strip = lambda rows: [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows]
    assert strip(a) == strip(b)
    assert "d_loss" in b[-1] and "d_loss" not in b[0]
    assert len(eager_graphs) == 2 and [g.calls for g in eager_graphs] == [3, 3]    # before and after disc_start


# -- on a GPU --------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")

RUN = ["total_images=2560", "log_every=128", "checkpoint_every=0", "sample_every=0", "progress=false", "compile=off"]
SHORT = RUN + ["sample.steps=4"]
FAMILIES = {
    "dit": [],
    "dit_ddpm": ["--config", "configs/digits_ddpm.yaml"],
    "mmdit": ["--config", "configs/mmdit_digits.yaml"],
    "adm_unet": ["--config", "configs/adm_digits.yaml"],
    "edm2_unet": ["--config", "configs/edm2_digits.yaml"],
}


def _train(path, extra, base=SHORT):
    args = list(extra)
    config = None
    if args[:1] == ["--config"]:
        config, args = args[1], args[2:]
    return trainer.train(load_config(config, base + args + [f"run_dir={path}"]))


@gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_the_captured_step_trains_as_the_eager_one(tmp_path, family):
    eager = _train(tmp_path / "eager", FAMILIES[family] + ["cuda_graph=off"])
    graph = _train(tmp_path / "graph", FAMILIES[family] + ["cuda_graph=on"])
    le, lg = losses(eager), losses(graph)
    assert [i for i, _ in le] == [i for i, _ in lg] and len(le) == 20
    for (_, a), (_, b) in zip(le, lg):      # the same kernels on the same draws
        assert abs(a - b) <= 1e-4 * max(abs(a), 1e-3), (le, lg)
    assert len({round(b, 6) for _, b in lg}) == len(lg)        # every replay drew afresh (no repeated step)
    se, sg = (ckpt.load_snapshot(ckpt.latest_snapshot(r))[0] for r in (eager, graph))
    for k in se:
        torch.testing.assert_close(sg[k], se[k], rtol=1e-3, atol=1e-4, msg=k)


@gpu
def test_the_captured_step_resumes_exactly(tmp_path):
    straight = _train(tmp_path / "a", ["cuda_graph=on", "checkpoint_every=1280"])
    _train(tmp_path / "b", ["cuda_graph=on", "total_images=1280"])
    _train(tmp_path / "b", ["cuda_graph=on"])      # resumes at 1,280 images, captures after loading the weights
    assert losses(straight) == losses(tmp_path / "b")


def test_the_default_is_auto():
    assert load_config(None, []).cuda_graph == "auto"


def _plain(overrides, step_graph=True, use_compile=False, recipe=None):
    cfg = load_config(recipe, overrides)
    return cfg, *trainer._plain_ops(cfg, Env(torch.device("cuda"), world_size=1), step_graph, use_compile)


def test_an_eager_captured_small_step_builds_its_networks_with_plain_pytorch_ops():
    """auto's fused ops cost their Triton compilation at the start and save little or nothing in a small captured
    step: it builds its networks with kernels=reference, attn_impl=sdpa and the unfused update; the recorded config
    keeps auto, the weights are the same tensors either way (checkpoints and sampling do not care), and what the user
    chose stays."""
    from archirf.models import build_model

    for family, keys in {"dit": ["model.kernels", "model.attn_impl", "optim.fused_update"],
                         "mmdit": ["model.kernels", "model.attn_impl", "optim.fused_update"],
                         "adm_unet": ["model.attn_impl", "optim.fused_update"],
                         "edm2_unet": ["model.kernels"]}.items():          # (EDM2's update is never fused)
        cfg, built, changed = _plain([], recipe=f"configs/{family.split('_')[0]}_digits.yaml"
                                     if family != "dit" else None)
        assert cfg.model.name == family and changed == keys
        assert (built.model.kernels, built.model.attn_impl, built.optim.fused_update) == (
            "reference" if cfg.model.kernels else None, "sdpa" if cfg.model.attn_impl else None, False)
        assert (cfg.model.kernels, cfg.model.attn_impl) == (built.model.kernels and "auto",
                                                            built.model.attn_impl and "auto")
        torch.manual_seed(0)
        ours = build_model(built)
        torch.manual_seed(0)
        theirs = build_model(cfg)
        assert {m.kernels for m in ours.modules() if hasattr(m, "kernels")} <= {"reference"}
        assert {m.attn_impl for m in ours.modules() if hasattr(m, "attn_impl")} <= {"sdpa"}
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg, built, _ = _plain(["model.qk_norm=true"])
    assert (cfg.model.attn_impl, built.model.attn_impl) == ("auto", "sdpa")
    for keep in (dict(step_graph=True, use_compile=True), dict(step_graph=False, use_compile=False)):
        cfg, built, changed = _plain([], **keep)           # compiled inside the graph, or not captured: as asked
        assert built is cfg and changed == []
    cfg, built, changed = _plain(XL + ["cuda_graph=on", "compile=off"])   # a large step: the fused ops save traffic
    assert built is cfg and changed == []
    cfg, built, changed = _plain(["model.kernels=triton", "model.attn_impl=triton", "optim.fused_update=true"])
    assert built is cfg and changed == []
    cfg, built, changed = _plain(["model.name=mmdit", "model.attn_backend=fused"])
    assert (built.model.kernels, built.model.attn_impl, built.model.attn_backend) == ("reference", "auto", "fused")
    assert changed == ["model.kernels", "optim.fused_update"]


def test_the_run_says_which_auto_choices_the_captured_step_resolved(tmp_path, eager_graphs, capsys):
    run = _tiny(tmp_path, "total_images=32", "cuda_graph=on")
    out = capsys.readouterr().out
    assert ("so model.kernels, model.attn_impl, optim.fused_update resolve to plain PyTorch" in out
            and "(set model.kernels=triton / model.attn_impl=triton / optim.fused_update=true" in out), out
    assert "kernels: auto" in (run / "config.yaml").read_text()
    _tiny(tmp_path / "b", "total_images=32")
    assert "resolve" not in capsys.readouterr().out


@gpu
def test_auto_captures_the_digits_step_on_a_gpu(tmp_path, capsys):
    run = trainer.train(load_config(None, ["total_images=1280", "log_every=640", "checkpoint_every=0",
                                           "sample_every=0", "progress=false", "sample.steps=4", "cuda_graph=auto",
                                           f"run_dir={tmp_path}"]))
    out = capsys.readouterr().out
    assert "step as one CUDA graph" in out and "compile=False" in out
    assert "resolve to plain PyTorch" in out and "AdamW + EMAs in one pass" not in out
    assert "kernels: auto" in (run / "config.yaml").read_text()       # what was asked for, as asked
    assert len(losses(run)) == 2


@gpu
@pytest.mark.parametrize("cudnn,fp32", [(True, False), (False, False), (True, True)], ids=["cudnn", "no_cudnn", "fp32"])
def test_the_captured_autoencoder_step_trains_as_the_eager_one_across_disc_start(tmp_path, monkeypatch, cudnn, fp32):
    """Two graphs, before and after disc_start (the GAN's passes join there), against the eager step; LPIPS off (its
    weights are not here), the discriminator's hinge and the adaptive weight on. The trainer refuses cuda_graph=on
    for an autoencoder until this passes: the plan is forced here. Two eager runs first, for the spread that the
    GPU's own non-determinism gives (atomics in the convolutions' and norms' weight gradients), which the GAN
    amplifies: the graph must stay within a few times it. With cuDNN on, an H100 run differed by 30 times the
    eager spread in the gradient norm within 8 steps, before disc_start; the run without cuDNN (its convolutions
    on other kernels) tells whether the capture or cuDNN's choice of convolution algorithms under it is why. In fp32
    without TF32 two algorithms' sums differ far below the bound's floor, so a capture that computes something
    else fails there whatever the algorithms."""
    from archirf import parallel

    monkeypatch.setattr(trainer, "_plan_compile", lambda cfg, env: (False, False, cfg.cuda_graph == "on"))
    monkeypatch.setattr(torch.backends.cudnn, "enabled", cudnn)
    if fp32:                                    # the trainer turns TF32 on when it picks the device: off again
        pick = parallel._pick_device

        def no_tf32(cfg):
            device = pick(cfg)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            return device
        monkeypatch.setattr(parallel, "_pick_device", no_tf32)
    extra = ["--config", "configs/ae_digits.yaml", "global_batch=32", "log_every=64", "loss.disc_start=640",
             "loss.perceptual_weight=0", "total_images=1280"] + (["precision=fp32"] if fp32 else [])
    eager, again = (_train(tmp_path / n, extra + ["cuda_graph=off"], base=RUN) for n in ("eager", "again"))
    graph = _train(tmp_path / "graph", extra + ["cuda_graph=on"], base=RUN)
    me, ma, mg = (metric_lines(r) for r in (eager, again, graph))
    assert len(me) == len(ma) == len(mg) == 20
    for a, b, c in zip(me, ma, mg):         # row by row: the GAN's rows must not set the bound for the early ones
        for key in ("loss", "l1", "d_loss", "adaptive_weight", "grad_norm"):
            if key in a:
                rel = lambda u, v: abs(u - v) / max(abs(u), 1e-3)
                assert rel(a[key], c[key]) <= 3 * rel(a[key], b[key]) + 1e-4, (a["images_seen"], key, a, b, c)
    assert "d_loss" in mg[-1] and "d_loss" not in mg[0]      # both phases ran


def metric_lines(run):
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@gpu
def test_step_graph_writes_fresh_gradients_into_the_same_tensors_and_restores_buffers():
    from archirf.step_graph import StepGraph

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.BatchNorm1d(33), torch.nn.GELU(),
                              torch.nn.Dropout(0.3), torch.nn.Linear(33, 5)).cuda()
    twin = copy.deepcopy(net)
    params = list(net.parameters())

    def step(x):
        loss = net(x).square().mean()
        loss.backward()
        return loss

    graph = StepGraph(step, params, list(net.buffers()))
    opt = torch.optim.SGD(params, lr=0.1)
    topt = torch.optim.SGD(twin.parameters(), lr=0.1)
    ptrs = None
    for i in range(4):
        x = torch.randn(16, 7, device="cuda")
        torch.manual_seed(100 + i)
        loss = graph(x).clone()
        torch.manual_seed(100 + i)
        twin_loss = twin(x).square().mean()
        twin_loss.backward()
        assert torch.allclose(loss, twin_loss, rtol=1e-5), i         # the same dropout draws, the same statistics
        for p, q in zip(params, twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
        ptrs = ptrs or [p.grad.data_ptr() for p in params]
        assert [p.grad.data_ptr() for p in params] == ptrs           # the graph's tensors, rewritten in place
        opt.step()
        topt.step()
        topt.zero_grad(set_to_none=True)
    for b, c in zip(net.buffers(), twin.buffers()):                  # the warm-up's statistics were put back
        torch.testing.assert_close(b, c)


@gpu
def test_the_captured_step_holds_compiled_kernels(tmp_path):
    eager = _train(tmp_path / "eager", ["compile=on", "cuda_graph=off"])
    graph = _train(tmp_path / "graph", ["compile=on", "cuda_graph=on"])
    for (_, a), (_, b) in zip(losses(eager), losses(graph)):
        assert abs(a - b) <= 1e-4 * max(abs(a), 1e-3)
