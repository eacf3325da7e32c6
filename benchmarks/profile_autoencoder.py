"""Where an autoencoder training step's time goes on one GPU: bench_autoencoder's "ours" step under
torch.profiler, and the step's rate with each resampling implementation and batch size.

    python -m benchmarks.profile_autoencoder --out DIR [--case seed64] [--batches 64,256] [--steps 10]

For each (resampling, batch) variant: ms per step and img/s over `steps` timed steps (CUDA events, after
warm-up), as bench_autoencoder times them. Resampling: "interpolate" (F.interpolate both ways, as the seed
wrote it) or "fused" (the model's default: 2x2 average pool down, and up the pointwise form
`archirf.models.autoencoder.upsample2x_bilinear` inside compiled units); both give the same numbers. Then the
default variant at the first batch size under torch.profiler for 3 steps: the kernels by GPU time
(DIR/<case>_kernels.txt), the GPU's busy time per step against the wall time (a GPU idle between kernels means
the step is bound by the host), and a Chrome trace (DIR/<case>_trace.json, when --trace).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _variant(case: str, batch: int, resample: str, steps: int, profile_dir: Path | None, trace: bool) -> dict:
    from benchmarks.bench_autoencoder import CASES, Ours, _networks, _time, set_resampling

    preset, res, reduction = CASES[case]
    torch._dynamo.reset()
    ae, disc, lpips = _networks(preset, res, torch.device("cuda"))
    set_resampling(ae, resample)
    impl = Ours(ae, disc, lpips, reduction, True, "auto")
    x = (torch.rand(batch, 3, res, res, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
    sec, first = _time(impl, x, steps)
    row = {"case": case, "batch": batch, "resample": resample, "ms_per_step": sec * 1e3, "img_per_s": batch / sec,
           "first_step_s": first}
    if profile_dir is not None:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                impl.step(x)
            torch.cuda.synchronize()
        events = prof.key_averages()
        table = events.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90)
        (profile_dir / f"{case}_kernels.txt").write_text(table)
        kernels = [e for e in events if e.self_device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.self_device_time_total for e in kernels) / 3
        row["gpu_busy_ms_per_step"] = busy_us / 1e3
        row["kernel_launches_per_step"] = sum(e.count for e in kernels) / 3
        row["top_kernels"] = [{"name": e.key[:120], "ms_per_step": e.self_device_time_total / 3e3,
                               "calls_per_step": e.count / 3}
                              for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]]
        if trace:
            prof.export_chrome_trace(str(profile_dir / f"{case}_trace.json"))
    print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
    del impl, ae, disc, lpips
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--case", default="seed64")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--resamples", default="fused,interpolate")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--trace", action="store_true")
    args = p.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    resamples = args.resamples.split(",")
    rows = []
    for resample in resamples:
        for batch in batches:
            profiled = resample == resamples[0] and batch == batches[0]
            rows.append(_variant(args.case, batch, resample, args.steps, out if profiled else None, args.trace))
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    (out / f"{args.case}_profile.json").write_text(json.dumps(result, indent=1))
    top = rows[0].get("top_kernels", [])
    print(f"profiled: {rows[0]['ms_per_step']:.1f} ms/step wall, GPU busy {rows[0]['gpu_busy_ms_per_step']:.1f} ms, "
          f"{rows[0]['kernel_launches_per_step']:.0f} kernels/step")
    for k in top[:20]:
        print(f"  {k['ms_per_step']:7.2f} ms  x{k['calls_per_step']:<5.0f} {k['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
