"""A whole autoencoder training step on one GPU: the autoencoder, LPIPS (VGG) and the PatchGAN, with the GAN on
(the steady state after disc_start), bf16 autocast, batch 64 -- ours against the reference's step on the same
networks compiled the same way, in one process.

    python -m benchmarks.bench_autoencoder --out DIR [--cases seed64,kl256] [--batch 64] [--steps 20] [--rounds 3]

--rounds R (R > 1) keeps every implementation alive and times them in R interleaved rounds, reporting each one's
median: rows a few percent apart are then not an artefact of which one ran first (small cases only: seed64).

Implementations (same weights, same data, AdamW fused for both networks):
- "ours": `AutoencoderLoss.generator_backward` and the discriminator step on the same reconstruction
  (archirf/tasks/autoencoder.py's step): one autoencoder forward; one pass through LPIPS and one through the
  discriminator for the adaptive weight's output gradients, reused for the autoencoder's backward; the fused
  norm + SiLU kernels (kernels=auto); the autoencoder's units compiled one by one (fullgraph, static shapes,
  as parallel.parallelize does), LPIPS and the discriminator compiled whole.
- "ours_plain": the same step with the norms in plain PyTorch (kernels=reference): ours / ours_plain is what
  the kernels add, ours_plain / reference what the step's algorithm adds.
- "reference": LDM's `LPIPSWithDiscriminator` step as its Lightning module runs it (the seed copies it): the
  generator step (forward, the loss, two autograd.grad calls on the last layer's weight, backward, step), then
  a second autoencoder forward (no graph: Lightning freezes the autoencoder for the discriminator's index)
  for the discriminator step. The same networks in plain PyTorch (kernels=reference; the bilinear autoencoder
  resampling with F.interpolate, as the seed wrote it), compiled the same way.
- "ours_graph" / "ours_plain_graph" with --graph: "ours" / "ours_plain" with the passes (both networks' forward and
  backward, everything but the optimizer steps) replayed as one CUDA graph, as tasks/autoencoder.py's graphs
  run them (the trainer refuses cuda_graph=on for an autoencoder until they match its eager step on a GPU).
- "ours_eager" / "reference_eager" with --eager: nothing compiled.
Each in NCHW and with channels_last input images ("_cl"; the weights as they are, cuDNN then runs the
convolutions channels-last); the speed-up compares each side at its faster layout.

Throughput: images/s over `steps` timed steps (CUDA events) after warm-up. Model FLOPs per image of a step,
for MFU: archirf.tasks.autoencoder.step_macs (the training log's MFU, against archirf.metrics.peak_flops),
2 FLOPs per multiply-add, counted once and the same for every implementation (the reference does more work).

Data: a folder of JPEGs made here (larger than the crop, as ImageNet's) through archirf's folder loader with
`--workers` decode workers, alone: images/s the loader can feed, against the step's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = {  # name: (preset, resolution, loss reduction, var/kl) -- the recipes' settings
    "seed64": ("Seed-f8c16", 64, "mean"),
    "kl256": ("KL-f8c4", 256, "sum"),
}
def _networks(preset: str, res: int, device):
    from archirf.losses.discriminator import PatchDiscriminator
    from archirf.losses.lpips import LPIPS
    from archirf.models.autoencoder import build_autoencoder

    torch.manual_seed(0)
    ae = build_autoencoder(preset, input_size=res, in_channels=3).to(device)
    disc = PatchDiscriminator(3, 64, 3, "group").to(device)
    lpips = LPIPS("vgg", "random").to(device).eval().requires_grad_(False)
    return ae, disc, lpips


def _set_kernels(ae, kernels: str) -> None:
    from archirf.models.autoencoder import ChannelRMSNorm, GroupNorm

    for m in ae.modules():
        if isinstance(m, (GroupNorm, ChannelRMSNorm)):
            m.kernels = kernels


def set_resampling(ae, impl: str) -> None:
    """The bilinear autoencoder's resampling: "fused" (ours: 2x2 average pool down; up, inside compiled units,
    the pointwise upsample2x_bilinear) or "interpolate" (F.interpolate both ways). The same numbers."""
    from archirf.models.autoencoder import Downsample, Upsample

    for m in ae.modules():
        if isinstance(m, Downsample):
            m.impl = "interpolate" if impl == "interpolate" else "pool"
        elif isinstance(m, Upsample):
            m.impl = "interpolate" if impl == "interpolate" else "lerp"


def _bf16(x: torch.Tensor, cache: bool = True):
    """bf16 autocast on the GPU; fp32 for --smoke on the CPU, whose bf16 convolutions can take minutes a step
    without native bf16 instructions (the smoke run checks the code, not the numbers)."""
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda, cache_enabled=cache)


class Ours:
    def __init__(self, ae, disc, lpips, reduction: str, compile: bool, kernels: str = "auto"):
        from archirf import parallel
        from archirf.losses.autoencoder import AutoencoderLoss, LossWeights

        _set_kernels(ae, kernels)
        self.ae, self.disc = ae, disc
        if compile:
            parallel.parallelize(ae, None, param_dtype=None, compile=True, shard=False)
            disc.compile(fullgraph=True)
            lpips.compile(fullgraph=True)
        self.loss = AutoencoderLoss(LossWeights(reduction=reduction, disc_start=0), lpips, disc)
        self.opt = torch.optim.AdamW(ae.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0, fused=True)
        self.dopt = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0, fused=True)

    def passes(self, x, cache: bool = True):
        torch._functorch.config.donated_buffer = True          # (the default)
        with _bf16(x, cache):
            self.disc.requires_grad_(False)
            out = self.ae(x)
            loss, _ = self.loss.generator_backward(x, out, self.ae.decoder.conv_out, 1)
            self.disc.requires_grad_(True)
            d, _ = self.loss.discriminator_step(x, out["reconstruction"], 1)
            d.backward()
        return loss

    def step(self, x):
        self.passes(x)
        self.opt.step()
        self.dopt.step()
        self.opt.zero_grad(set_to_none=True)
        self.dopt.zero_grad(set_to_none=True)


class OursGraph(Ours):
    """ours with its passes (everything but the two optimizer steps) replayed as one CUDA graph
    (archirf/step_graph.py): the gradients stay the graph's tensors."""

    def __init__(self, *args, **kwargs):
        from archirf.step_graph import StepGraph

        super().__init__(*args, **kwargs)
        self.graph = StepGraph(lambda x: self.passes(x, cache=False),
                               list(self.ae.parameters()) + list(self.disc.parameters()))

    def step(self, x):
        self.graph(x)
        self.opt.step()
        self.dopt.step()


