#!/usr/bin/env bash
# Scale-out check on 2 GPUs of one host (NCCL): DiT-XL/2 on synthetic 32x32x4 latents
# (configs/dit_xl2_latent.yaml: bf16, per-block compile, FSDP2, global batch 128 = 64 per GPU).
#
#   OUT=summary_dir bash scripts/multigpu_check.sh [PHASE ...]
#
# Phases, in order (`all`, the default, runs every one): one, two (= parity: 1-2), det, stop
# (= stop: the deterministic reference and 3), relaunch, reshard (= resume: 4-5), half1, grow1
# (= grow: 6), edm2 (7), summary (the comparisons). Each run takes a few minutes on H100s, so the phases can go into separate calls.
# What the phases share lives in SCRATCH (default runs/multigpu_scratch), deleted by `summary`; the
# summary reads every phase's metrics from OUT, so phases split over several calls keep one OUT.
#
#   1. parity       1 GPU (2 x 64 accumulated) vs 2 GPUs (64 each): the same 50 steps, losses compared
#   2. throughput   img/s per GPU (median over steps 11-50, compilation excluded), MFU, scaling efficiency
#   3. stop         SIGTERM to rank 1 only, mid-run: both ranks checkpoint once and exit 0
#   4. relaunch     the same command resumes; bitwise against an uninterrupted run (both deterministic)
#   5. reshard      the 2-GPU checkpoint resumed on 1 GPU: the same trajectory within bf16 tolerance
#   6. grow         a 1-GPU run stopped halfway, resumed on 2 GPUs: the same trajectory within bf16
#                   tolerance (one GPU trains the plain module, two FSDP2: the checkpoint moves across)
#   7. edm2         EDM2-S's forced weight normalisation on 2 GPUs' shards equals the one-GPU result
#                   (scripts/edm2_sharded_check.py)
#
# Runs 3-5 and their reference use torch.use_deterministic_algorithms (bitwise comparisons need
# deterministic kernels); 1-2 run the normal fast path. Writes $OUT/summary.md (default
# runs/multigpu_check) with the logs and metrics; checkpoints (~11 GB each) stay in SCRATCH.
set -uo pipefail
cd "$(dirname "$0")/.."

source scripts/multigpu_common.sh      # NCCL settings, PHASES, DET, run_det, rank_pid, stop_rank1
OUT=${OUT:-runs/multigpu_check}
SCRATCH=${SCRATCH:-runs/multigpu_scratch}
mkdir -p "$OUT" "$SCRATCH"
STEPS=50
GB=128
# a metrics line per step (the comparisons are per step); CHECK_OVERRIDES: more key=value (a CPU dry run)
COMMON=(--config configs/dit_xl2_latent.yaml global_batch=$GB micro_batch=64 total_images=$((STEPS * GB))
        log_every=$GB progress=false ${CHECK_OVERRIDES:-})

train() {      # train NPROC LOG ARGS...: the normal entry point
  local n=$1 log=$2; shift 2
  torchrun --standalone --nproc_per_node="$n" -m archirf.train "${COMMON[@]}" "$@" > "$log" 2>&1
}
train_det() {  # the same, with deterministic kernels
  local n=$1 log=$2; shift 2
  run_det "$n" "$log" "${COMMON[@]}" "$@"
}
note() { echo "$1" | tee -a "$SCRATCH/exits.txt"; }
phase() {     # phase NAME GROUP: whether this call runs it
  case "$PHASES" in *" all "*|*" $1 "*|*" $2 "*) return 0 ;; *) return 1 ;; esac
}

