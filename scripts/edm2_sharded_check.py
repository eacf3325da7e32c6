"""EDM2's forced weight normalisation on FSDP2 shards equals the unsharded result.

    torchrun --nproc_per_node=2 scripts/edm2_sharded_check.py [--preset EDM2-S | none] [--out FILE] [key=value ...]

Every rank builds the same EDM2 UNet (seeded), perturbs its weights away from unit rows, and keeps
one unsharded copy; the other copy is sharded per block with FSDP2 (NCCL on GPUs, gloo on CPU).
Both run `post_optimizer_step()` (the sharded one on each rank's local rows, with the Triton kernel
on CUDA); rank 0 gathers the sharded result, compares it with the unsharded one (allclose, 1e-6),
prints the largest difference and PASS or CHECK, and with --out saves the gathered weights.
Exit status 0 on PASS. `--preset none` takes the shape from the key=value overrides (tests use a
tiny UNet with odd row counts this way).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from archirf.config import load_config
from archirf.models import build_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="EDM2-S", help="an EDM2 preset, or none (shape from the overrides)")
    ap.add_argument("--out", default=None, help="rank 0 saves the gathered sharded result here (torch.save)")
    ap.add_argument("overrides", nargs="*", help="more config key=value (e.g. data.resolution=16)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    preset = [] if args.preset == "none" else [f"model.preset={args.preset}"]
    cfg = load_config(None, ["model.name=edm2_unet", *preset, "data.resolution=64",
                             "data.channels=4", "data.num_classes=1000", "model.uncertainty_weighting=true",
                             *args.overrides])
    torch.manual_seed(0)
    full = build_model(cfg)
    with torch.no_grad():  # rows far from unit RMS, as after an optimizer step
        for p in full.parameters():
            p.mul_(2.0).add_(0.3 * torch.randn_like(p))
    full = full.to(device)
    before = {k: v.detach().cpu().clone() for k, v in full.state_dict().items()}
    sharded = copy.deepcopy(full)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in sharded.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    sharded.post_optimizer_step()      # each rank's local rows
    full.post_optimizer_step()         # whole tensors
    got = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ok = True
    if dist.get_rank() == 0:
        want = {k: v.detach().cpu() for k, v in full.state_dict().items()}
        same_keys = got.keys() == want.keys()
        worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want) if same_keys else float("inf")
        moved = sum(not torch.equal(before[k], want[k]) for k in want)
        ok = same_keys and moved > 0 and all(torch.allclose(got[k], want[k], atol=1e-6, rtol=1e-6) for k in want)
        print(f"edm2 forced weight norm, {args.preset}, {dist.get_world_size()} ranks on {device.type}: "
              f"{len(want)} tensors, {moved} normalised, max |sharded - unsharded| = {worst:.2e} -> "
              f"{'PASS' if ok else 'CHECK'}", flush=True)
        if args.out:
            torch.save(got, args.out)
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag)
    dist.destroy_process_group()
    time.sleep(0.2)  # let gloo's threads finish first (see archirf/parallel.py)
    return int(flag.item() > 0)


if __name__ == "__main__":
    sys.exit(main())
