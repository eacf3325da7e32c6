"""archirf_kernels.integrations.diffusers: small random-weight diffusers models (SD3.5-shaped with QK RMSNorm and
dual attention, SD3.0-shaped without QK norm, DiT) patched with `apply` against unpatched copies: the output and
every parameter's gradient (SD3 under each attention backend); the report (what changed, what was left alone
and why); `remove`; the per-call fallback (an attention mask); no diffusers class touched; the benchmark's smoke
run. fp32 in Triton's interpreter on a CPU (impl="triton"); on a GPU the same tests run the kernels for real, in
bf16 autocast too."""

import copy
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from archirf_kernels.integrations import diffusers as ak  # noqa: E402

IMPL = "triton"             # the kernels: on a GPU for real, in Triton's interpreter on a CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = 2


def _sd3(qk_norm="rms_norm", dual=(0,)):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
                                  dual_attention_layers=dual, qk_norm=qk_norm)
    _randomise(model)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(B, 4, 8, 8, generator=gen),
                  encoder_hidden_states=torch.randn(B, 5, 24, generator=gen),
                  pooled_projections=torch.randn(B, 16, generator=gen), timestep=torch.tensor([3.0, 700.0]))
    return _on_device(model, inputs)


def _dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    _randomise(model)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(B, 4, 8, 8, generator=gen), timestep=torch.tensor([3, 700]),
                  class_labels=torch.tensor([1, 7]))
    return _on_device(model, inputs)


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=12, axes_dims_rope=(2, 2, 4))
    _randomise(model)
    gen = torch.Generator().manual_seed(1)
    n_img, n_txt = 12, 5
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(n_img, 3)
    inputs = dict(hidden_states=torch.randn(B, n_img, 8, generator=gen),
                  encoder_hidden_states=torch.randn(B, n_txt, 16, generator=gen),
                  pooled_projections=torch.randn(B, 12, generator=gen), timestep=torch.tensor([0.1, 0.9]),
                  img_ids=img_ids,      # distinct text positions (Flux's are zeros): a position off by one shows
                  txt_ids=torch.stack([torch.zeros(n_txt), 10.0 + torch.arange(n_txt), torch.arange(n_txt)], -1))
    return _on_device(model, inputs)


def _on_device(model, inputs):
    return model.to(DEVICE), {k: v.to(DEVICE) for k, v in inputs.items()}