if phase one parity; then
echo "== 1-2: parity and throughput (one GPU)"
rm -rf "${SCRATCH:?}"/* && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$SCRATCH/gpus.txt" 2>&1
train 1 "$OUT/one.log" run_dir="$SCRATCH/one"; note "one GPU run: exit $?"
rm -rf "$SCRATCH/one/checkpoints"
fi

if phase two parity; then
echo "== 1-2: parity and throughput (two GPUs)"
train 2 "$OUT/two.log" run_dir="$SCRATCH/two"; note "two GPU run: exit $?"
rm -rf "$SCRATCH/two/checkpoints"
fi

if phase det stop; then
echo "== 3: deterministic reference"
train_det 2 "$OUT/det.log" run_dir="$SCRATCH/det"; note "deterministic reference: exit $?"
rm -rf "$SCRATCH/det/checkpoints"
fi

if phase stop stop; then
echo "== 3: SIGTERM to one rank"
note "stop (SIGTERM to rank 1): $(stop_rank1 "$OUT/stop.log" "$SCRATCH/stop" 15 "${COMMON[@]}")"
ls -d "$SCRATCH"/stop/checkpoints/images-* > "$SCRATCH/stop_checkpoints.txt" 2>&1
cp "$SCRATCH/stop/metrics.jsonl" "$SCRATCH/stop_before_relaunch.jsonl"
fi

if phase relaunch resume; then
echo "== 4: relaunch on 2 GPUs"
rm -rf "$SCRATCH/reshard" && cp -r "$SCRATCH/stop" "$SCRATCH/reshard"
train_det 2 "$OUT/relaunch.log" run_dir="$SCRATCH/stop"; note "relaunch on 2 GPUs: exit $?"
fi

if phase reshard resume; then
echo "== 5: the 2-GPU checkpoint resumed on 1 GPU"
train_det 1 "$OUT/reshard.log" run_dir="$SCRATCH/reshard"; note "resume on 1 GPU: exit $?"
fi

if phase half1 grow; then
echo "== 6: a 1-GPU run to half way"
train_det 1 "$OUT/half1.log" run_dir="$SCRATCH/grow" total_images=$((STEPS / 2 * GB)); note "1-GPU half run: exit $?"
rm -rf "$SCRATCH/grow/snapshots"
fi

if phase grow1 grow; then
echo "== 6: its checkpoint resumed on 2 GPUs"
train_det 2 "$OUT/grow.log" run_dir="$SCRATCH/grow"; note "resume on 2 GPUs: exit $?"
fi

if phase edm2 edm2; then
echo "== 7: EDM2 forced weight normalisation on shards"
torchrun --standalone --nproc_per_node=2 scripts/edm2_sharded_check.py --preset EDM2-S ${EDM2_OVERRIDES:-} \
  > "$OUT/edm2.log" 2>&1; note "EDM2 sharded weight norm: exit $?"
fi

phase summary summary || exit 0
for f in gpus.txt exits.txt stop_checkpoints.txt stop_before_relaunch.jsonl; do cp "$SCRATCH/$f" "$OUT/" 2>/dev/null; done
for run in one two det stop reshard grow; do cp "$SCRATCH/$run/metrics.jsonl" "$OUT/$run.jsonl" 2>/dev/null; done
python - "$OUT" "$SCRATCH" "$STEPS" "$GB" <<'EOF'
import json, statistics, sys
from pathlib import Path

import torch

from archirf import checkpoint as ckpt

out, scratch = Path(sys.argv[1]), Path(sys.argv[2])
STEPS, GB = int(sys.argv[3]), int(sys.argv[4])
STEPS_HALF = STEPS // 2

def rows(name):
    path = out / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)

def text(name):
    path = out / name
    return path.read_text().strip() if path.exists() else ""

lines = ["# ArchiRF multi-GPU check: DiT-XL/2, 32x32x4 latents, global batch 128 (64 per GPU)", "",
         "GPUs: " + text("gpus.txt").replace("\n", "; "), "",
         "exit codes: " + text("exits.txt").replace("\n", "; "), ""]
one, two, det, stop, reshard, grow = (rows(n) for n in ("one", "two", "det", "stop", "reshard", "grow"))

# 1. parity
if one and two:
    diffs = [rel(a["loss"], b["loss"]) for a, b in zip(one, two)]
    lines += [f"1. parity 1 vs 2 GPUs over {len(diffs)} steps: loss {one[0]['loss']:.4f} -> {one[-1]['loss']:.4f} (1 GPU), "
              f"{two[0]['loss']:.4f} -> {two[-1]['loss']:.4f} (2 GPUs); max relative difference {max(diffs):.2e}, "
              f"mean {statistics.mean(diffs):.2e} -> {'PASS' if max(diffs) < 2e-2 else 'CHECK'} (bf16; tolerance 2e-2)"]
# 2. throughput
def rate(rs, key):
    vals = [r[key] for r in rs[10:] if r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")
if one and two:
    r1, r2 = rate(one, "img_per_s_per_gpu"), rate(two, "img_per_s_per_gpu")
    lines += [f"2. throughput (median of steps 11-{len(two)}): 1 GPU {r1:.1f} img/s, MFU {rate(one, 'mfu'):.3f}; "
              f"2 GPUs {r2:.1f} img/s per GPU ({2 * r2:.1f} total), MFU {rate(two, 'mfu'):.3f} per GPU; "
              f"scaling efficiency {r2 / r1:.3f}; peak memory {rate(two, 'peak_mem_gib'):.1f} GiB per GPU"]
# 3. stop
marks = text("stop_checkpoints.txt").split()
before = rows("stop_before_relaunch")
stopped_at = int(marks[0].rsplit("-", 1)[1]) if len(marks) == 1 and "images-" in marks[0] else None
if (out / "stop_checkpoints.txt").exists():  # the stop phase ran (in this call or an earlier one with this OUT)
    lines += [f"3. SIGTERM to rank 1: checkpoints after the stop: {[Path(m).name for m in marks]}; "
              f"last logged step {len(before)}; " + ("PASS" if stopped_at and stopped_at // 128 < 50 else "CHECK")]
# 4. relaunch: bitwise after the stop point, and the final EMA snapshot
if det and stop:
    key = lambda rs: [(r["images_seen"], r["loss"], r["grad_norm"]) for r in rs]  # noqa: E731
    same = key(stop) == key(det)
    snaps = [ckpt.latest_snapshot(scratch / run) for run in ("det", "stop")]
    if all(snaps):   # the snapshots live in SCRATCH, which an earlier call's summary may have deleted
        a, b = (ckpt.load_snapshot(s)[0] for s in snaps)
        same_ema = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    else:
        same_ema = None
    worst = max((rel(x["loss"], y["loss"]) for x, y in zip(stop, det)), default=float("nan"))
    verdict = "PASS" if same and same_ema else "CHECK" if same_ema is not None or not same else "losses PASS"
    lines += [f"4. relaunch on 2 GPUs from images {stopped_at}: per-step loss/grad norm bitwise equal to the "
              f"uninterrupted run: {same} (max relative loss difference {worst:.2e}); final EMA bitwise equal: "
              f"{'not compared (snapshots gone from SCRATCH)' if same_ema is None else same_ema} -> {verdict}"]
# 5. reshard 2 -> 1
if det and reshard:
    diffs = [rel(x["loss"], y["loss"]) for x, y in zip(reshard, det) if x["images_seen"] > (stopped_at or 0)]
    lines += [f"5. 2-GPU checkpoint resumed on 1 GPU: {len(diffs)} steps after the resume, max relative loss difference "
              f"to the 2-GPU run {max(diffs, default=float('nan')):.2e} -> "
              f"{'PASS' if diffs and max(diffs) < 2e-2 else 'CHECK'}"]
# 6. grow 1 -> 2: against the deterministic 2-GPU run, else the normal one (phases run in other calls)
ref6, ref6_name = (det, "the deterministic 2-GPU run") if det else (two, "the 2-GPU run of phase two")
if ref6 and grow:
    half = STEPS_HALF * GB
    diffs = [rel(x["loss"], y["loss"]) for x, y in zip(grow, ref6) if x["images_seen"] > half]
    lines += [f"6. 1-GPU checkpoint (images {half}) resumed on 2 GPUs: {len(diffs)} steps after the resume, max "
              f"relative loss difference to {ref6_name} {max(diffs, default=float('nan')):.2e} -> "
              f"{'PASS' if len(diffs) == STEPS - STEPS_HALF and max(diffs) < 2e-2 else 'CHECK'}"]
# 7. EDM2 forced weight normalisation
edm2 = [line for line in text("edm2.log").splitlines() if line.startswith("edm2 forced weight norm")]
if edm2:
    lines += ["7. " + edm2[-1]]
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
EOF
rm -rf "$SCRATCH"
