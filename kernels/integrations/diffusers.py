"""archirf_kernels inside diffusers' transformers: `apply(transformer)` swaps, in place, what our fused ops compute.

    from archirf_kernels.integrations import diffusers as ak
    report = ak.apply(transformer)      # SD3Transformer2DModel, DiTTransformer2DModel, ... (any nn.Module)
    print(report)                       # what changed, what was left alone and why
    ak.remove(transformer)              # back to diffusers' own code

What it swaps (per module instance: no diffusers class is patched, other models are untouched, parameter names
and state dicts do not change):
- `Attention` modules running `JointAttnProcessor2_0` (SD3 / SD3.5's joint attention, and SD3.5's second,
  image-only attention) get `QKNormAttnProcessor`: per-head RMSNorm of q and k (diffusers' `RMSNorm`, with or
  without its weight; SD3.0 has none: the attention alone) and the attention over [image, context] keys through
  `joint_qk_norm_attention` / `qk_norm_attention` (`backend`: "auto" takes the fused kernels up to 512 tokens,
  which never write the normalised or concatenated operands, and beyond, "sdpa": one prep pass writes them for
  PyTorch's SDPA).
- `AdaLayerNormZero` (SD3's, DiT's and Flux's double blocks' adaLN-Zero), `AdaLayerNormZeroSingle` (Flux's
  single blocks), `SD35AdaLayerNormZeroX` (SD3.5's dual-attention blocks: one LayerNorm, two modulations) and
  `AdaLayerNormContinuous` (SD3's and Flux's norm_out) get a forward whose modulated LayerNorm is `ada_layer_norm`
  (one pass, fp32 statistics).
- `FluxAttention` modules running `FluxAttnProcessor` (Flux's double and single blocks) get
  `FluxQKNormRopeProcessor`: each stream's q and k RMSNorm (torch.nn.RMSNorm) and rotary embedding in one pass
  (`qk_norm_rope`), then PyTorch's SDPA over [context, image], as Flux's processor dispatches it, whatever
  `backend` says but "fused" (no RoPE in the fused kernels), which leaves Flux's attention alone.
Left alone, and listed in the report with the reason: a processor of another class (a subclass, a fused-projection
processor), a QK norm that is not an RMSNorm without bias (e.g. LayerNorm), SD3 context QK norms whose eps differ
from the image's, a norm that is not a plain LayerNorm without affine, and an attention whose
processor has a diffusers attention backend other than the native one or a context-parallel config (ours compute
native SDPA on one device). A call with an attention mask, or a Flux attention call made while such a setting is in
force (set after `apply`, or the attention_backend context), runs diffusers' own processor, with the setting.
diffusers is imported only when `apply` is called; a second `apply` keeps the first one's impl and backend.

Not yet: the blocks' second modulated LayerNorm (`norm2(x) * (1 + scale_mlp) + shift_mlp`), DiT's final modulated
norm_out and the gated residuals, all written inline in diffusers' forwards (`gated_residual_ada_layer_norm` would
need the block's forward).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

import archirf_kernels as K

_ORIGINAL = "_archirf_original_processor"
_FORWARD = "_archirf_forward"


@dataclass
class Report:
    changed: list[str] = field(default_factory=list)        # "name: what"
    skipped: dict[str, str] = field(default_factory=dict)   # name -> why left alone

    def __str__(self) -> str:
        lines = [f"archirf_kernels: {len(self.changed)} modules use the fused ops"]
        kinds: dict[str, int] = {}
        for c in self.changed:
            kinds[c.split(": ", 1)[1]] = kinds.get(c.split(": ", 1)[1], 0) + 1
        lines += [f"  {n} x {kind}" for kind, n in kinds.items()]
        if self.skipped:
            lines.append(f"left alone: {len(self.skipped)}")
            lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _qk_norm(norm) -> tuple[bool, torch.Tensor | None, float | None, str | None]:
    """(is a norm, its weight, eps, why unsupported) of an Attention's norm_q / norm_k."""
    from diffusers.models.normalization import RMSNorm

    if norm is None:
        return False, None, None, None
    if type(norm) is not RMSNorm:
        return True, None, None, f"QK norm {type(norm).__name__} (an RMSNorm is supported)"
    if getattr(norm, "bias", None) is not None:
        return True, None, None, "QK RMSNorm with a bias"
    return True, norm.weight, float(norm.eps), None


