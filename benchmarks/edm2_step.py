"""EDM2-S training step, fused MP kernels against the same UNet in plain PyTorch, same run, one GPU.

    python -m benchmarks.edm2_step --out DIR          # writes DIR/edm2_step.json and DIR/edm2_step.md

A step is what the trainer does per optimizer step, on one GPU without FSDP: rectified-flow loss with
EDM2's preconditioning and uncertainty-weighted loss (the paper's configuration G) under bf16 autocast,
backward, fused AdamW, the forced weight normalisation of every MPConv weight. Batch 64 of
synthetic data, EDM2-S (280M parameters), at 64x64x4 (latents) and 64x64x3 (pixels).

Implementations (each a fresh model from the same seed; the same data):
  ours           kernels=auto, what the trainer runs: each block compiled (torch.compile fullgraph, as
                 parallel.py does) with the MP ops left to inductor there, activations channels_last,
                 the Triton forced weight norm
  ours-fused     kernels=triton: the fused MP ops of archirf_kernels.mp inside the compiled blocks
  compiled       kernels=reference (the plain-PyTorch spec), channels_last, each block compiled, and the
                 forced weight norm compiled
  compiled-nchw  the same in NCHW (the memory format of NVlabs/edm2)
  eager          kernels=reference, channels_last, nothing compiled

Reported per (case, impl): img/s over `--steps` timed steps (CUDA events, after `--warmup` steps; the
first step, which compiles, is timed on its own), MFU = 6 x forward MACs per image x img/s / the
measured bf16 matmul peak (8192^3), with both the model's count (flops_per_image) and the paper's
(EDM2-S: 102.2 G MACs per image), peak memory (torch.cuda.max_memory_allocated over the timed steps),
the first step's loss (all implementations must agree), and ours' speed-up over each baseline.
--smoke runs a tiny UNet on the CPU (harness check, numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import archirf_kernels as K
from archirf.config import ObjectiveConfig
from archirf.models.edm2_unet import EDM2_PRESETS, EDM2UNet
from archirf.objectives import RectifiedFlow
from archirf.sample import autocast_model_fn

PAPER_MACS = {"EDM2-S": 102.2e9}
CASES = {"latents-64x64x4": (64, 4), "pixels-64x64x3": (64, 3)}
IMPLS = {  # name: (kernels, channels_last, compile); run in this order
    "ours": ("auto", True, True),
    "ours-fused": ("triton", True, True),
    "compiled": ("reference", True, True),
    "eager": ("reference", True, False),
    "compiled-nchw": ("reference", False, True),
}


def matmul_peak_tflops(device: torch.device) -> float:
    """The measured bf16 matmul rate (8192^3), the MFU denominator (DESIGN.md §4)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ a
    end.record()
    end.synchronize()
    return 20 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3) / 1e12


def build(impl: str, size: int, channels: int, preset: str, device: torch.device, smoke: bool) -> EDM2UNet:
    kernels, channels_last, compile_ = IMPLS[impl]
    torch.manual_seed(0)
    shape = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), channels_per_head=16) \
        if smoke else dict(EDM2_PRESETS[preset])
    model = EDM2UNet(input_size=size, in_channels=channels, num_classes=1000, preconditioning="edm",
                     uncertainty_weighting=True, kernels=kernels if device.type == "cuda" else "reference",
                     channels_last=channels_last, **shape).to(device)
    if compile_ and not smoke:
        for block in model.blocks:
            block.compile(fullgraph=True)
    return model


def make_step(model: EDM2UNet, impl: str, device: torch.device, batch: int, size: int, channels: int):
    """One training step as a closure; the data are fixed synthetic tensors (no loader in the timing)."""
    objective = RectifiedFlow(ObjectiveConfig(time_sampling="logit_normal", logit_normal_mean=-0.4,
                                              logit_normal_std=1.0))
    dtype = torch.bfloat16 if device.type == "cuda" else None
    model_fn = autocast_model_fn(model, device, dtype, return_logvar=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), fused=device.type == "cuda" or None)
    gen = torch.Generator(device=device).manual_seed(1)
    x = 0.5 * torch.randn(batch, channels, size, size, device=device, generator=gen)
    y = torch.randint(0, 1000, (batch,), device=device, generator=gen)
    weights = [c.weight for c in model.mp_convs()]
    if impl == "ours":
        post_step, how = model.post_optimizer_step, "triton"
    else:                                          # the plain-PyTorch forced normalisation
        post_step, how = (lambda: [K.reference.normalize_weight_(w) for w in weights]), "eager"
    if impl != "ours" and IMPLS[impl][2] and device.type == "cuda":   # compiled baselines: hook compiled too
        hook = torch.compile(post_step)
        try:
            with torch.no_grad():
                hook()                                                # idempotent on normalised weights
            post_step, how = hook, "compiled"
        except Exception as err:  # noqa: BLE001  (the baseline then normalises eagerly; the row says so)
            how = f"eager ({type(err).__name__})"

    def step() -> torch.Tensor:
        torch.manual_seed(2)                                          # same noise and times each step
        loss = objective.loss(model_fn, x, y).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            post_step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, how


