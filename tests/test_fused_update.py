"""optim.fused_update: clipping's scale, AdamW and every EMA (post-hoc ones included) in one kernel pass
(archirf_kernels.adamw_ema_step) inside the trainer, against the unfused path (clip_grad_norm_'s scaling, torch's
fused AdamW, one lerp per EMA): the same losses and EMA weights to fp32 rounding, an exact resume, the optimizer
state torch's, and the refusals. The kernel runs in Triton's interpreter here (tests/conftest.py)."""

import pytest
import torch
from safetensors.torch import load_file

from archirf import checkpoint as ckpt
from archirf.config import ConfigError, load_config
from archirf.trainer import train
from test_trainer import TINY, losses

COMMON = ["log_every=16", "checkpoint_every=0", "sample_every=0", "optim.grad_clip=0.05", "optim.weight_decay=0.01",
          "optim.warmup_images=0", "ema.posthoc_sigma_rels=[0.05,0.1]", "ema.posthoc_every=64"]


@pytest.fixture(autouse=True)
def _interpreter_chunks(monkeypatch):
    """Chunks of 1024 elements, not the interpreter's default 64: these runs test the trainer's use of the kernel
    (tests/test_kernels_optim.py covers small chunks and tails), and the interpreter's cost is per program."""
    from archirf_kernels import optim

    monkeypatch.setattr(optim, "INTERPRETER_BLOCK", 1024)


def _run(path, *extra):
    return train(load_config(None, TINY + COMMON + [f"run_dir={path}", *extra]))


def _snapshot(run):
    return ckpt.load_snapshot(ckpt.latest_snapshot(run))[0]


MODELS = {"dit": [], "mmdit": ["model.name=mmdit"],          # the families the default turns it on for (CUDA)
          "adm_unet": ["model.name=adm_unet", "model.channels=32", "model.channel_mult=[1]", "model.num_res_blocks=1",
                       "model.hidden_size=null", "model.depth=null", "model.num_heads=null",
                       "model.num_register_tokens=null"]}


@pytest.mark.parametrize("model", MODELS)
def test_fused_update_matches_the_unfused_step(tmp_path, model):
    unfused = _run(tmp_path / "a", "total_images=96", "optim.fused_update=false", *MODELS[model])
    fused = _run(tmp_path / "b", "total_images=96", "optim.fused_update=true", *MODELS[model])
    la, lb = losses(unfused), losses(fused)
    assert [i for i, _ in la] == [i for i, _ in lb]
    for (_, a), (_, b) in zip(la, lb):
        assert abs(a - b) <= 1e-4 * max(abs(a), 1.0), (la, lb)
    sa, sb = _snapshot(unfused), _snapshot(fused)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=k)
    # the clipping was live (grad_clip 0.05 is below these gradients' norms), so its scale was applied
    norms = [r["grad_norm"] for r in map(__import__("json").loads, (fused / "metrics.jsonl").read_text().splitlines())]
    assert min(norms) > 0.05
    # the post-hoc EMAs went through the same pass
    pa, pb = (sorted((r / "posthoc").glob("*.safetensors")) for r in (unfused, fused))
    assert [p.name for p in pa] == [p.name for p in pb] and pa
    for x, y in zip(pa, pb):
        ta, tb = load_file(x), load_file(y)
        for k in ta:        # (stored in reduced precision: one rounding step apart at most)
            torch.testing.assert_close(tb[k].float(), ta[k].float(), rtol=1e-3, atol=5e-5)


def test_fused_update_resumes_exactly(tmp_path):
    straight = _run(tmp_path / "a", "total_images=96", "optim.fused_update=true")
    _run(tmp_path / "b", "total_images=48", "optim.fused_update=true")
    _run(tmp_path / "b", "total_images=96", "optim.fused_update=true")
    assert losses(straight) == losses(tmp_path / "b")
    a, b = _snapshot(straight), _snapshot(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,match", [
    (["model.name=edm2_unet"], "normalises its weights between the step and the EMA"),
    (["model.name=autoencoder", "data.resolution=64"], "trains two networks with their own optimizers"),
    (["ema.posthoc_sigma_rels=[0.01,0.02,0.05,0.1]"], "at most 4 EMAs in its pass"),
])
def test_fused_update_refusals(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["optim.fused_update=true", *extra])


@pytest.mark.parametrize("extra,resolved", [
    ([], None),                                 # null stays: the task turns it on where the run is on CUDA
    (["model.name=mmdit"], None), (["model.name=adm_unet"], None),
    (["model.name=edm2_unet"], False), (["model.name=autoencoder", "data.resolution=64"], False),
    (["ema.posthoc_sigma_rels=[0.01,0.02,0.05,0.1]", "ema.posthoc_every=64"], False),
    (["optim.fused_update=false"], False),
])
def test_fused_update_defaults_to_on_where_it_applies(extra, resolved):
    assert load_config(None, extra).optim.fused_update is resolved


def test_the_default_run_fuses_the_update_on_cuda_only(tmp_path, monkeypatch):
    """optim.fused_update unset: the one-pass update on CUDA (every step after the first), torch's AdamW and the
    lerps on a CPU, where the kernel would run in Triton's interpreter."""
    from archirf.optim import AdamW

    taken = []
    real = AdamW.fused_update
    monkeypatch.setattr(AdamW, "fused_update", lambda self, *a: taken.append(real(self, *a)) or taken[-1])
    from archirf.tasks.generative import GenerativeTask

    lines = []
    describe = GenerativeTask.describe
    monkeypatch.setattr(GenerativeTask, "describe", lambda self: lines.append(describe(self)) or lines[-1])
    _run(tmp_path, "total_images=48")       # 3 steps; the first creates the optimizer state (unfused)
    assert ("AdamW + EMAs in one pass" in lines[0]) == torch.cuda.is_available()     # the run's first line says so
    if torch.cuda.is_available():
        assert taken[-2:] == [True, True] and len(taken) <= 3, taken
    else:
        assert taken == []


def test_the_default_leaves_rocm_machines_without_triton_and_the_interpreter_unfused(monkeypatch):
    import archirf_kernels
    from archirf.tasks.generative import _fused_update_applies
    from archirf_kernels import optim

    cuda = torch.device("cuda")
    monkeypatch.setattr(optim, "INTERPRETED", False)
    monkeypatch.setattr(torch.version, "hip", None)
    assert _fused_update_applies(cuda) and not _fused_update_applies(torch.device("cpu"))
    monkeypatch.setattr(optim, "INTERPRETED", True)
    assert not _fused_update_applies(cuda)
    monkeypatch.setattr(optim, "INTERPRETED", False)
    monkeypatch.setattr(archirf_kernels, "HAS_TRITON", False)
    assert not _fused_update_applies(cuda)
    monkeypatch.setattr(archirf_kernels, "HAS_TRITON", True)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert not _fused_update_applies(cuda)


def test_fused_update_needs_cuda_outside_the_interpreter(tmp_path, monkeypatch):
    from archirf.tasks.generative import _check_fused_update
    from archirf_kernels import optim

    monkeypatch.setattr(optim, "INTERPRETED", False)
    msg = "optim.fused_update runs a Triton kernel on CUDA; this run is on cpu"
    with pytest.raises(ConfigError, match=msg):
        _check_fused_update(torch.device("cpu"))
    if not torch.cuda.is_available():       # a whole run stops with it (on a GPU machine the run is on CUDA)
        with pytest.raises(ConfigError, match=msg):
            _run(tmp_path, "total_images=32", "optim.fused_update=true")
