"""precision=fp8-tensorwise | fp8-rowwise (archirf/fp8.py): which linear layers get fp8 GEMMs and which stay
bf16, the swap keeping parameter names (checkpoints, EMA and sampling unchanged), its numerics against bf16
in torchao's CPU emulation, a short training run and its resume in bf16, and the one-line refusals (no fp8
GPU, another model family). Speed and the long-run loss curve are GPU measurements (docs/performance.md)."""

import pytest
import torch

from archirf import fp8, parallel
from archirf.config import ConfigError, load_config
from archirf.models import build_model
from archirf.trainer import train
from test_trainer import TINY, losses

pytest.importorskip("torchao.float8")

XL = {"dit": ["model.name=dit", "model.preset=DiT-XL/2"],
      "mmdit": ["model.name=mmdit", "model.preset=MMDiT-XL/2"]}


def _meta_blocks(overrides):
    cfg = load_config(None, overrides)
    with torch.device("meta"):
        return build_model(cfg).blocks


def _kinds(names):
    return sorted({n.split(".", 1)[1] for n in names})


def test_plan_dit_xl2_per_recipe():
    blocks = _meta_blocks(XL["dit"])
    tw, rw = fp8.plan(blocks, "fp8-tensorwise"), fp8.plan(blocks, "fp8-rowwise")
    # width 1152: every per-token GEMM passes torchao's tensorwise size filter; rowwise gains only on fc1
    # (1152 -> 4608); the modulation (one row per sample) is never converted
    assert _kinds(tw.convert) == ["attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2"]
    assert len(tw.convert) == 4 * len(blocks)
    assert _kinds(rw.convert) == ["mlp.fc1"]
    assert rw.skipped["0.attn.qkv"].endswith("too small to gain (rowwise recipe)")
    for p in (tw, rw):
        assert p.skipped["0.adaLN_modulation.1"] == "not a per-token layer"


def test_plan_mmdit_skips_the_context_stream():
    blocks = _meta_blocks(XL["mmdit"])
    p = fp8.plan(blocks, "fp8-tensorwise")
    assert p.convert and all(".ctx." not in f".{n}" for n in p.convert)
    assert any(".img.attn.qkv" in f".{n}" for n in p.convert)
    ctx = [n for n in p.skipped if ".ctx." in f".{n}" and n.endswith("mlp.fc1")]
    assert ctx and all(p.skipped[n] == "context stream: few tokens" for n in ctx)


def test_plan_refuses_misaligned_dims():
    blocks = _meta_blocks(["model.name=dit", "model.hidden_size=40", "model.num_heads=2", "model.depth=1"])
    p = fp8.plan(blocks, "fp8-tensorwise", size_filter=False)
    assert "0.attn.qkv" in p.skipped and "not divisible by 16" in p.skipped["0.attn.qkv"]
    # 40 x 160 (fc1) is also misaligned; none converted
    assert p.convert == []


@pytest.mark.parametrize("precision", list(fp8.PRECISIONS))
def test_convert_keeps_names_and_matches_bf16(precision):
    from torchao.float8.float8_linear import Float8Linear

    cfg = load_config(None, ["model.name=dit", "model.hidden_size=64", "model.num_heads=2", "model.depth=2",
                             "data.resolution=8"])
    torch.manual_seed(0)
    ref = build_model(cfg)
    model = build_model(cfg)
    model.load_state_dict(ref.state_dict())
    chosen = fp8.convert(model.blocks, precision, size_filter=False, emulate=True)
    assert _kinds(chosen.convert) == ["attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2"]
    for name in chosen.convert:
        assert isinstance(model.blocks.get_submodule(name), Float8Linear)
    assert not isinstance(model.blocks.get_submodule("0.adaLN_modulation.1"), Float8Linear)
    assert model.state_dict().keys() == ref.state_dict().keys()
    # the final layer and the modulation start at zero (adaLN-Zero): give them weights so the blocks count
    with torch.no_grad():
        for m in (ref, model):
            torch.manual_seed(1)
            for p in m.parameters():
                if not p.any():
                    p.normal_(0, 0.02)
    gen = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(8, 1, 8, 8, generator=gen), torch.rand(8, generator=gen), torch.arange(8) % 10
    outs, grads = [], []
    for m in (ref, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, t, y).float()
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(m.blocks[0].mlp.fc1.weight.grad.clone())
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    # e4m3 keeps 3 mantissa bits (relative rounding up to 2^-4): a few percent, not more
    assert rel(outs[1], outs[0]) < 0.1 and rel(grads[1], grads[0]) < 0.2
    assert rel(outs[1], outs[0]) > 0        # the conversion is live: fp8 rounding changed something