def _attention_unsupported(attn) -> str | None:
    norms = [_qk_norm(getattr(attn, n, None)) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")]
    if any(why for *_, why in norms):
        return next(why for *_, why in norms if why)
    if norms[0][0] != norms[1][0] or (attn.add_q_proj is not None and not norms[0][0] == norms[2][0] == norms[3][0]):
        return "QK norm on some of q, k and the context's q, k only"
    if attn.add_q_proj is not None and norms[0][0] and (norms[2][2], norms[3][2]) != (norms[0][2], norms[1][2]):
        return (f"context QK-norm eps {norms[2][2]}, {norms[3][2]} unlike the image's {norms[0][2]}, {norms[1][2]} "
                "(the joint op takes one q eps and one k eps)")
    if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        return "residual connection or output rescaling inside the attention"
    return None


class QKNormAttnProcessor:
    """JointAttnProcessor2_0's computation through archirf_kernels (see the module doc)."""

    def __init__(self, original, impl: str = "auto", backend: str = "auto"):
        self.original, self.impl, self.backend = original, impl, backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # a mask, or a module changed since apply into one apply leaves alone (e.g. a context QK-norm eps): diffusers'
        if attention_mask is not None or args or kwargs or _attention_unsupported(attn):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        B, heads = hidden_states.shape[0], attn.heads

        def heads_view(t):
            return t.view(B, -1, heads, t.shape[-1] // heads)

        q, k, v = (heads_view(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        qk_norm, qw, q_eps, _ = _qk_norm(attn.norm_q)
        _, kw, k_eps, _ = _qk_norm(attn.norm_k)
        eps = (q_eps, k_eps) if qk_norm else 1e-6
        if encoder_hidden_states is None:
            out = K.qk_norm_attention((q, k, v), qw, kw, eps=eps, qk_norm=qk_norm, impl=self.impl,
                                      backend=self.backend)     # SDPA's default scale, as diffusers' processor
            ctx = None
        else:
            cq, ck, cv = (heads_view(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj,
                                                                          attn.add_v_proj))
            cqw, ckw = _qk_norm(attn.norm_added_q)[1], _qk_norm(attn.norm_added_k)[1]   # eps: the image's (checked)
            out, ctx = K.joint_qk_norm_attention((q, k, v), (cq, ck, cv), qw, kw, cqw, ckw, eps=eps, qk_norm=qk_norm,
                                                 impl=self.impl, backend=self.backend)
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if ctx is None else (out, ctx)


def _attention_setting(proc) -> str | None:
    """Why `proc` does not compute diffusers' default attention (native SDPA on one device), or None: a context-parallel
    config (enable_parallelism), or, for a processor that dispatches through diffusers' attention backends (it has
    `_attention_backend`), a backend other than the native one (set_attention_backend, the attention_backend context,
    DIFFUSERS_ATTN_BACKEND). Our processors compute the native attention only."""
    if getattr(proc, "_parallel_config", None) is not None:
        return "context parallelism (diffusers' parallel_config; its ring / Ulysses attention is not fused)"
    if not hasattr(proc, "_attention_backend"):
        return None
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    backend = proc._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
    if backend != AttentionBackendName.NATIVE:          # a str Enum: equal to its value too
        return f"diffusers attention backend '{AttentionBackendName(backend).value}' (the native one is supported)"
    return None


def _torch_rms(norm) -> tuple[torch.Tensor | None, float, str | None]:
    """(weight, eps, why unsupported) of one of Flux's torch.nn.RMSNorm QK norms."""
    if type(norm) is not nn.RMSNorm:
        return None, 0.0, f"QK norm {type(norm).__name__} (torch.nn.RMSNorm is supported)"
    if norm.eps is None:
        return None, 0.0, "QK RMSNorm without an explicit eps"
    return norm.weight, float(norm.eps), None


def _flux_unsupported(attn) -> str | None:
    names = ("norm_q", "norm_k") + (("norm_added_q", "norm_added_k") if attn.added_kv_proj_dim is not None else ())
    for name in names:
        if why := _torch_rms(getattr(attn, name))[2]:
            return why
    return None


class FluxQKNormRopeProcessor:
    """FluxAttnProcessor's computation with each stream's q and k RMSNorm and rotary embedding in one pass
    (archirf_kernels.qk_norm_rope), then PyTorch's SDPA over [context, image]. diffusers' set_attention_backend and
    enable_parallelism reach it through the two attributes below; while either (or the active backend) asks for other
    than native SDPA on one device, each call runs diffusers' processor with them."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, original, impl: str = "auto"):
        self.original, self.impl = original, impl
        _carry_attention_settings(original, self)   # a backend set on the module before apply stays the module's own

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 *args, **kwargs):
        if attention_mask is not None or image_rotary_emb is None or args or kwargs or _attention_setting(self):
            _carry_attention_settings(self, self.original)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 *args, **kwargs)
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        q, k, v, cq, ck, cv = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        cos, sin = (t.float() for t in image_rotary_emb)
        heads = lambda t: t.unflatten(-1, (-1, attn.head_dim))
        n_ctx = encoder_hidden_states.shape[1] if attn.added_kv_proj_dim is not None else 0

        def prep(t, norm, lo, hi):
            weight, eps, _ = _torch_rms(norm)
            return K.qk_norm_rope(heads(t), weight, cos[lo:hi], sin[lo:hi], eps, impl=self.impl)

        total = n_ctx + q.shape[1]
        q, k, v = prep(q, attn.norm_q, n_ctx, total), prep(k, attn.norm_k, n_ctx, total), heads(v)
        if n_ctx:
            q = torch.cat([prep(cq, attn.norm_added_q, 0, n_ctx), q], dim=1)
            k = torch.cat([prep(ck, attn.norm_added_k, 0, n_ctx), k], dim=1)
            v = torch.cat([heads(cv), v], dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        ctx, out = out.split_with_sizes([n_ctx, out.shape[1] - n_ctx], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(ctx.contiguous())


def _carry_attention_settings(source, target) -> None:
    """diffusers' backend and context-parallel settings, given to our processor after `apply`, onto its own."""
    target._attention_backend, target._parallel_config = source._attention_backend, source._parallel_config


def _ada_zero_forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    """AdaLayerNormZero.forward with the modulated LayerNorm fused (archirf_kernels.ada_layer_norm)."""
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    x = K.ada_layer_norm(x, shift_msa, scale_msa, eps=self.norm.eps, impl=self._archirf_impl)
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _ada_zero_single_forward(self, x, emb=None):
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
    return K.ada_layer_norm(x, shift_msa, scale_msa, eps=self.norm.eps, impl=self._archirf_impl), gate_msa


def _ada_zero_x_forward(self, hidden_states, emb=None):
    """SD35AdaLayerNormZeroX.forward: one LayerNorm under two modulations (the joint and the second attention's), each
    fused."""
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = emb.chunk(
        9, dim=1)
    x, x2 = (K.ada_layer_norm(hidden_states, shift, scale, eps=self.norm.eps, impl=self._archirf_impl)
             for shift, scale in ((shift_msa, scale_msa), (shift_msa2, scale_msa2)))
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp, x2, gate_msa2


def _ada_continuous_forward(self, x, conditioning_embedding):
    """AdaLayerNormContinuous.forward (SD3's and Flux's norm_out, SD3's last norm1_context): (scale, shift) order."""
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = emb.chunk(2, dim=1)
    return K.ada_layer_norm(x, shift, scale, eps=self.norm.eps, impl=self._archirf_impl)


def _plain_layer_norm(norm) -> str | None:
    if type(norm) is not nn.LayerNorm:
        return f"norm {type(norm).__name__} (a plain LayerNorm is supported)"
    if norm.elementwise_affine:
        return "LayerNorm with an affine"
    return None


def apply(model: nn.Module, *, impl: str = "auto", backend: str = "auto") -> Report:
    """Swaps the supported attention processors and adaLN norms of `model` for archirf_kernels' ops, in place;
    returns what changed and what was left alone. Calling it twice changes nothing more. `backend` is the attention
    backend of SD3's processor ("auto", "fused", "sdpa"); Flux's always runs its prep then SDPA, so "fused" leaves
    Flux's attention alone, reported."""
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
    from diffusers.models.normalization import (AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle,
                                                SD35AdaLayerNormZeroX)

    ada_forwards = {AdaLayerNormZero: (_ada_zero_forward, "adaLN-Zero modulated LayerNorm"),
                    AdaLayerNormZeroSingle: (_ada_zero_single_forward, "adaLN-Zero modulated LayerNorm"),
                    SD35AdaLayerNormZeroX: (_ada_zero_x_forward, "adaLN-Zero LayerNorm, two modulations (SD3.5)"),
                    AdaLayerNormContinuous: (_ada_continuous_forward, "continuous adaLN modulated LayerNorm")}
    if impl not in K.IMPLS:
        raise ValueError(f"unknown impl '{impl}'; choose one of {', '.join(K.IMPLS)}")
    if backend not in K.reference.ATTENTION_BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose one of {', '.join(K.reference.ATTENTION_BACKENDS)}")
    report = Report()
    flux = _flux_classes()
    for name, m in model.named_modules():
        if flux and isinstance(m, flux[0]):
            proc = m.processor
            if isinstance(proc, FluxQKNormRopeProcessor):
                continue
            if type(proc) is not flux[1]:
                report.skipped[name] = f"attention processor {type(proc).__name__}"
            elif backend == "fused":
                report.skipped[name] = ("backend 'fused' (the fused kernels have no RoPE; Flux's attention runs the "
                                        "QK-norm + RoPE prep and SDPA: backend 'auto' or 'sdpa')")
            elif why := _attention_setting(proc) or _flux_unsupported(m):
                report.skipped[name] = why
            else:
                setattr(m, _ORIGINAL, proc)
                m.set_processor(FluxQKNormRopeProcessor(proc, impl))
                report.changed.append(f"{name}: QK-norm + RoPE prep (Flux)")
        elif isinstance(m, Attention):
            proc = m.processor
            if isinstance(proc, QKNormAttnProcessor):
                continue
            if type(proc) is not JointAttnProcessor2_0:
                report.skipped[name] = f"attention processor {type(proc).__name__}"
            elif why := _attention_setting(proc) or _attention_unsupported(m):
                report.skipped[name] = why
            else:
                setattr(m, _ORIGINAL, proc)
                m.set_processor(QKNormAttnProcessor(proc, impl, backend))
                what = "QK-norm attention" if m.norm_q is not None else "attention (no QK norm)"
                report.changed.append(f"{name}: joint {what}" if m.add_q_proj is not None else f"{name}: {what}")
        elif type(m).__name__.startswith(("AdaLayerNorm", "SD35AdaLayerNorm")) and type(m) not in ada_forwards:
            report.skipped[name] = (f"class {type(m).__name__} (adaLN-Zero, its single and SD3.5 forms and the "
                                    "continuous adaLN are supported)")
        elif type(m) in ada_forwards:
            if hasattr(m, _FORWARD):
                continue
            if why := _plain_layer_norm(m.norm):
                report.skipped[name] = why
                continue
            m._archirf_impl = impl
            setattr(m, _FORWARD, True)
            forward, what = ada_forwards[type(m)]
            # a partial of a module-level function (not a bound method): torch.save(model) stays loadable
            m.forward = functools.partial(forward, m)
            report.changed.append(f"{name}: {what}")
    return report


def _flux_classes():
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
    except ImportError:             # a diffusers without Flux
        return None
    return FluxAttention, FluxAttnProcessor


def remove(model: nn.Module) -> int:
    """Undoes `apply`: diffusers' own processors and forwards again. Returns how many modules it restored."""
    restored = 0
    for m in model.modules():
        if hasattr(m, _ORIGINAL):
            if isinstance(m.processor, (QKNormAttnProcessor, FluxQKNormRopeProcessor)):   # not one set since
                if isinstance(m.processor, FluxQKNormRopeProcessor):
                    _carry_attention_settings(m.processor, getattr(m, _ORIGINAL))
                m.set_processor(getattr(m, _ORIGINAL))
                restored += 1
            delattr(m, _ORIGINAL)
        if hasattr(m, _FORWARD):
            del m.forward, m._archirf_impl
            delattr(m, _FORWARD)
            restored += 1
    return restored