class Reference:
    """LDM's step (taming / ldm `LPIPSWithDiscriminator`, Lightning's two optimizer indices), plain PyTorch: the
    networks' norms without the fused kernels."""

    def __init__(self, ae, disc, lpips, reduction: str, compile: bool, kernels: str = "reference"):
        from archirf import parallel

        _set_kernels(ae, kernels)
        set_resampling(ae, "interpolate")           # the seed's F.interpolate both ways, as written
        self.ae, self.disc, self.lpips, self.reduction = ae, disc, lpips, reduction
        if compile:
            parallel.parallelize(ae, None, param_dtype=None, compile=True, shard=False)
            disc.compile(fullgraph=True)
            lpips.compile(fullgraph=True)
        self.opt = torch.optim.AdamW(ae.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0, fused=True)
        self.dopt = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0, fused=True)

    def _reg(self, out):
        from archirf.models.autoencoder import AutoencoderKL, ClippedAutoencoder

        if "logvar" in out:
            return 1e-6 * AutoencoderKL.kl(out["mean"], out["logvar"]).mean()
        return 0.01 * ClippedAutoencoder.variance_loss(out["z"])

    def step(self, x):
        # its autograd.grad calls keep the graph (retain_graph), which compiled backward graphs that donate
        # their buffers refuse: compile these without buffer donation (read when a graph is compiled)
        torch._functorch.config.donated_buffer = False
        with _bf16(x):
            # optimizer_idx 0: the generator (Lightning freezes the other optimizer's parameters)
            self.disc.requires_grad_(False)
            out = self.ae(x)
            x_hat = out["reconstruction"]
            rec = (x.float() - x_hat.float()).abs() + self.lpips(x, x_hat).reshape(-1, 1, 1, 1)
            nll = (rec.sum(dim=(1, 2, 3)) if self.reduction == "sum" else rec.mean(dim=(1, 2, 3))).mean()
            g = -self.disc(x_hat).float().mean()
            w = self.ae.decoder.conv_out.weight
            gn = torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
            gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
            lam = (gn / (gg + 1e-4)).clamp(0, 1e4).detach() * 0.5
            loss = nll + self._reg(out) + lam * g
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with _bf16(x):
            # optimizer_idx 1: the discriminator, on a second forward of the autoencoder (whose parameters
            # Lightning's toggle_optimizer has frozen: no graph)
            self.disc.requires_grad_(True)
            with torch.no_grad():
                x_hat = self.ae(x)["reconstruction"]
            real, fake = self.disc(x.detach()), self.disc(x_hat.detach())
            d = 0.5 * (torch.relu(1 - real.float()).mean() + torch.relu(1 + fake.float()).mean())
            d.backward()
        self.dopt.step()
        self.dopt.zero_grad(set_to_none=True)