def test_training_in_emulated_fp8_and_resume_in_bf16(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    common = ["model.hidden_size=64", "log_every=16", "checkpoint_every=0", "sample_every=0"]
    run = train(load_config(None, TINY + common + [f"run_dir={tmp_path}", "total_images=48",
                                                 "precision=fp8-tensorwise"]))
    out = capsys.readouterr().out
    assert "fp8-tensorwise: fp8 GEMMs in 8 linear layers of the blocks" in out
    first = losses(run)
    assert len(first) == 3 and all(torch.isfinite(torch.tensor(v)) for _, v in first)
    # the checkpoint holds the same parameter names: the run continues in bf16
    monkeypatch.delenv(fp8.EMULATE_ENV)
    train(load_config(None, TINY + common + [f"run_dir={tmp_path}", "total_images=80", "precision=bf16"]))
    assert [i for i, _ in losses(run)] == [16, 32, 48, 64, 80]


def test_no_fp8_gpu_is_a_one_line_error_before_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(fp8.EMULATE_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"precision=fp8-rowwise needs a CUDA GPU with fp8 tensor cores"):
        train(load_config(None, TINY + [f"run_dir={tmp_path / 'run'}", "precision=fp8-rowwise", "device=cpu"]))
    assert not (tmp_path / "run").exists()


def test_a_plan_that_converts_nothing_is_refused(tmp_path, monkeypatch):
    # on an fp8 GPU (stood in for here) the rowwise recipe's size rule converts no layer of a small DiT: training on
    # would be bf16 under an fp8 name, so the run stops first, before its run dir exists
    monkeypatch.delenv(fp8.EMULATE_ENV, raising=False)
    monkeypatch.setattr(fp8, "_check_runtime", lambda *a: None)
    with pytest.raises(ConfigError, match=r"precision=fp8-rowwise converts no linear layer of this model "
                                          r"\(.*too small to gain.*\): it would train in bf16; use precision=bf16 or "
                                          r"fp8-tensorwise"):
        train(load_config(None, TINY + [f"run_dir={tmp_path / 'run'}", "precision=fp8-rowwise"]))
    assert not (tmp_path / "run").exists()


def test_fp8_refuses_other_families():
    with pytest.raises(ConfigError, match=r"precision=fp8-tensorwise: fp8 GEMMs are for the transformers"):
        load_config(None, ["model.name=edm2_unet", "precision=fp8-tensorwise"])


def test_missing_torchao_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_torchao(name, *a, **k):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(fp8.Fp8Error, match=r"pip install -e '\.\[fp8\]'"):
        fp8.check("fp8-tensorwise", "dit", torch.device("cpu"))


def test_autocast_dtype_of_fp8_is_bf16():
    assert parallel.autocast_dtype("fp8-rowwise", torch.device("cpu")) == torch.bfloat16


def test_fsdp2_unit_and_plain_module_agree(monkeypatch):
    # the conversion happens on the meta device before fully_shard (FSDP2, one rank here) as well as on the plain
    # module: both paths compute the same fp8 forward
    from test_precision import _first_block_io

    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    over = ["model.name=dit", "model.depth=2", "model.hidden_size=64", "model.num_heads=2",
            "precision=fp8-tensorwise"]
    monkeypatch.setattr(parallel.fp8, "convert", _counting(fp8.convert))
    plain, plain_out = _first_block_io(over, shard=False, device="cpu", precision=None)
    sharded, sharded_out = _first_block_io(over, shard=True, device="cpu", precision=None)
    assert _counting.calls == [8, 8]
    torch.testing.assert_close(plain_out, sharded_out, rtol=2e-2, atol=2e-2)


def _counting(fn):
    _counting.calls = []

    def wrapped(*a, **k):
        chosen = fn(*a, **k)
        _counting.calls.append(len(chosen.convert))
        return chosen
    return wrapped


def test_convergence_script_dry_run(tmp_path, monkeypatch):
    # benchmarks/fp8_convergence.py end to end at toy size in the emulation: curves, verdicts, the plot
    import json

    from benchmarks import fp8_convergence

    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    rc = fp8_convergence.main(["--out", str(tmp_path), "--images", "64", "--precisions", "bf16,fp8-tensorwise",
                               "--tolerance", "10", "model.preset=null", "model.hidden_size=64", "model.depth=1",
                               "model.num_heads=2", "data.resolution=8", "global_batch=16", "compile=off"])
    assert rc == 0
    doc = json.loads((tmp_path / "fp8_convergence.json").read_text())
    assert set(doc["curves"]) == {"bf16", "fp8-tensorwise"} and len(doc["curves"]["bf16"]) == 4
    assert doc["verdict"]["bf16"]["relative_to_bf16"] == 0 and (tmp_path / "fp8_loss.png").stat().st_size > 0
    assert doc["converted"]["fp8-tensorwise"] == ["0.attn.qkv", "0.attn.proj", "0.mlp.fc1", "0.mlp.fc2"]
    assert fp8.SIZE_FILTER      # the script's setting does not outlive it