def _randomise(model):
    """adaLN-Zero starts at zero (every block the identity): random weights everywhere, so every op counts."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1))
            if ".norm_" in name:        # QK-norm gains: logits far from uniform, so the attention's scale matters
                p.add_(3.0)


def _run(model, inputs, amp=None, cotangent_scale=1.0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)        # the same draws in both runs (DiT's label dropout in training mode)
    with torch.autocast(DEVICE, dtype=amp or torch.float32, enabled=amp is not None):
        out = model(**inputs, return_dict=False)[0]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE) * cotangent_scale
    (out.float() * w).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(ref, ours, tol=2e-5, grad_tol=2e-4):
    """Output and every gradient within fp32 rounding of diffusers' own: error norm against the tensor's norm (the
    kernels sum in another order), with an absolute floor for gradients that are zero in exact arithmetic (a key
    bias shifts every logit of a query alike: its gradient is rounding noise on both sides)."""
    err = lambda a, b: (a - b).norm().item()
    out_r, grads_r = ref
    out_o, grads_o = ours
    assert err(out_o, out_r) < tol * out_r.norm().item()
    assert grads_o.keys() == grads_r.keys() and grads_r
    floor = 1e-5 * max(g.norm().item() for g in grads_r.values())       # fp32 noise of the largest gradients
    for n in grads_r:
        assert err(grads_o[n], grads_r[n]) < grad_tol * grads_r[n].norm().item() + floor, n


def _spy_attention_backend(monkeypatch) -> list[str]:
    """The backends the attention ops resolve to, call by call."""
    from archirf_kernels import attention

    chosen, choose = [], attention.choose_backend
    monkeypatch.setattr(attention, "choose_backend", lambda *a: chosen.append(choose(*a)) or chosen[-1])
    return chosen


@pytest.mark.parametrize("backend", ["fused", "sdpa"])     # sdpa: the path every real SD3 size takes
@pytest.mark.parametrize("qk_norm,dual", [("rms_norm", (0,)), (None, ())], ids=["sd35", "sd30"])
def test_sd3_patched_matches_diffusers(qk_norm, dual, backend, monkeypatch):
    model, inputs = _sd3(qk_norm, dual)
    patched = copy.deepcopy(model)
    report = ak.apply(patched, impl=IMPL, backend=backend)
    kinds = [c.split(": ", 1)[1] for c in report.changed]
    what = "QK-norm attention" if qk_norm else "attention (no QK norm)"      # reported by what runs
    assert kinds.count(f"joint {what}") == 2                            # both blocks' joint attention
    assert kinds.count(what) == len(dual)                               # SD3.5's second attention
    # norm1 of the non-dual block and norm1_context of the first block; SD3.5's dual block's norm1; the last block's
    # norm1_context and norm_out (continuous)
    assert kinds.count("adaLN-Zero modulated LayerNorm") == 2 - len(dual) + 1
    assert kinds.count("adaLN-Zero LayerNorm, two modulations (SD3.5)") == len(dual)
    assert kinds.count("continuous adaLN modulated LayerNorm") == 2
    assert not report.skipped, report.skipped
    assert patched.state_dict().keys() == model.state_dict().keys()
    chosen = _spy_attention_backend(monkeypatch)
    _compare(_run(model, inputs), _run(patched, inputs))
    assert chosen and set(chosen) == {backend}
    assert "modules use the fused ops" in str(report)


def test_dit_patched_matches_diffusers():
    model, inputs = _dit()
    patched = copy.deepcopy(model)
    report = ak.apply(patched, impl=IMPL)
    assert [c.split(": ", 1)[1] for c in report.changed] == ["adaLN-Zero modulated LayerNorm"] * 2
    assert all(why == "attention processor AttnProcessor2_0" for name, why in report.skipped.items()
               if name.endswith("attn1"))
    _compare(_run(model, inputs), _run(patched, inputs))


def test_flux_patched_matches_diffusers():
    model, inputs = _flux()
    patched = copy.deepcopy(model)
    report = ak.apply(patched, impl=IMPL)
    kinds = sorted(c.split(": ", 1)[1] for c in report.changed)
    assert kinds == ["QK-norm + RoPE prep (Flux)"] * 2 + ["adaLN-Zero modulated LayerNorm"] * 3 + [
        "continuous adaLN modulated LayerNorm"]
    assert patched.state_dict().keys() == model.state_dict().keys()
    _compare(_run(model, inputs), _run(patched, inputs))
    assert ak.remove(patched) == len(report.changed)


def test_apply_twice_and_remove():
    model, inputs = _sd3()
    patched = copy.deepcopy(model)
    first = ak.apply(patched, impl=IMPL)
    again = ak.apply(patched, impl=IMPL)
    assert first.changed and not again.changed
    assert ak.remove(patched) == len(first.changed)
    ref, back = _run(model, inputs), _run(patched, inputs)
    assert torch.equal(ref[0], back[0])
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    assert type(patched.transformer_blocks[0].attn.processor) is JointAttnProcessor2_0


def test_other_models_and_classes_are_untouched():
    from diffusers.models.normalization import AdaLayerNormZero

    model, _ = _sd3()
    other, _ = _sd3()
    ak.apply(model, impl=IMPL)
    assert "forward" not in vars(other.transformer_blocks[1].norm1)       # another instance: diffusers' code
    assert AdaLayerNormZero.forward is not ak._ada_zero_forward


def test_an_attention_mask_takes_diffusers_path_for_that_call():
    model, _ = _sd3()
    ak.apply(model, impl=IMPL)
    attn = model.transformer_blocks[0].attn
    calls = []
    original = attn.processor.original
    attn.processor.original = lambda *a, **k: calls.append(1) or original(*a, **k)
    x, c = torch.randn(B, 16, 32, device=DEVICE), torch.randn(B, 5, 32, device=DEVICE)
    attn(hidden_states=x, encoder_hidden_states=c,
         attention_mask=torch.ones(B, 1, 21, 21, dtype=torch.bool, device=DEVICE))
    assert calls == [1]


def test_unsupported_qk_norm_is_left_alone():
    model, inputs = _sd3(qk_norm="layer_norm", dual=())
    report = ak.apply(model, impl=IMPL)
    attn_skips = {n: why for n, why in report.skipped.items() if n.endswith(".attn")}
    assert attn_skips and all("QK norm LayerNorm" in why for why in attn_skips.values())


def test_sd3_context_qk_norm_eps_unlike_the_images_is_left_alone():
    """The joint op takes one q eps and one k eps for both streams: decided at apply, reported, diffusers' processor
    kept (not listed as changed and then falling back on every call)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    model, _ = _sd3(dual=())
    attn = model.transformer_blocks[0].attn
    attn.norm_added_q.eps = attn.norm_added_k.eps = 1e-5
    report = ak.apply(model, impl=IMPL)
    assert report.skipped == {"transformer_blocks.0.attn": "context QK-norm eps 1e-05, 1e-05 unlike the image's "
                              "1e-06, 1e-06 (the joint op takes one q eps and one k eps)"}
    assert type(attn.processor) is JointAttnProcessor2_0
    assert "transformer_blocks.1.attn: joint QK-norm attention" in report.changed


