"""A diffusers fine-tuning step with and without archirf_kernels.integrations.diffusers, same process.

    python -m benchmarks.bench_diffusers [--models sd35m] [--layers 12] [--batch 2|max] [--steps 10] [--res 1024]
        [--sdpa default|flash|efficient|cudnn] [--tol T] [--out DIR] [--smoke]

Models (random weights, fp32 parameters under bf16 autocast, shapes of the released configs with `--layers` blocks):
  sd35m   SD3.5-medium: 24 heads x 64, QK RMSNorm, dual attention in the first 13 blocks, 1024 px -> 128 x 128
          latents (4,096 image tokens), 333 context tokens (CLIP 77 + T5 256) of width 4096
  sd3     SD3.0-medium: the same without QK norm and dual attention
  flux    Flux.1-dev: 24 heads x 128, `--layers` double blocks and twice as many single blocks, 1024 px -> 4,096
          packed image tokens of 64 channels, 512 text tokens of width 4096, rotary positions
One step: forward, the flow-matching MSE against random targets, backward, AdamW (fused). Rows, each compiled
whole with torch.compile (default mode): "diffusers" (the model as loaded), "patched" (after ak.apply). Prints
one JSON line per row and a summary line per model (the ratio), after the --batch max line if any. The two rows' first outputs (same weights, same
inputs) are compared: their relative difference (L2 norm) beyond --tol (default 2e-2 under bf16 autocast, 1e-4 in
fp32) marks the summary `first_output_ok: false` and makes the exit status 1.
--batch max (GPU only) finds, for each row, the largest power of two whose step fits in CUDA memory: it tries 2 first,
with the batch dimension of the inputs marked dynamic, so each row compiles once for the whole search (dynamo
specialises a size of 1, so 1 is tried, and compiled, only when 2 does not fit), then doubles; the patched row stops
past diffusers' largest. Both rows are then measured at the smaller of the two, each with a fresh static compile,
the graph `--batch N` measures; should that run out of memory, the batch is halved for both rows and the record says
so. Out of memory is torch.OutOfMemoryError or a RuntimeError whose message says "out of memory" or "ALLOC_FAILED"
(cuBLAS and cuDNN allocation failures). The search does not bisect between the last fit and the first failure.
--out DIR appends the lines to DIR/diffusers.jsonl and rewrites DIR/diffusers.md from the whole of it, one section
per run, oldest first. This is cleaner than naming the files by the models measured: runs into one folder (one model
per command, say, or the same model again) each add to one file, none overwrites another, and the table can never
disagree with the jsonl it is made from. Each line carries the run's id (its UTC start time and a random suffix), its
date, the GPU, the torch, triton and diffusers versions and the command. Each model's lines are written as soon as
that model is done, so a later failure loses nothing measured before it. With --batch max a model's lines start with
one holding each row's largest batch (the patched row's capped at diffusers'), the batch the search chose and the
batch measured.
--smoke checks the code on the CPU in seconds: toy widths, 64 px, two blocks, fp32, eager, one step per row, no
timing worth reading.
--sdpa restricts both rows' PyTorch attention to one SDPA backend (default: PyTorch's own choice). On torch 2.11
and an H100, compiled diffusers' own Flux (the baseline row) stopped at 1024 px in cuDNN attention's backward
(4,608 tokens, head dim 128; "mha_graph.execute ... is_good()") and, with --sdpa flash, with an illegal memory
access during inductor's autotuning (docs/diffusers.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

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


# (context tokens, context width, pooled width) of the text inputs: CLIP 77 + T5 256 for SD3, T5 512 for Flux
TEXT = {"sd35m": (333, 4096, 2048), "sd3": (333, 4096, 2048), "flux": (512, 4096, 768)}
# --smoke: the same classes at toy widths (2 heads x 16), so the CPU takes seconds
SMOKE = dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16)
SMOKE_TEXT = (7, 32, 16)


def build(name: str, layers: int, device, smoke: bool = False):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if name == "flux":
        cfg = dict(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=2 * layers,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
        if smoke:
            cfg.update(SMOKE, axes_dims_rope=(4, 6, 6))
        torch.manual_seed(0)
        return FluxTransformer2DModel(**cfg).to(device)

    cfg = dict(CONFIGS[name], num_layers=layers)
    if smoke:
        cfg.update(SMOKE, caption_projection_dim=32, pos_embed_max_size=16)
    if "dual_attention_layers" in cfg:
        cfg["dual_attention_layers"] = tuple(i for i in cfg["dual_attention_layers"] if i < layers)
    torch.manual_seed(0)
    return SD3Transformer2DModel(**cfg).to(device)


def make_inputs(name: str, batch: int, lat: int, device, text=None):
    n_txt, txt_width, pooled = text or TEXT[name]
    gen = torch.Generator(device=device).manual_seed(1)
    randn = lambda *shape: torch.randn(shape, device=device, generator=gen)
    if name == "flux":                  # 2x2 latent patches packed into 64 channels, as Flux's pipeline does
        side = lat // 2
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0),
                                             indexing="ij"), -1).reshape(-1, 3).to(device)
        inputs = dict(hidden_states=randn(batch, side * side, 64), encoder_hidden_states=randn(batch, n_txt, txt_width),
                      pooled_projections=randn(batch, pooled),
                      timestep=torch.rand(batch, device=device, generator=gen),
                      img_ids=img_ids, txt_ids=torch.zeros(n_txt, 3, device=device))
        return inputs, randn(batch, side * side, 64)
    inputs = dict(hidden_states=randn(batch, 16, lat, lat), encoder_hidden_states=randn(batch, n_txt, txt_width),
                  pooled_projections=randn(batch, pooled),
                  timestep=torch.rand(batch, device=device, generator=gen) * 1000)
    return inputs, randn(batch, 16, lat, lat)


def _sdpa(backend: str):
    def context():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(getattr(SDPBackend, backend))
    return context


SDPA = {"default": contextlib.nullcontext, "flash": _sdpa("FLASH_ATTENTION"),
        "efficient": _sdpa("EFFICIENT_ATTENTION"), "cudnn": _sdpa("CUDNN_ATTENTION")}


def make_step(model, smoke: bool):
    """One fine-tuning step of `model` on (inputs, target); compiled whole under bf16 autocast, or for --smoke eager
    in fp32 (the CPU's bf16 is emulated and slow)."""
    cuda = next(model.parameters()).is_cuda
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    step_fn = model if smoke else torch.compile(model)

    def step(inputs, target):
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=not smoke):
            out = step_fn(**inputs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.detach()
    return step


def measure(model, inputs, target, steps, smoke: bool = False):
    step = functools.partial(make_step(model, smoke), inputs, target)
    if smoke:                           # the code runs: one step, timed by the host clock
        t0 = time.perf_counter()
        first = step()
        return first, (time.perf_counter() - t0) * 1e3, time.perf_counter() - t0
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


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` says the device ran out of memory: torch.OutOfMemoryError, or a RuntimeError whose message says so
    (cuBLAS's and cuDNN's allocation failures, errors that wrap one)."""
    msg = str(err)
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in msg.lower() or "ALLOC_FAILED" in msg))


def largest_batch(step: Callable[[int], object], cap: int | None = None) -> int:
    """The largest power of two at which `step(batch)` runs without running out of memory, or 0 if not even 1 does.
    Tries 2 first (dynamo specialises a size of 1, so a first call at 2 can compile the batch as dynamic), 1 only if 2
    does not fit, else doubles; tries nothing above `cap`. Errors other than out of memory propagate."""
    def fits(batch: int) -> bool:
        try:
            step(batch)
        except Exception as err:  # noqa: BLE001 -- re-raised unless it is out of memory
            if not out_of_memory(err):
                raise
            return False
        return True

    cap = cap if cap is not None else float("inf")
    if cap < 2 or not fits(2):
        return 1 if cap >= 1 and fits(1) else 0
    batch = 2
    while 2 * batch <= cap and fits(2 * batch):
        batch *= 2
    return batch


def halving(run: Callable[[int], object], batch: int) -> tuple[object, int]:
    """`run(batch)`, the batch halved while it runs out of memory (at 1 the error stands): (its result, the batch it ran
    at)."""
    while True:
        try:
            return run(batch), batch
        except Exception as err:  # noqa: BLE001 -- re-raised unless it is out of memory above batch 1
            if batch == 1 or not out_of_memory(err):
                raise
        batch //= 2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def max_batch(name: str, layers: int, lat: int, device, sdpa: str, smoke: bool = False) -> dict[str, int]:
    """Each row's largest batch (`largest_batch`) whose compiled step fits in CUDA memory, the patched row's capped at
    diffusers': one model per row, the inputs' batch dimension marked dynamic from the first call, so each row
    compiles once (twice if only batch 1 fits)."""
    from archirf_kernels.integrations import diffusers as ak

    cuda = device.type == "cuda"
    fits: dict[str, int] = {}
    for row in ("diffusers", "patched"):
        torch._dynamo.reset()
        model = build(name, layers, device, smoke)
        if row == "patched":
            ak.apply(model)
        step = make_step(model, smoke)

        def run(batch: int) -> None:
            inputs, target = make_inputs(name, batch, lat, device, SMOKE_TEXT if smoke else None)
            for key, value in inputs.items():
                if not key.endswith("_ids"):                # Flux's position ids have no batch dimension
                    torch._dynamo.mark_dynamic(value, 0)
            with SDPA[sdpa]():
                step(inputs, target)
            if cuda:
                torch.cuda.synchronize()

        fits[row] = largest_batch(run, cap=fits.get("diffusers"))
        print(f"{name}: {row} fits batch {fits[row]}", file=sys.stderr, flush=True)
        del model, step, run
        if cuda:
            torch.cuda.empty_cache()
    if not min(fits.values()):
        raise SystemExit(f"{name}: batch 1 does not fit in CUDA memory; lower --layers or --res")
    return fits


def table(lines: list[dict]) -> str:
    """The markdown record of every run in `lines` (diffusers.jsonl), oldest first: each run's command and versions,
    its rows, each model's ratio and first-output check, and with --batch max what fitted."""
    runs: dict[object, list[dict]] = {}
    for line in lines:
        runs.setdefault(line.get("run"), []).append(line)
    gib = lambda v: "-" if v is None else f"{v:.2f}"
    md = ["# diffusers fine-tuning step, patched with archirf_kernels.integrations.diffusers", "",
          "Generated from diffusers.jsonl in this folder, one section per run.", ""]
    for run, group in runs.items():
        env = group[0]
        md += [f"## {env.get('date', '-')}, {env.get('gpu', '-')} (run {run})", "",
               f"`{env.get('command', '-')}`, torch {env.get('torch')}, triton {env.get('triton')}, "
               f"diffusers {env.get('diffusers')}.", "",
               "| model | row | batch | ms / step | img/s | first step s | peak GiB | modules changed |",
               "|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['model']} | {r['row']} | {r['batch']} | {r['ms']:.2f} | {r['img_per_s']:.2f} | "
               f"{r['first_step_s']:.1f} | {gib(r['peak_gib'])} | {r['changed']} |" for r in group if "row" in r]
        md.append("")
        for x in group:
            if "max_batch" in x:
                halved = f", halved from {x['searched_batch']} (out of memory)" if x["batch"] != x["searched_batch"] \
                    else ""
                md.append(f"- {x['model']} --batch max: largest batch diffusers {x['max_batch']['diffusers']}, "
                          f"patched {x['max_batch']['patched']} (capped at diffusers'); measured at {x['batch']}"
                          f"{halved}")
            elif "patched_vs_compiled_diffusers" in x:
                md.append(f"- {x['model']}: patched vs {'compiled' if x['compiled'] else 'eager'} diffusers "
                          f"{x['patched_vs_compiled_diffusers']:.3f}x; first outputs' relative difference "
                          f"{x['first_output_rel_diff']:.2g} (tolerance {x['tol']:g}): "
                          f"{'ok' if x['first_output_ok'] else '**EXCEEDED**'}")
        md.append("")
    return "\n".join(md)


def record(out: Path, lines: list[dict]) -> None:
    """Append `lines` to out/diffusers.jsonl and rewrite out/diffusers.md from the whole file."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "diffusers.jsonl").open("a") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))
    every = [json.loads(x) for x in (out / "diffusers.jsonl").read_text().splitlines() if x.strip()]
    (out / "diffusers.md").write_text(table(every))


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd35m")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", default="2", help="images per step, or max: the largest power of two that fits (GPU)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--res", type=int, default=1024, help="image pixels (latents are res / 8)")
    ap.add_argument("--sdpa", choices=sorted(SDPA), default="default",
                    help="SDPA backend for both rows' attention (default: PyTorch's dispatch)")
    ap.add_argument("--tol", type=float, default=None,
                    help="largest relative difference of the rows' first outputs (default 2e-2 in bf16, 1e-4 in fp32)")
    ap.add_argument("--out", default=None,
                    help="also append the lines to DIR/diffusers.jsonl and rewrite DIR/diffusers.md from it")
    ap.add_argument("--smoke", action="store_true",
                    help="on the CPU: toy widths, 64 px, two blocks, fp32, eager, one step per row (checks the code)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.res, args.steps = 2, 64, 1
    if args.batch == "max" and (args.smoke or not torch.cuda.is_available()):
        ap.error("--batch max doubles the batch until CUDA runs out of memory: it needs a GPU (not --smoke); "
                 "give a number of images")
    if args.batch != "max" and not (args.batch.isdigit() and int(args.batch) > 0):
        ap.error(f"--batch {args.batch}: give a positive number of images or max")
    if args.sdpa != "default" and args.smoke:
        ap.error("--sdpa picks a CUDA SDPA backend: leave it out with --smoke")
    tol = args.tol if args.tol is not None else (1e-4 if args.smoke else 2e-2)
    import diffusers

    from archirf_kernels.integrations import diffusers as ak

    device = torch.device("cpu" if args.smoke else "cuda")
    cuda = device.type == "cuda"
    lat = args.res // 8
    text = SMOKE_TEXT if args.smoke else None
    now = datetime.datetime.now(datetime.timezone.utc)
    run = dict(run=f"{now:%Y-%m-%dT%H:%M:%SZ}-{uuid.uuid4().hex[:6]}", date=f"{now:%Y-%m-%d}",
               gpu=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
               triton=_triton_version(), diffusers=diffusers.__version__,
               command="python -m benchmarks.bench_diffusers " + " ".join(argv if argv is not None else sys.argv[1:]))

    def measure_rows(name: str, batch: int) -> dict:
        inputs, target = make_inputs(name, batch, lat, device, text)
        rows = {}
        for row in ("diffusers", "patched"):
            torch._dynamo.reset()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            model = build(name, args.layers, device, args.smoke)
            report = ak.apply(model) if row == "patched" else None
            with SDPA[args.sdpa]():
                first, ms, first_s = measure(model, inputs, target, args.steps, args.smoke)
            rows[row] = dict(model=name, row=row, layers=args.layers, batch=batch, res=args.res, sdpa=args.sdpa,
                             ms=ms, img_per_s=batch / ms * 1e3, first_step_s=first_s,
                             peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                             changed=len(report.changed) if report else 0, first=first)
            del model
            if cuda:
                torch.cuda.empty_cache()
        return rows

    ok = True
    for name in args.models.split(","):
        lines = []
        if args.batch == "max":
            fits = max_batch(name, args.layers, lat, device, args.sdpa)
            if cuda:
                torch.cuda.empty_cache()
            rows, batch = halving(functools.partial(measure_rows, name), min(fits.values()))
            lines.append({"model": name, "max_batch": fits, "patched_capped_at_diffusers": True,
                          "searched_batch": min(fits.values()), "batch": batch})
        else:
            rows = measure_rows(name, int(args.batch))
        a, b = rows["diffusers"].pop("first"), rows["patched"].pop("first")
        rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
        summary = {"model": name, "patched_vs_compiled_diffusers": rows["diffusers"]["ms"] / rows["patched"]["ms"],
                   "first_output_rel_diff": rel, "tol": tol, "first_output_ok": rel <= tol,
                   "amp": "fp32" if args.smoke else "bf16", "compiled": not args.smoke}
        ok &= summary["first_output_ok"]
        lines = [{**x, **run} for x in (*lines, *rows.values(), summary)]
        for line in lines:
            print(json.dumps(line), flush=True)
        if args.out:
            record(Path(args.out), lines)
    if not ok:
        print(f"first outputs differ beyond --tol {tol:g}: see first_output_rel_diff above", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