def measure(impl: str, case: str, args, device: torch.device, peak: float | None) -> dict:
    torch._dynamo.reset()              # each implementation compiles afresh (recompile limits are per code object)
    size, channels = CASES[case]
    size = 8 if args.smoke else size
    model = build(impl, size, channels, args.preset, device, args.smoke)
    step, post_step = make_step(model, impl, device, args.batch, size, channels)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    first_loss = step().item()                                        # compiles; note: host sync
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):                                     # median of a few timed windows
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / args.steps)
        else:
            times.append((time.perf_counter() - t0) / args.steps)
    step_s = statistics.median(times)
    img_s = args.batch / step_s
    macs = model.flops_per_image()
    row = {"case": case, "impl": impl, "post_step": post_step, "batch": args.batch,
           "params_m": model.num_params() / 1e6,
           "step_ms": step_s * 1e3, "img_per_s": img_s, "first_step_s": first_s, "first_loss": first_loss,
           "model_gmacs_per_img": macs / 1e9,
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    if peak:
        row["mfu_model_flops"] = 6 * macs * img_s / (peak * 1e12)
        if args.preset in PAPER_MACS and not args.smoke:
            row["mfu_paper_flops"] = 6 * PAPER_MACS[args.preset] * img_s / (peak * 1e12)
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def render(doc: dict) -> str:
    env = doc["env"]
    lines = [f"## EDM2 training step ({doc['preset']}, batch {doc['batch']}, bf16)", "",
             f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}; bf16 matmul peak "
             f"{env.get('peak_tflops') or float('nan'):.0f} TFLOP/s; {doc['steps']} steps x {doc['repeats']} windows "
             f"(median) after {doc['warmup']} warm-up steps.", "",
             "| case | impl | img/s | step ms | MFU (model / paper FLOPs) | peak GiB | first step s | first loss "
             "| ours vs this |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        mfu = "/".join(f"{r[k]:.1%}" for k in ("mfu_model_flops", "mfu_paper_flops") if r.get(k) is not None) or "—"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "—"
        vs = f"{r['ours_speedup']:.2f}×" if r.get("ours_speedup") else ""
        lines.append(f"| {r['case']} | {r['impl']} | {r['img_per_s']:.0f} | {r['step_ms']:.1f} | {mfu} | {mem} | "
                     f"{r['first_step_s']:.1f} | {r['first_loss']:.4f} | {vs} |")
    for failure in doc.get("failed", []):
        lines += ["", f"Failed: {failure}"]
    skipped = doc.get("skipped")
    if skipped:
        lines += ["", f"Not run (time budget): {', '.join(skipped)}."]
    lines += ["", "Target (ANCHORS.md): ours ≥ 1.3× the compiled plain-PyTorch UNet."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.edm2_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="EDM2-S", choices=list(EDM2_PRESETS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--budget-s", type=float, default=0, help="skip what remains after this many seconds (0: no limit)")
    p.add_argument("--smoke", action="store_true", help="tiny UNet on the CPU: checks the script only")
    args = p.parse_args(argv)

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        p.error("needs a CUDA GPU (--smoke runs a tiny UNet on the CPU)")
    if args.smoke:
        args.batch, args.steps, args.repeats, args.warmup = min(args.batch, 4), 1, 1, 0
    cfg = torch._dynamo.config   # one graph per distinct block configuration (shape, flavour, attention ...)
    cfg.recompile_limit = max(getattr(cfg, "recompile_limit", 8), 64)
    import triton
    env = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
           "torch": torch.__version__, "triton": triton.__version__,
           "peak_tflops": matmul_peak_tflops(device) if device.type == "cuda" else None}
    doc = {"preset": args.preset, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
           "warmup": args.warmup, "env": env, "rows": [], "skipped": []}
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    for case in args.cases.split(","):
        for impl in args.impls.split(","):
            if args.budget_s and time.monotonic() - started > args.budget_s:
                doc["skipped"].append(f"{case}/{impl}")
                continue
            try:
                row = measure(impl, case, args, device, env["peak_tflops"])
            except Exception as err:  # noqa: BLE001  (one failing implementation must not lose the others)
                doc["failed"] = doc.get("failed", []) + [f"{case}/{impl}: {type(err).__name__}: {str(err)[:200]}"]
                print(doc["failed"][-1], flush=True)
                continue
            print(json.dumps(row), flush=True)
            doc["rows"].append(row)
            write(doc, args.out)                          # after every row: a run cut short keeps what it measured
    print(write(doc, args.out))
    return 0


def write(doc: dict, out: Path) -> str:
    for r in doc["rows"]:
        ours = next((o for o in doc["rows"] if o["case"] == r["case"] and o["impl"] == "ours"), None)
        if ours and r["impl"] != "ours":
            r["ours_speedup"] = ours["img_per_s"] / r["img_per_s"]
            r["first_loss_rel_diff"] = abs(ours["first_loss"] - r["first_loss"]) / abs(r["first_loss"])
    (out / "edm2_step.json").write_text(json.dumps(doc, indent=1) + "\n")
    text = render(doc)
    (out / "edm2_step.md").write_text(text)
    return text


if __name__ == "__main__":
    raise SystemExit(main())