def test_sd3_context_eps_changed_after_apply_runs_diffusers_processor():
    """An eps changed on a patched module after apply: each call then runs diffusers' own processor, never the
    joint op with the image's eps for both streams."""
    model, inputs = _sd3(dual=())
    patched = copy.deepcopy(model)
    assert ak.apply(patched, impl=IMPL).changed
    for m in (model, patched):
        attn = m.transformer_blocks[0].attn
        attn.norm_added_q.eps = attn.norm_added_k.eps = 0.5       # large: the two eps give visibly other outputs
    _compare(_run(model, inputs), _run(patched, inputs))


def test_sd3_other_processor_classes_are_left_alone():
    """fuse_qkv_projections' FusedJointAttnProcessor2_0, and a user's subclass of JointAttnProcessor2_0: their
    computation may differ from the one we fuse."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class Mine(JointAttnProcessor2_0):
        pass

    model, _ = _sd3(dual=())
    model.fuse_qkv_projections()
    model.transformer_blocks[1].attn.set_processor(Mine())
    report = ak.apply(model, impl=IMPL)
    assert report.skipped == {"transformer_blocks.0.attn": "attention processor FusedJointAttnProcessor2_0",
                              "transformer_blocks.1.attn": "attention processor Mine"}
    assert not [c for c in report.changed if "attention" in c.split(": ", 1)[1]]


def test_apply_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match=r"^unknown backend 'flash'; choose one of auto, fused, sdpa$"):
        ak.apply(torch.nn.Linear(2, 2), backend="flash")


@pytest.mark.parametrize("change", ["layer-norm-qk", "ip-adapter", "subclass"])
def test_flux_unsupported_attention_is_left_alone(change):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

    class Mine(FluxAttnProcessor):
        pass

    model, _ = _flux()
    attn = model.transformer_blocks[0].attn
    if change == "layer-norm-qk":
        attn.norm_q = torch.nn.LayerNorm(8, device=DEVICE)
        why = "QK norm LayerNorm (torch.nn.RMSNorm is supported)"
    elif change == "ip-adapter":
        attn.set_processor(FluxIPAdapterAttnProcessor(hidden_size=16, cross_attention_dim=16).to(DEVICE))
        why = "attention processor FluxIPAdapterAttnProcessor"
    else:
        attn.set_processor(Mine())
        why = "attention processor Mine"
    processor = attn.processor
    report = ak.apply(model, impl=IMPL)
    assert report.skipped == {"transformer_blocks.0.attn": why}
    assert attn.processor is processor
    assert "single_transformer_blocks.0.attn: QK-norm + RoPE prep (Flux)" in report.changed


@pytest.mark.parametrize("backend", ["sdpa", "fused"])
def test_flux_attention_runs_sdpa_and_is_left_alone_for_fused(backend):
    """Flux's processor is the QK-norm + RoPE prep then SDPA: backend 'sdpa' is what it runs; the fused kernels have
    no RoPE, so backend 'fused' leaves Flux's attention to diffusers, reported (the adaLN norms are patched still)."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model, _ = _flux()
    report = ak.apply(model, impl=IMPL, backend=backend)
    procs = {type(p) for p in _flux_processors(model)}
    attns = ["single_transformer_blocks.0.attn", "transformer_blocks.0.attn"]
    if backend == "sdpa":
        assert procs == {ak.FluxQKNormRopeProcessor} and not report.skipped
        assert sorted(c.split(": ")[0] for c in report.changed if "RoPE" in c) == attns
    else:
        assert procs == {FluxAttnProcessor}
        assert sorted(report.skipped) == attns
        assert all(why.startswith("backend 'fused' (the fused kernels have no RoPE") for why in report.skipped.values())
    assert sum("adaLN" in c for c in report.changed) == 4


