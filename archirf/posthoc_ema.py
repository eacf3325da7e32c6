"""Post-hoc EMA (EDM2, Karras et al. 2024, Sec. 3): choose the EMA width after training.

During training (`ema.posthoc_sigma_rels`, e.g. [0.05, 0.10]) the trainer keeps one power-function EMA per
width and every `ema.posthoc_every` images writes all of them to RUN_DIR/posthoc/phema-<images>.safetensors
(fp16, as EDM2 stores them). The average of weights w(tau) under a power-function profile
p_{gamma,t}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] is linear in the profile, so an EMA of any
other width sigma_rel at any time t is approximated by the combination sum_i x_i ema_i whose profile
sum_i x_i p_i is closest to the target profile in L2: x solves the normal equations A x = b with
A_ij = <p_i, p_j>, b_i = <p_i, p_target>, in closed form:

    <p_{a,s}, p_{b,u}> = (a + 1)(b + 1) min(s, u)^(a + b + 1) / ((a + b + 1) s^(a + 1) u^(b + 1))

    python -m archirf.posthoc_ema RUN_DIR --sigma-rel 0.13 [--at IMAGES]

writes RUN_DIR/snapshots/ema_sigma0.13-<images>.safetensors, a snapshot that `python -m archirf.sample`
takes like any other (the buffers and config come from the run's newest snapshot).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Optional

import torch

from .ema import EMA, power_function_exponent

FILE = re.compile(r"phema-(\d{12})\.safetensors$")
FP16_MAX = 65504.0


def _inner(ga: torch.Tensor, ta: torch.Tensor, gb: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
    """<p_{ga,ta}, p_{gb,tb}> for broadcastable fp64 tensors, written as a ratio of times to a power <= 0
    over the later time: min^(a+b+1) / (ta^(a+1) tb^(b+1)) itself underflows to 0/0 for narrow profiles."""
    ratio = torch.where(ta < tb, (ta / tb) ** gb, (tb / ta) ** ga)
    return (ga + 1) * (gb + 1) * ratio / ((ga + gb + 1) * torch.maximum(ta, tb))


def posthoc_coefficients(times: list[float], sigma_rels: list[float], t_target: float,
                         sigma_target: float) -> torch.Tensor:
    """Least-squares weights (fp64, one per stored EMA) whose profiles sum to the target profile."""
    scale = max(max(times), t_target)                   # the solution does not depend on the time unit
    t = torch.tensor(times, dtype=torch.float64) / scale
    g = torch.tensor([power_function_exponent(s) for s in sigma_rels], dtype=torch.float64)
    gt = torch.tensor(power_function_exponent(sigma_target), dtype=torch.float64)
    tt = torch.tensor(t_target / scale, dtype=torch.float64)
    A = _inner(g[:, None], t[:, None], g[None, :], t[None, :])
    b = _inner(g, t, gt, tt)
    return torch.linalg.lstsq(A, b[:, None], driver="gelsd").solution[:, 0]


class PostHocEMA:
    """One power-function EMA per width in `sigma_rels`, averaged from image 0, saved for reconstruction."""

    def __init__(self, model: torch.nn.Module, sigma_rels: list[float]):
        self.emas = {f"{s:.4f}": EMA(model, sigma_rel=s) for s in sigma_rels}

    def update(self, model: torch.nn.Module, images_seen: int, batch_images: int) -> None:
        for ema in self.emas.values():
            ema.update(model, images_seen, batch_images)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {key: ema.state_dict() for key, ema in self.emas.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for key, ema in self.emas.items():
            if key not in state:
                raise KeyError(f"the checkpoint holds no post-hoc EMA of sigma_rel {key} (it holds {sorted(state)})")
            ema.load_state_dict(state[key])

    def save(self, run_dir: Path, images_seen: int, is_main: bool) -> Optional[Path]:
        """Writes posthoc/phema-<images>.safetensors (every rank joins the gathers; rank 0 writes)."""
        from safetensors.torch import save_file

        tensors = {}
        for key, ema in self.emas.items():
            for name, t in ema.full_state_dict(keep=is_main).items():
                small = t.abs().max() <= FP16_MAX if t.numel() else True   # fp16 as EDM2, unless it would overflow
                tensors[f"{key}/{name}"] = (t.to(torch.float16) if small else t).contiguous()
        if not is_main:
            return None
        out = Path(run_dir) / "posthoc"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"phema-{images_seen:012d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"images_seen": str(images_seen),
                                               "sigma_rels": json.dumps(sorted(self.emas))})
        tmp.replace(path)
        return path


    def set_aside_after(self, run_dir: Path, images_seen: int) -> list[Path]:
        """Moves saved files later than `images_seen` (a stretch this run does not continue: a resume from an
        older checkpoint, or a fresh start) to posthoc/abandoned-<time>/, where the solver does not look."""
        later = [p for n, p in stored_profiles(run_dir) if n > images_seen]
        if not later:
            return []
        keep = Path(run_dir) / "posthoc" / time.strftime("abandoned-%Y%m%d-%H%M%S")
        keep.mkdir()
        return [p.rename(keep / p.name) for p in later]


def stored_profiles(run_dir: Path, at: Optional[int] = None) -> list[tuple[int, Path]]:
    """(images, file) of the saved post-hoc EMAs up to `at` images (all by default), oldest first."""
    found = sorted((int(m.group(1)), p) for p in (Path(run_dir) / "posthoc").glob("phema-*.safetensors")
                   if (m := FILE.search(p.name)))
    return [(n, p) for n, p in found if at is None or n <= at]


def reconstruct(run_dir: Path, sigma_rel: float, at: Optional[int] = None) -> tuple[dict[str, torch.Tensor], int,
                                                                                      torch.Tensor]:
    """(weights, images, coefficients): the EMA of width sigma_rel at the newest stored time <= at."""
    from safetensors import safe_open

    files = stored_profiles(run_dir, at)
    if not files:
        where, every = Path(run_dir) / "posthoc", stored_profiles(run_dir)
        if every:
            raise FileNotFoundError(f"no post-hoc EMA file in {where} up to {at:,} images: the first is at "
                                    f"{every[0][0]:,}; choose --at between it and {every[-1][0]:,}")
        raise FileNotFoundError(f"no post-hoc EMA files in {where}: train with ema.posthoc_sigma_rels=[0.05,0.1] and "
                                f"ema.posthoc_every=IMAGES")
    times, widths = [], []
    for images, path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in json.loads(f.metadata()["sigma_rels"]):
                times.append(float(images))
                widths.append(float(key))
    t_target = times[-1]
    x = posthoc_coefficients(times, widths, t_target, sigma_rel)
    coef = {(images, f"{w:.4f}"): c for images, w, c in zip(times, widths, x.tolist())}
    out: dict[str, torch.Tensor] = {}
    for images, path in files:                          # each file read once: name = "<sigma_rel>/<parameter>"
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                key, param = name.split("/", 1)
                acc = out.setdefault(param, torch.zeros(f.get_slice(name).get_shape(), dtype=torch.float64))
                acc.add_(f.get_tensor(name).double(), alpha=coef[(float(images), key)])
    return {k: v.float() for k, v in out.items()}, int(t_target), x


def main(argv: Optional[list[str]] = None) -> int:
    from . import checkpoint as ckpt

    ap = argparse.ArgumentParser(prog="archirf.posthoc_ema", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--sigma-rel", type=float, required=True, help="the EMA width to reconstruct (e.g. 0.13)")
    ap.add_argument("--at", type=int, default=None, help="images: use the files up to this point (default: all)")
    args = ap.parse_args(argv)
    try:
        power_function_exponent(args.sigma_rel)
        weights, images, x = reconstruct(args.run_dir, args.sigma_rel, args.at)
    except (ValueError, FileNotFoundError) as err:
        ap.error(str(err))
    except RuntimeError as err:   # files of different models in one posthoc/ (shapes that do not add up)
        ap.error(f"the post-hoc EMA files in {args.run_dir / 'posthoc'} do not belong to one model ({err})")
    base = ckpt.latest_snapshot(args.run_dir)
    if base is None:
        ap.error(f"{args.run_dir} has no snapshot to take the buffers and config from (snapshots/ema-*.safetensors)")
    tensors, meta = ckpt.load_snapshot(base)
    foreign = sorted(n for n, w in weights.items() if n not in tensors or tensors[n].shape != w.shape)
    if foreign:
        ap.error(f"{base} does not match the post-hoc files' parameters ({foreign[:3]}): they are from another model")
    tensors.update(weights)
    path = ckpt.save_snapshot(args.run_dir, images, tensors, meta["config"], kind=f"ema_sigma{args.sigma_rel:.4g}",
                              extra={"latents": meta["latents"]} if "latents" in meta else None)
    print(f"archirf.posthoc_ema: sigma_rel {args.sigma_rel} at {images:,} images from {len(x)} stored EMAs "
          f"(coefficients {x.min().item():+.3g} .. {x.max().item():+.3g}) -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
