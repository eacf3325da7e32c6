"""A whole autoencoder training step on one GPU: the autoencoder, LPIPS (VGG) and the PatchGAN, with the GAN on
(the steady state after disc_start), bf16 autocast, batch 64 -- ours against the reference's step on the same
networks compiled the same way, in one process.

    python -m benchmarks.bench_autoencoder --out DIR [--cases seed64,kl256] [--batch 64] [--steps 20]

Implementations (same weights, same data, AdamW fused for both networks):
- "ours": `AutoencoderLoss.generator_backward` and the discriminator step on the same reconstruction
  (archirf/tasks/autoencoder.py's step): one autoencoder forward; one pass through LPIPS and one through the
  discriminator for the adaptive weight's output gradients, reused for the autoencoder's backward; the
  autoencoder's units compiled one by one (fullgraph, static shapes, as parallel.parallelize does), LPIPS and
  the discriminator compiled whole.
- "reference": LDM's `LPIPSWithDiscriminator` step as its Lightning module runs it (the seed copies it): the
  generator step (forward, the loss, two autograd.grad calls on the last layer's weight, backward, step), then
  a second autoencoder forward for the discriminator step. The same networks, compiled the same way.
- "ours_eager" / "reference_eager" with --eager: nothing compiled.

Throughput: images/s over `steps` timed steps (CUDA events) after warm-up. Model FLOPs per image of a step,
for MFU (counted once, the same for every implementation; the reference does more work): autoencoder forward
and backward 3 x its forward; LPIPS forwards of x and x_hat and the backward to x_hat, 3 x one image's
forward; the discriminator's forward and backward to x_hat (generator) and its forward on both and full
backward (discriminator step), 2 + 2 x 3 = 8 x one image's forward; 2 FLOPs per multiply-add.

Data: a folder of JPEGs made here (larger than the crop, as ImageNet's) through archirf's folder loader with
`--workers` decode workers, alone: images/s the loader can feed, against the step's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = {  # name: (preset, resolution, loss reduction, var/kl) -- the recipes' settings
    "seed64": ("Seed-f8c16", 64, "mean"),
    "kl256": ("KL-f8c4", 256, "sum"),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _peak(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _macs(module: torch.nn.Module, shape: tuple[int, ...]) -> int:
    from archirf.models.autoencoder import _count_macs

    twin = copy.deepcopy(module).to("meta")
    return _count_macs(twin, shape)


def _networks(preset: str, res: int, device):
    from archirf.losses.discriminator import PatchDiscriminator
    from archirf.losses.lpips import LPIPS
    from archirf.models.autoencoder import build_autoencoder

    torch.manual_seed(0)
    ae = build_autoencoder(preset, input_size=res, in_channels=3).to(device)
    disc = PatchDiscriminator(3, 64, 3, "group").to(device)
    lpips = LPIPS("vgg", "random").to(device).eval().requires_grad_(False)
    return ae, disc, lpips


def _lpips_macs(lpips, res: int) -> int:
    class One(torch.nn.Module):            # LPIPS of one image branch: its features
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x, x)

    return _macs(One(lpips), (1, 3, res, res)) // 2


class Ours:
    def __init__(self, ae, disc, lpips, reduction: str, compile: bool):
        from archirf import parallel
        from archirf.losses.autoencoder import AutoencoderLoss, LossWeights

        self.ae, self.disc = ae, disc
        if compile:
            parallel.parallelize(ae, None, param_dtype=None, compile=True, shard=False)
            disc.compile(fullgraph=True)
            lpips.compile(fullgraph=True)
        self.loss = AutoencoderLoss(LossWeights(reduction=reduction, disc_start=0), lpips, disc)
        self.opt = torch.optim.AdamW(ae.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0, fused=True)
        self.dopt = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0, fused=True)

    def step(self, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            self.disc.requires_grad_(False)
            out = self.ae(x)
            self.loss.generator_backward(x, out, self.ae.decoder.conv_out, 1)
            self.disc.requires_grad_(True)
            d, _ = self.loss.discriminator_step(x, out["reconstruction"], 1)
            d.backward()
        self.opt.step()
        self.dopt.step()
        self.opt.zero_grad(set_to_none=True)
        self.dopt.zero_grad(set_to_none=True)


class Reference:
    """LDM's step (taming / ldm `LPIPSWithDiscriminator`, Lightning's two optimizer indices)."""

    def __init__(self, ae, disc, lpips, reduction: str, compile: bool):
        from archirf import parallel

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
        with torch.autocast("cuda", dtype=torch.bfloat16):
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
        with torch.autocast("cuda", dtype=torch.bfloat16):
            # optimizer_idx 1: the discriminator, on a second forward of the autoencoder
            self.disc.requires_grad_(True)
            x_hat = self.ae(x)["reconstruction"]
            real, fake = self.disc(x.detach()), self.disc(x_hat.detach())
            d = 0.5 * (torch.relu(1 - real.float()).mean() + torch.relu(1 + fake.float()).mean())
            d.backward()
        self.dopt.step()
        self.dopt.zero_grad(set_to_none=True)


def _time(impl, x, steps: int, warmup: int = 3) -> tuple[float, float]:
    """(seconds per step, first-call seconds)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    impl.step(x)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        impl.step(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        impl.step(x)
    end.record()
    torch.cuda.synchronize()
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
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--data-images", type=int, default=20_000, help="JPEGs made for the loader's rate (0: skip)")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"gpu": gpu, "torch": torch.__version__, "batch": args.batch, "steps": args.steps, "cases": {}}
    tmp = Path(tempfile.mkdtemp(prefix="ae_bench_"))
    for name in args.cases.split(","):
        preset, res, reduction = CASES[name]
        x = (torch.rand(args.batch, 3, res, res, device=device) * 2 - 1)
        ae, disc, lpips = _networks(preset, res, device)
        m = ae.flops_per_image()
        ae_macs = m["encoder"] + m["decoder"]
        d_macs = _macs(disc, (1, 3, res, res))
        l_macs = _lpips_macs(lpips, res)
        flops = 2 * (3 * ae_macs + 3 * l_macs + 8 * d_macs)
        case = {"preset": preset, "resolution": res, "macs_per_image": {"autoencoder": ae_macs, "lpips": l_macs,
                                                                          "discriminator": d_macs},
                "model_flops_per_image": flops, "impls": {}}
        impls = [("ours", Ours, True), ("reference", Reference, True)]
        if args.eager:
            impls += [("ours_eager", Ours, False), ("reference_eager", Reference, False)]
        for label, cls, compiled in impls:
            torch._dynamo.reset()
            nets = [copy.deepcopy(n) for n in (ae, disc, lpips)]
            impl = cls(*nets, reduction, compiled)
            sec, first = _time(impl, x, args.steps)
            rate = args.batch / sec
            peak = _peak(gpu)
            case["impls"][label] = {"ms_per_step": sec * 1e3, "img_per_s": rate, "first_step_s": first,
                                    "mfu": rate * flops / (peak * 1e12) if peak else None,
                                    "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
            print(f"{name} {label}: {sec * 1e3:.1f} ms/step, {rate:.0f} img/s, MFU "
                  f"{case['impls'][label]['mfu'] or float('nan'):.3f} (first step {first:.1f} s)", flush=True)
            del impl, nets
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        o, r = case["impls"]["ours"], case["impls"]["reference"]
        case["speedup_vs_reference"] = o["img_per_s"] / r["img_per_s"]
        if args.data_images:
            case["loader_img_per_s"] = _loader_rate(res, args.batch, args.workers, args.data_images,
                                                    tmp / f"jpegs_{res}")
            case["loader_workers"] = args.workers
            print(f"{name} loader: {case['loader_img_per_s']:.0f} img/s with {args.workers} workers "
                  f"(the step: {o['img_per_s']:.0f} img/s)", flush=True)
        results["cases"][name] = case
        del ae, disc, lpips
    (out / "autoencoder_step.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: {"speedup": v["speedup_vs_reference"]} for k, v in results["cases"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