def test_flux_with_fused_qkv_projections_is_patched_and_matches():
    model, inputs = _flux()
    model.fuse_qkv_projections()
    assert model.transformer_blocks[0].attn.fused_projections
    patched = copy.deepcopy(model)
    report = ak.apply(patched, impl=IMPL)
    assert sum("RoPE" in c for c in report.changed) == 2 and not report.skipped
    _compare(_run(model, inputs), _run(patched, inputs))


@pytest.mark.parametrize("build,why", [
    (lambda: _norms().AdaLayerNormContinuous(8, 6, elementwise_affine=False, eps=1e-6, norm_type="rms_norm"),
     "norm RMSNorm (a plain LayerNorm is supported)"),
    (lambda: _norms().AdaLayerNormContinuous(8, 6, elementwise_affine=True, eps=1e-6), "LayerNorm with an affine"),
    (lambda: _norms().AdaLayerNormZero(8, norm_type="fp32_layer_norm"), "norm FP32LayerNorm (a plain LayerNorm is "
                                                                           "supported)"),
], ids=["continuous-rms", "continuous-affine", "zero-fp32-layer-norm"])
def test_unsupported_ada_norm_is_left_alone(build, why):
    norm = build()
    report = ak.apply(norm, impl=IMPL)
    assert not report.changed and report.skipped == {"": why}
    assert "forward" not in vars(norm)


def _norms():
    from diffusers.models import normalization

    return normalization


@pytest.fixture
def restore_attention_backend():
    """set_attention_backend also sets diffusers' process-wide active backend: put back after the test."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(before)


def _flux_processors(model):
    return [m.processor for m in model.modules() if hasattr(m, "processor")]


@pytest.mark.parametrize("setting", ["backend", "context-parallel"])
def test_flux_attention_with_a_diffusers_setting_is_left_alone(setting, restore_attention_backend):
    """Our processor computes native SDPA on one device: an attention set to another diffusers backend, or given a
    context-parallel config, stays diffusers' and is reported."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model, inputs = _flux()
    if setting == "backend":
        model.set_attention_backend("_native_math")
    else:       # what enable_parallelism gives each processor (a real config needs several ranks)
        for proc in _flux_processors(model):
            proc._parallel_config = object()
    report = ak.apply(model, impl=IMPL)
    expected = "diffusers attention backend '_native_math'" if setting == "backend" else "context parallelism"
    assert sorted(report.skipped) == ["single_transformer_blocks.0.attn", "transformer_blocks.0.attn"]
    assert all(why.startswith(expected) for why in report.skipped.values()), report.skipped
    assert not [c for c in report.changed if "RoPE" in c]
    assert all(type(proc) is FluxAttnProcessor for proc in _flux_processors(model))


