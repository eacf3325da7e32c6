"""A diffusers fine-tuning step with and without archirf_kernels.integrations.diffusers, same process.

    python -m benchmarks.bench_diffusers [--models sd35m] [--layers 12] [--batch 2] [--steps 10] [--res 1024]
        [--sdpa default|flash|efficient|cudnn]

Models (random weights, fp32 parameters under bf16 autocast, shapes of the released configs with `--layers` blocks):
  sd35m   SD3.5-medium: 24 heads x 64, QK RMSNorm, dual attention in the first 13 blocks, 1024 px -> 128 x 128
          latents (4,096 image tokens), 333 context tokens (CLIP 77 + T5 256) of width 4096
  sd3     SD3.0-medium: the same without QK norm and dual attention
  flux    Flux.1-dev: 24 heads x 128, `--layers` double blocks and twice as many single blocks, 1024 px -> 4,096
          packed image tokens of 64 channels, 512 text tokens of width 4096, rotary positions
One step: forward, the flow-matching MSE against random targets, backward, AdamW (fused). Rows, each compiled
whole with torch.compile (default mode): "diffusers" (the model as loaded), "patched" (after ak.apply). Prints
one JSON line per row and the ratio; each row's first output is checked against the other's (bf16 tolerance).
--sdpa restricts both rows' PyTorch attention to one SDPA backend (default: PyTorch's own choice). On torch 2.11
and an H100, compiled diffusers' own Flux (the baseline row) stopped at 1024 px in cuDNN attention's backward
(4,608 tokens, head dim 128; "mha_graph.execute ... is_good()") and, with --sdpa flash, with an illegal memory
access during inductor's autotuning (docs/diffusers.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

CONFIGS = {
    "sd35m": dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, in_channels=16, out_channels=16,
                  patch_size=2, sample_size=128, pos_embed_max_size=384, qk_norm="rms_norm",
                  dual_attention_layers=tuple(range(13))),
    "sd3": dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                caption_projection_dim=1536, pooled_projection_dim=2048, in_channels=16, out_channels=16,
                patch_size=2, sample_size=128, pos_embed_max_size=192),
}


def build(name: str, layers: int, device):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if name == "flux":
        torch.manual_seed(0)
        return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=2 * layers,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                      pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)).to(device)

    cfg = dict(CONFIGS[name], num_layers=layers)
    if "dual_attention_layers" in cfg:
        cfg["dual_attention_layers"] = tuple(i for i in cfg["dual_attention_layers"] if i < layers)
    torch.manual_seed(0)
    return SD3Transformer2DModel(**cfg).to(device)


def make_inputs(name: str, batch: int, lat: int, device):
    gen = torch.Generator(device=device).manual_seed(1)
    randn = lambda *shape: torch.randn(shape, device=device, generator=gen)
    if name == "flux":                  # 2x2 latent patches packed into 64 channels, as Flux's pipeline does
        side = lat // 2
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0),
                                             indexing="ij"), -1).reshape(-1, 3).to(device)
        inputs = dict(hidden_states=randn(batch, side * side, 64), encoder_hidden_states=randn(batch, 512, 4096),
                      pooled_projections=randn(batch, 768), timestep=torch.rand(batch, device=device, generator=gen),
                      img_ids=img_ids, txt_ids=torch.zeros(512, 3, device=device))
        return inputs, randn(batch, side * side, 64)
    inputs = dict(hidden_states=randn(batch, 16, lat, lat), encoder_hidden_states=randn(batch, 333, 4096),
                  pooled_projections=randn(batch, 2048), timestep=torch.rand(batch, device=device, generator=gen) * 1000)
    return inputs, randn(batch, 16, lat, lat)


def _sdpa(backend: str):
    def context():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(getattr(SDPBackend, backend))
    return context


SDPA = {"default": contextlib.nullcontext, "flash": _sdpa("FLASH_ATTENTION"),
        "efficient": _sdpa("EFFICIENT_ATTENTION"), "cudnn": _sdpa("CUDNN_ATTENTION")}


def measure(model, inputs, target, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    step_fn = torch.compile(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = step_fn(**inputs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.detach()

    t0 = time.perf_counter()
    first = step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return first, start.elapsed_time(end) / steps, first_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd35m")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--res", type=int, default=1024, help="image pixels (latents are res / 8)")
    ap.add_argument("--sdpa", choices=sorted(SDPA), default="default",
                    help="SDPA backend for both rows' attention (default: PyTorch's dispatch)")
    args = ap.parse_args(argv)
    from archirf_kernels.integrations import diffusers as ak

    device = torch.device("cuda")
    lat = args.res // 8
    for name in args.models.split(","):
        inputs, target = make_inputs(name, args.batch, lat, device)
        rows = {}
        for row in ("diffusers", "patched"):
            torch._dynamo.reset()
            model = build(name, args.layers, device)
            report = ak.apply(model) if row == "patched" else None
            with SDPA[args.sdpa]():
                first, ms, first_s = measure(model, inputs, target, args.steps)
            rows[row] = dict(model=name, row=row, layers=args.layers, batch=args.batch, res=args.res, sdpa=args.sdpa,
                             ms=ms, img_per_s=args.batch / ms * 1e3, first_step_s=first_s,
                             peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                             changed=len(report.changed) if report else 0, first=first)
            del model
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        a, b = rows["diffusers"].pop("first"), rows["patched"].pop("first")
        rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
        for r in rows.values():
            print(json.dumps(r))
        print(json.dumps({"model": name, "patched_vs_compiled_diffusers": rows["diffusers"]["ms"] / rows["patched"]["ms"],
                          "first_output_rel_diff": rel, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