def _record(case: dict, label: str, batch: int, sec: float, first: float, flops: float, device, name: str,
            memory_key: str = "max_memory_gib") -> None:
    """memory_key: max_memory_gib (this implementation alone) or, with --rounds, process_peak_gib (all of them)."""
    from archirf.metrics import peak_flops

    rate, peak = batch / sec, peak_flops(device)
    case["impls"].setdefault(label, {}).update({
        "ms_per_step": sec * 1e3, "img_per_s": rate, "first_step_s": first, "mfu": rate * flops / peak if peak else None,
        memory_key: torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None})
    print(f"{name} {label}: {sec * 1e3:.1f} ms/step, {rate:.0f} img/s, MFU "
          f"{case['impls'][label]['mfu'] or float('nan'):.3f} (first step {first:.1f} s)", flush=True)


def _time(impl, x, steps: int, warmup: int = 3) -> tuple[float, float]:
    """(seconds per step, first-call seconds); CUDA events on a GPU."""
    cuda = x.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    impl.step(x)
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        impl.step(x)
    sync()
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(steps):
            impl.step(x)
        return (time.perf_counter() - t0) / steps, first
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        impl.step(x)
    end.record()
    sync()
    return start.elapsed_time(end) / 1e3 / steps, first


def _loader_rate(res: int, batch: int, workers: int, images: int, folder: Path) -> float:
    """Images/s of archirf's folder loader (decode, resize, crop, flip, to the GPU) alone."""
    from archirf.config import load_config
    from archirf.data import build_loader
    from benchmarks.eval_fid import _write_jpegs

    if not folder.exists():
        _write_jpegs(folder, images)
    cfg = load_config(None, ["data.source=folder", f"data.root={folder}", f"data.resolution={res}", "data.channels=3",
                             f"data.num_workers={workers}", "data.num_classes=0", "data.random_flip=true"])
    loader = build_loader(cfg, batch, torch.device("cuda"), 0, 1)
    for _ in range(5):
        next(loader)
    n = max(20, images // batch // 2)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        x, _ = next(loader)
    torch.cuda.synchronize()
    rate = n * batch / (time.perf_counter() - t0)
    if hasattr(loader, "close"):
        loader.close()
    return rate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default="seed64,kl256")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eager", action="store_true", help="also time both steps uncompiled")
    p.add_argument("--layouts", default="nchw,cl", help="input memory formats: nchw, cl (channels_last images; the "
                                                        "weights stay as they are)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--data-images", type=int, default=20_000, help="JPEGs made for the loader's rate (0: skip)")
    p.add_argument("--smoke", action="store_true", help="on the CPU: batch 2, one step, eager only (checks the code)")
    p.add_argument("--graph", action="store_true", help="also ours with its passes as one CUDA graph (archirf/step_graph.py)")
    p.add_argument("--rounds", type=int, default=1,
                   help="timed rounds per implementation, interleaved across implementations (all of them kept "
                        "alive: small cases such as seed64), the median reported; 1: one after the other")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.layouts, args.data_images = 2, 1, "nchw", 0
    from archirf.tasks.autoencoder import step_macs

    device = torch.device("cpu" if args.smoke else "cuda")
    torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"gpu": gpu, "torch": torch.__version__, "batch": args.batch, "steps": args.steps, "cases": {}}
    tmp = Path(tempfile.mkdtemp(prefix="ae_bench_"))
    for name in args.cases.split(","):
        preset, res, reduction = CASES[name]
        x = (torch.rand(args.batch, 3, res, res, device=device) * 2 - 1)
        ae, disc, lpips = _networks(preset, res, device)
        macs = step_macs(ae, lpips, disc, res, 3)
        flops = 2 * macs["step"]
        case = {"preset": preset, "resolution": res, "macs_per_image": macs, "model_flops_per_image": flops,
                "impls": {}}
        impls = []
        for layout in args.layouts.split(","):
            tag = "" if layout == "nchw" else "_cl"
            if not args.smoke:
                impls += [(f"ours{tag}", Ours, True, layout, "auto"), (f"ours_plain{tag}", Ours, True, layout, "reference"),
                          (f"reference{tag}", Reference, True, layout, "reference")]
                if args.graph:
                    impls += [(f"ours_graph{tag}", OursGraph, True, layout, "auto"),
                              (f"ours_plain_graph{tag}", OursGraph, True, layout, "reference")]
            if args.eager or args.smoke:
                impls += [(f"ours_eager{tag}", Ours, False, layout, "reference"),
                          (f"reference_eager{tag}", Reference, False, layout, "reference")]
        kept = {}           # --rounds > 1: label -> (impl, input, [seconds per step of each round])
        for label, cls, compiled, layout, kernels in impls:
            if args.rounds == 1:
                torch._dynamo.reset()
            nets = [copy.deepcopy(n) for n in (ae, disc, lpips)]
            impl = cls(*nets, reduction, compiled, kernels)
            xin = x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x
            sec, first = _time(impl, xin, args.steps, warmup=0 if args.smoke else 3)   # smoke: the code runs
            if args.rounds > 1:
                kept[label] = (impl, xin, [sec], first)
                continue
            _record(case, label, args.batch, sec, first, flops, device, name)
            del impl, nets
            if x.is_cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        for _ in range(args.rounds - 1):           # interleaved: drifts of clock and temperature hit every row alike
            for label, (impl, xin, secs, _) in kept.items():
                secs.append(_time(impl, xin, args.steps, warmup=1)[0])
        for label, (impl, xin, secs, first) in kept.items():
            case["impls"].setdefault(label, {})["rounds_ms"] = [t * 1e3 for t in secs]
            _record(case, label, args.batch, statistics.median(secs), first, flops, device, name, "process_peak_gib")
        kept.clear()
        def best(prefix: str) -> dict:             # at its faster layout
            rows = [v for n, v in case["impls"].items() if n in (prefix, prefix + "_cl")]
            return max(rows, key=lambda v: v["img_per_s"])

        o, r = best("ours_eager" if args.smoke else "ours"), best("reference_eager" if args.smoke else "reference")
        case["speedup_vs_reference"] = o["img_per_s"] / r["img_per_s"]
        if not args.smoke:
            case["speedup_of_kernels"] = o["img_per_s"] / best("ours_plain")["img_per_s"]
        if args.graph:
            case["speedup_graph_vs_reference"] = max(best(n)["img_per_s"] for n in ("ours_graph", "ours_plain_graph")) \
                / r["img_per_s"]
        if args.data_images:
            case["loader_img_per_s"] = _loader_rate(res, args.batch, args.workers, args.data_images,
                                                    tmp / f"jpegs_{res}")
            case["loader_workers"] = args.workers
            print(f"{name} loader: {case['loader_img_per_s']:.0f} img/s with {args.workers} workers "
                  f"(the step: {o['img_per_s']:.0f} img/s)", flush=True)
        results["cases"][name] = case
        del ae, disc, lpips
    (out / "autoencoder_step.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: {"speedup": v["speedup_vs_reference"], "graph": v.get("speedup_graph_vs_reference")}
                      for k, v in results["cases"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