@pytest.mark.parametrize("how", ["set_attention_backend", "attention_backend-context"])
def test_flux_backend_chosen_after_apply_is_honoured(how, monkeypatch, restore_attention_backend):
    """A backend chosen after `apply` (on the model, or for a block of code): each call runs diffusers' processor,
    which dispatches to that backend, as in the unpatched model; `remove` hands the setting back."""
    import contextlib

    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend

    model, inputs = _flux()
    patched = copy.deepcopy(model)
    assert ak.apply(patched, impl=IMPL).changed
    name = AttentionBackendName._NATIVE_MATH
    math, calls = _AttentionBackendRegistry._backends[name], []
    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, lambda **kw: calls.append(1) or math(**kw))
    if how == "set_attention_backend":
        for m in (model, patched):
            m.set_attention_backend(name.value)
        scope = contextlib.nullcontext
    else:
        scope = lambda: attention_backend(name.value)       # noqa: E731
    with scope():
        ref = _run(model, inputs)
        assert len(calls) == 2                                  # the double and the single block
        ours = _run(patched, inputs)
    assert len(calls) == 4
    _compare(ref, ours)
    if how == "set_attention_backend":
        ak.remove(patched)
        assert [proc._attention_backend for proc in _flux_processors(patched)] == [name, name]


def test_flux_keeps_the_native_backend_set_before_apply_and_remove_hands_it_back(monkeypatch):
    """A module set to the native backend before apply stays native when the process-wide backend changes (as the
    unpatched model does), and remove, with no forward between, gives the setting back to diffusers' processor."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend

    model, inputs = _flux()
    model.set_attention_backend("native")
    patched = copy.deepcopy(model)
    assert ak.apply(patched, impl=IMPL).changed
    name = AttentionBackendName._NATIVE_MATH
    math, calls = _AttentionBackendRegistry._backends[name], []
    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, lambda **kw: calls.append(1) or math(**kw))
    with attention_backend(name.value):
        ref, ours = _run(model, inputs), _run(patched, inputs)
    assert calls == []                                          # neither model left its own native backend
    _compare(ref, ours)
    fresh = copy.deepcopy(model)
    ak.apply(fresh, impl=IMPL)
    ak.remove(fresh)
    assert [proc._attention_backend for proc in _flux_processors(fresh)] == [AttentionBackendName.NATIVE] * 2


def test_flux_context_parallel_config_after_apply_runs_diffusers_processor():
    model, _ = _flux()
    ak.apply(model, impl=IMPL)
    config = object()
    for proc in _flux_processors(model):        # enable_parallelism's rule: each processor with the attribute
        if hasattr(proc, "_parallel_config"):
            proc._parallel_config = config
    attn = model.transformer_blocks[0].attn
    seen = []

    class Diffusers:        # stands in for diffusers' processor: a real parallel config needs several ranks
        _attention_backend = _parallel_config = None

        def __call__(self, *args):
            seen.append(self._parallel_config)
            return "diffusers' processor"

    attn.processor.original = Diffusers()
    x, c = torch.randn(B, 12, 16, device=DEVICE), torch.randn(B, 5, 16, device=DEVICE)
    rope = (torch.ones(17, 8, device=DEVICE), torch.zeros(17, 8, device=DEVICE))
    assert attn(hidden_states=x, encoder_hidden_states=c, image_rotary_emb=rope) == "diffusers' processor"
    assert seen == [config]


def test_importing_the_kernels_does_not_import_diffusers():
    """diffusers stays an optional extra: only `apply` imports it (the last line shows the check can see it)."""
    code = ("import sys, torch\n"
            "import archirf_kernels\n"
            "from archirf_kernels.integrations import diffusers as ak\n"
            "ak.Report(), ak.remove(torch.nn.Linear(2, 2))\n"
            "assert 'diffusers' not in sys.modules, sorted(m for m in sys.modules if m.startswith('diffusers'))\n"
            "ak.apply(torch.nn.Linear(2, 2))\n"
            "assert 'diffusers' in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


AMPS = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])   # the interpreter computes bf16 wrongly


@pytest.mark.parametrize("amp", AMPS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("build,backend", [(_sd3, "fused"), (_sd3, "sdpa"), (_flux, "auto")],
                         ids=["sd35-fused", "sd35-sdpa", "flux"])
def test_half_precision_autocast(build, backend, amp, monkeypatch):
    """The way people fine-tune: fp32 weights under fp16 / bf16 autocast. Two half-precision runs round at different
    places, and attention with sharp logits (these random QK-norm gains) amplifies it, so each is measured against
    the fp32 run: the patched model's error is at most 3x diffusers' own under the same autocast, plus 1e-3 of the
    tensor's norm (gradients that are rounding noise in both)."""
    model, inputs = build()
    patched = copy.deepcopy(model)
    assert ak.apply(patched, impl=IMPL, backend=backend).changed
    # the cotangent scaled down (what a loss scaler's inverse does): fp16's backward through these random weights
    # overflows at scale 1 on a GPU, in diffusers' model as in ours
    chosen = _spy_attention_backend(monkeypatch)
    with _without_cudnn_attention():
        runs = [_run(m, inputs, a, cotangent_scale=2.0 ** -10)
                for m, a in ((model, None), (model, amp), (patched, amp))]
    assert set(chosen) == ({backend} if build is _sd3 else set())        # Flux's attention is SDPA after its prep
    (out32, grads32), (out_theirs, grads_theirs), (out_ours, grads_ours) = runs
    err = lambda a, b: (a.float() - b.float()).norm().item()
    assert grads_ours.keys() == grads_theirs.keys() == grads32.keys() and grads32
    tensors = [("output", out32, out_theirs, out_ours)] + [(n, grads32[n], grads_theirs[n], grads_ours[n])
                                                           for n in grads32]
    bad = {who: [n for n, *ts in tensors if not torch.isfinite(ts[i]).all()]
           for i, who in ((1, "diffusers"), (2, "ours"))}
    assert not bad["diffusers"] and not bad["ours"], f"non-finite under {amp} autocast (first 5 of each): " + \
        "; ".join(f"{who}: {len(names)} {names[:5]}" for who, names in bad.items())
    for name, t32, theirs, ours in tensors:
        assert err(ours, t32) <= 3 * err(theirs, t32) + 1e-3 * t32.norm().item(), name
    # the bound is not vacuous: autocast rounded (diffusers' own error is not zero) to rounding's size (not an
    # underflowed or overflowed run), and the patched model ran other ops than diffusers'
    assert 0 < err(out_theirs, out32) <= 5e-2 * out32.norm().item()
    rel = sorted(err(grads_theirs[n], grads32[n]) / grads32[n].norm().item() for n in grads32 if grads32[n].norm() > 0)
    assert rel[len(rel) // 2] <= 0.2, rel
    assert not torch.equal(out_ours, out_theirs)


def _without_cudnn_attention():
    """On a GPU, SDPA without cuDNN's backend: its backward gives non-finite gradients for the Flux test model
    (head dim 8) under bf16 and fp16 autocast on an H100 with torch 2.11, in diffusers' own model, where the math,
    memory-efficient and flash backends give the fp32 run's finite ones (docs/diffusers.md)."""
    import contextlib

    if DEVICE != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def test_a_patched_model_saves_and_loads_whole(tmp_path):
    model, inputs = _dit()
    ak.apply(model, impl=IMPL)
    torch.save(model, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(_run(model, inputs)[0], _run(again, inputs)[0])


def test_remove_keeps_a_processor_set_after_apply():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    model, _ = _sd3()
    ak.apply(model, impl=IMPL)
    block = model.transformer_blocks[1]
    mine = JointAttnProcessor2_0()
    block.attn.set_processor(mine)                          # the user's own choice after apply
    ak.remove(model)
    assert block.attn.processor is mine and not hasattr(block.attn, ak._ORIGINAL)


def test_benchmark_smoke(tmp_path, capsys):
    """benchmarks/bench_diffusers.py --smoke: both rows of toy SD3.5- and Flux-shaped models, one fp32 step each on
    the CPU, the rows recorded as jsonl and markdown; a first-output difference beyond --tol fails the run, flagged;
    --batch max is refused without a GPU."""
    import json

    from benchmarks import bench_diffusers

    assert bench_diffusers.main(["--smoke", "--models", "sd35m,flux", "--out", str(tmp_path)]) == 0
    lines = [json.loads(x) for x in (tmp_path / "diffusers.jsonl").read_text().splitlines()]
    assert [(x["model"], x.get("row")) for x in lines] == [("sd35m", "diffusers"), ("sd35m", "patched"),
                                                           ("sd35m", None), ("flux", "diffusers"),
                                                           ("flux", "patched"), ("flux", None)]
    assert [x["changed"] > 0 for x in lines if "row" in x] == [False, True] * 2
    assert all(x["first_output_ok"] and x["first_output_rel_diff"] <= x["tol"] == 1e-4 for x in lines[2::3])
    md = (tmp_path / "diffusers.md").read_text()
    assert md.count("| patched |") == 2 and "EXCEEDED" not in md

    assert bench_diffusers.main(["--smoke", "--models", "sd35m", "--tol", "0", "--out", str(tmp_path)]) == 1
    assert not json.loads((tmp_path / "diffusers.jsonl").read_text().splitlines()[-1])["first_output_ok"]
    assert "**EXCEEDED**" in (tmp_path / "diffusers.md").read_text()

    with pytest.raises(SystemExit):
        bench_diffusers.main(["--smoke", "--batch", "max"])
    assert "--batch max doubles the batch until CUDA runs out of memory: it needs a GPU" in capsys.readouterr().err


def test_benchmark_max_batch_search_stops_at_out_of_memory():
    """bench_diffusers --batch max's search, with stub steps that run out of memory above a threshold: it tries 2
    first, 1 only when 2 does not fit, then doubles up to the largest power of two that fits, never past the cap;
    cuBLAS/cuDNN allocation failures count as out of memory, other errors propagate. The measurement's halving too."""
    from benchmarks import bench_diffusers as bench

    def stub(limit, error=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        calls = []

        def step(batch):
            calls.append(batch)
            if batch > limit:
                raise error
            return batch
        return step, calls

    for limit, cap, fits, tried in [(5, None, 4, [2, 4, 8]), (8, None, 8, [2, 4, 8, 16]), (1, None, 1, [2, 1]),
                                    (0, None, 0, [2, 1]), (100, 8, 8, [2, 4, 8]), (100, 6, 4, [2, 4]),
                                    (100, 1, 1, [1])]:
        step, calls = stub(limit)
        assert (bench.largest_batch(step, cap), calls) == (fits, tried), (limit, cap)

    for message in ["CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED", "CUDA error: out of memory"]:
        step, calls = stub(3, RuntimeError(message))
        assert bench.largest_batch(step) == 2 and calls == [2, 4]
    step, _ = stub(3, RuntimeError("mha_graph.execute(handle, variant_pack, workspace_ptr.get()).is_good()"))
    with pytest.raises(RuntimeError, match="is_good"):
        bench.largest_batch(step)
    assert not bench.out_of_memory(ValueError("out of memory"))

    step, calls = stub(5)
    assert bench.halving(step, 16) == (4, 4) and calls == [16, 8, 4]
    step, calls = stub(0)
    with pytest.raises(torch.OutOfMemoryError):
        bench.halving(step, 4)
    assert calls == [4, 2, 1]


def test_benchmark_max_batch_marks_the_batch_dynamic_and_caps_the_patched_row(monkeypatch):
    """bench_diffusers.max_batch on the CPU with its steps stubbed: every input with a batch dimension is marked
    dynamic from the first call (so each row compiles once), the patched row is searched only up to diffusers' largest
    batch, and a model whose batch 1 does not fit stops the run."""
    from benchmarks import bench_diffusers as bench

    limits, seen = [], []

    def make_step(model, smoke):
        limit, row = limits.pop(0), []
        seen.append(row)

        def step(inputs, target):
            row.append({k: 0 in getattr(v, "_dynamo_dynamic_indices", set()) for k, v in inputs.items()})
            batch = inputs["hidden_states"].shape[0]
            assert target.shape[0] == batch
            if batch > limit:
                raise torch.OutOfMemoryError("CUDA out of memory")
        return step

    monkeypatch.setattr(bench, "make_step", make_step)
    cpu = torch.device("cpu")
    limits[:] = [9, 100]
    assert bench.max_batch("sd35m", 1, 8, cpu, "default", smoke=True) == {"diffusers": 8, "patched": 8}
    assert [len(row) for row in seen] == [4, 3]                 # 2, 4, 8, 16 | 2, 4, 8
    assert all(all(marks.values()) for row in seen for marks in row)

    limits[:], seen[:] = [100, 3], []
    assert bench.max_batch("flux", 1, 8, cpu, "default", smoke=True) == {"diffusers": 64, "patched": 2}
    marks = seen[0][0]
    assert not marks["img_ids"] and not marks["txt_ids"]        # no batch dimension
    assert all(v for k, v in marks.items() if not k.endswith("_ids"))

    limits[:] = [0, 0]
    with pytest.raises(SystemExit, match="batch 1 does not fit"):
        bench.max_batch("sd35m", 1, 8, cpu, "default", smoke=True)


def test_benchmark_out_keeps_every_run(tmp_path):
    """bench_diffusers --out appends: two runs into one folder keep both runs' lines, each with its run id, date and
    versions, and the markdown has a section per run; a --batch max record says what fitted and what was measured."""
    import json

    from benchmarks import bench_diffusers as bench

    assert bench.main(["--smoke", "--models", "sd35m", "--out", str(tmp_path)]) == 0
    assert bench.main(["--smoke", "--models", "flux", "--out", str(tmp_path)]) == 0
    lines = [json.loads(x) for x in (tmp_path / "diffusers.jsonl").read_text().splitlines()]
    assert [x["model"] for x in lines] == ["sd35m"] * 3 + ["flux"] * 3
    runs = [x["run"] for x in lines]
    assert runs[:3] == [runs[0]] * 3 and runs[3:] == [runs[3]] * 3 and runs[0] != runs[3]
    assert all({"date", "triton", "torch", "diffusers", "gpu", "command"} <= set(x) for x in lines)
    md = (tmp_path / "diffusers.md").read_text()
    assert md.count("\n## ") == 2 and md.count("| patched |") == 2
    assert md.index("--models sd35m") < md.index("--models flux")

    run = {k: lines[0][k] for k in ("run", "date", "gpu", "torch", "triton", "diffusers", "command")}
    bench.record(tmp_path, [{"model": "sd35m", "max_batch": {"diffusers": 16, "patched": 8},
                             "patched_capped_at_diffusers": True, "searched_batch": 8, "batch": 4, **run}])
    md = (tmp_path / "diffusers.md").read_text()
    assert md.count("\n## ") == 2                               # the same run's section
    assert ("largest batch diffusers 16, patched 8 (capped at diffusers'); measured at 4, halved from 8"
            in md)
