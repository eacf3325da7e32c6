#!/usr/bin/env bash
# Scale-out check of the autoencoder, encode, evaluation and DALI paths on 2 GPUs of one host (NCCL, bf16,
# compile), the sibling of scripts/multigpu_check.sh (which checks the generative models).
#
#   OUT=summary_dir bash scripts/multigpu_check_pipeline.sh [PHASE ...]
#
# Phases (`all`, the default, runs every one; each takes minutes on H100s, so they can go into separate calls
# sharing one OUT and SCRATCH):
#   data        stand-in images: 64 px PNGs and 500x375 JPEGs (scripts/photo_folder.py)
#   ae          the seed's 64 px autoencoder (configs/ae_seed_64px.yaml; LPIPS + PatchGAN on after half the run):
#               1 GPU (2 x 32 accumulated) vs 2 GPUs (32 each): per-step losses within bf16 tolerance; per-GPU
#               img/s on 2 GPUs against 1 (scaling efficiency, target >= 0.9)
#   kl          the same for KL-f8c4 at 256 px (configs/ae_kl_f8c4_256px.yaml, 2 x 8 vs 8 each)
#   aestop      SIGTERM to rank 1 of a deterministic 2-GPU autoencoder run: both ranks checkpoint and exit 0;
#               the relaunch continues bitwise against an uninterrupted deterministic run; the 2-GPU checkpoint
#               resumed on 1 GPU stays within bf16 tolerance
#   encode      archirf.encode of the 1-GPU autoencoder on 1 and on 2 GPUs: the same latents (bf16 tolerance), img/s
#   eval        FID of a short digits DiT run on 1 and on 2 GPUs: the same value, and the time (INCEPTION= the FID
#               network's file when the fid-helper package is not installed)
#   dali        KL-f8c4 at 256 px from the JPEGs with data.loader=dali: 1 vs 2 GPUs the same losses (the same
#               global stream of micro batches), a 2-GPU run stopped mid-epoch resumed on 1 GPU, data wait < 2 %
#   summary     the comparisons, written to $OUT/summary.md
# CHECK_OVERRIDES: more key=value for every training (e.g. a CPU dry run: device=cpu compile=off precision=fp32 ...);
# ENCODE_OVERRIDES the same for archirf.encode (device=, precision=); STEPS (40) and COUNT (4096) the sizes.
set -uo pipefail
cd "$(dirname "$0")/.."

source scripts/multigpu_common.sh      # NCCL settings, PHASES, DET, run_det, rank_pid, stop_rank1
OUT=${OUT:-runs/multigpu_check_pipeline}
SCRATCH=${SCRATCH:-runs/multigpu_pipeline_scratch}
STEPS=${STEPS:-40}
mkdir -p "$OUT" "$SCRATCH"
EXTRA=(progress=false checkpoint_every=0 sample_every=0 eval.every=0 eval.ref=null ${CHECK_OVERRIDES:-})

run() {        # run NPROC LOG MODULE ARGS...
  local n=$1 log=$2 module=$3; shift 3
  torchrun --standalone --nproc_per_node="$n" -m "$module" "$@" > "$log" 2>&1
}
note() { echo "$1" | tee -a "$OUT/exits.txt"; }
phase() { case "$PHASES" in *" all "*|*" $1 "*) return 0 ;; *) return 1 ;; esac; }
timed() {      # timed NAME COMMAND...: wall seconds into $OUT/times.txt
  local name=$1 t0; shift; t0=$(date +%s.%N); "$@"; local rc=$?
  echo "$name $(echo "$(date +%s.%N) - $t0" | bc)" >> "$OUT/times.txt"; return $rc
}

if phase data; then
  echo "== data"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpus.txt" 2>&1
  python scripts/photo_folder.py --out "$SCRATCH/png64" --count "${COUNT:-4096}" --size 64 > /dev/null
  python scripts/photo_folder.py --out "$SCRATCH/jpg" --count "${COUNT:-4096}" --size 500x375 --format jpg > /dev/null
fi

classes() { find "$1" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l; }
SEED=(--config configs/ae_seed_64px.yaml data.root="$SCRATCH/png64" data.num_classes=$(classes "$SCRATCH/png64")
      global_batch=64 micro_batch=32
      total_images=$((STEPS * 64)) log_every=64 loss.disc_start=$((STEPS / 2 * 64)) "${EXTRA[@]}")
KL=(--config configs/ae_kl_f8c4_256px.yaml data.root="$SCRATCH/jpg" data.num_classes=$(classes "$SCRATCH/jpg")
    global_batch=16 micro_batch=8
    total_images=$((STEPS * 16)) log_every=16 loss.disc_start=$((STEPS / 2 * 16)) eval.batch=64 "${EXTRA[@]}")

if phase ae; then
  echo "== ae: seed 64 px, 1 vs 2 GPUs"
  rm -rf "$SCRATCH/ae1" "$SCRATCH/ae2"
  run 1 "$OUT/ae1.log" archirf.train "${SEED[@]}" run_dir="$SCRATCH/ae1"; note "ae 1 GPU: exit $?"
  run 2 "$OUT/ae2.log" archirf.train "${SEED[@]}" run_dir="$SCRATCH/ae2"; note "ae 2 GPUs: exit $?"
  cp "$SCRATCH/ae1/metrics.jsonl" "$OUT/ae1.jsonl"; cp "$SCRATCH/ae2/metrics.jsonl" "$OUT/ae2.jsonl"
fi

if phase kl; then
  echo "== kl: KL-f8c4 256 px, 1 vs 2 GPUs"
  rm -rf "$SCRATCH/kl1" "$SCRATCH/kl2"
  run 1 "$OUT/kl1.log" archirf.train "${KL[@]}" data.loader=torch run_dir="$SCRATCH/kl1"; note "kl 1 GPU: exit $?"
  run 2 "$OUT/kl2.log" archirf.train "${KL[@]}" data.loader=torch run_dir="$SCRATCH/kl2"; note "kl 2 GPUs: exit $?"
  cp "$SCRATCH/kl1/metrics.jsonl" "$OUT/kl1.jsonl"; cp "$SCRATCH/kl2/metrics.jsonl" "$OUT/kl2.jsonl"
fi

if phase aestop; then
  echo "== aestop: deterministic reference, SIGTERM to rank 1, relaunch, 2 -> 1 resume"
  rm -rf "$SCRATCH/aedet"
  run_det 2 "$OUT/aedet.log" "${SEED[@]}" run_dir="$SCRATCH/aedet"; note "ae deterministic reference: exit $?"
  note "ae stop (SIGTERM to rank 1): $(stop_rank1 "$OUT/aestop.log" "$SCRATCH/aestop" $((STEPS / 3)) "${SEED[@]}")"
  ls -d "$SCRATCH"/aestop/checkpoints/images-* > "$OUT/aestop_checkpoints.txt" 2>&1
  rm -rf "$SCRATCH/aereshard" && cp -r "$SCRATCH/aestop" "$SCRATCH/aereshard"
  run_det 2 "$OUT/aerelaunch.log" "${SEED[@]}" run_dir="$SCRATCH/aestop"; note "ae relaunch on 2 GPUs: exit $?"
  run_det 1 "$OUT/aereshard.log" "${SEED[@]}" run_dir="$SCRATCH/aereshard"; note "ae resume on 1 GPU: exit $?"
  for r in aedet aestop aereshard; do cp "$SCRATCH/$r/metrics.jsonl" "$OUT/$r.jsonl"; done
fi

if phase encode; then
  echo "== encode: 1 vs 2 GPUs"
  for n in 1 2; do
    rm -rf "$SCRATCH/enc$n.safetensors"*
    timed "encode$n" run "$n" "$OUT/encode$n.log" archirf.encode "$SCRATCH/ae1" --out "$SCRATCH/enc$n.safetensors" \
      --batch 256 --no-progress ${ENCODE_OVERRIDES:-}; note "encode on $n GPU(s): exit $?"
  done
fi

if phase eval; then
  echo "== eval: FID of a digits DiT on 1 vs 2 GPUs"
  rm -rf "$SCRATCH/digits"
  run 1 "$OUT/digits.log" archirf.train total_images="${DIGITS_IMAGES:-64000}" run_dir="$SCRATCH/digits" "${EXTRA[@]}"
  note "digits run: exit $?"
  for n in 1 2; do
    timed "fid$n" run "$n" "$OUT/fid$n.log" archirf.eval fid "$SCRATCH/digits" --samples "${FID_SAMPLES:-10000}" \
      --no-progress ${INCEPTION:+--inception "$INCEPTION"}; note "FID on $n GPU(s): exit $?"
  done
fi

if phase dali; then
  echo "== dali: KL-f8c4 256 px from JPEGs with DALI, 1 vs 2 GPUs, 2 -> 1 mid-epoch"
  rm -rf "$SCRATCH/dali1" "$SCRATCH/dali2" "$SCRATCH/dalimove"
  run 1 "$OUT/dali1.log" archirf.train "${KL[@]}" data.loader=dali run_dir="$SCRATCH/dali1"; note "dali 1 GPU: exit $?"
  run 2 "$OUT/dali2.log" archirf.train "${KL[@]}" data.loader=dali run_dir="$SCRATCH/dali2"; note "dali 2 GPUs: exit $?"
  run 2 "$OUT/dalihalf.log" archirf.train "${KL[@]}" data.loader=dali run_dir="$SCRATCH/dalimove" \
    total_images=$((STEPS / 2 * 16)); note "dali 2 GPUs, half: exit $?"
  run 1 "$OUT/dalimove.log" archirf.train "${KL[@]}" data.loader=dali run_dir="$SCRATCH/dalimove"
  note "dali resumed on 1 GPU: exit $?"
  for r in dali1 dali2 dalimove; do cp "$SCRATCH/$r/metrics.jsonl" "$OUT/$r.jsonl"; done
fi

phase summary || exit 0
python - "$OUT" "$SCRATCH" "$STEPS" <<'EOF'
import json, re, statistics, sys
from pathlib import Path

out, scratch, STEPS = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
TOL = 2e-2          # bf16

def rows(name):
    p = out / f"{name}.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

def text(name):
    p = out / name
    return p.read_text().strip() if p.exists() else ""

def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)

def losses(a, b, after=0, keys=("loss", "g_loss", "d_loss")):
    """max relative difference over the steps both logged (after `after` images), every loss key both have"""
    pairs = [(x, y) for x, y in zip(a, b) if x["images_seen"] == y["images_seen"] and x["images_seen"] > after]
    diffs = [rel(x[k], y[k]) for x, y in pairs for k in keys if k in x and k in y and x[k] and y[k]]
    return len(pairs), max(diffs, default=float("nan"))

def rate(rs):
    vals = [r["img_per_s_per_gpu"] for r in rs[3:] if r.get("img_per_s_per_gpu")]
    return statistics.median(vals) if vals else float("nan")

def verdict(ok):
    return "PASS" if ok else "CHECK"

lines = ["# ArchiRF multi-GPU check of the pipeline: autoencoders, encode, evaluation, DALI", "",
         "GPUs: " + text("gpus.txt").replace("\n", "; "), "", "exit codes: " + text("exits.txt").replace("\n", "; "), ""]
for name, label in (("ae", "seed 64 px autoencoder"), ("kl", "KL-f8c4 256 px")):
    a, b = rows(f"{name}1"), rows(f"{name}2")
    if a and b:
        n, worst = losses(a, b)
        r1, r2 = rate(a), rate(b)
        lines += [f"- {label}, 1 vs 2 GPUs (fixed micro batch): {n} steps, max relative loss difference {worst:.2e} "
                  f"-> {verdict(n == len(a) and worst < TOL)}; img/s per GPU {r1:.0f} (1) vs {r2:.0f} (2): scaling "
                  f"efficiency {r2 / r1:.3f} -> {verdict(r2 / r1 >= 0.9)} (target 0.9)"]
det, stop, reshard = rows("aedet"), rows("aestop"), rows("aereshard")
marks = text("aestop_checkpoints.txt").split()
if det and stop:
    at = int(marks[0].rsplit("-", 1)[1]) if len(marks) == 1 and "images-" in marks[0] else None
    key = lambda rs: [(r["images_seen"], r.get("loss"), r.get("g_loss"), r.get("d_loss")) for r in rs]
    n, worst = losses(reshard, det, after=at or 0)
    lines += [f"- SIGTERM to rank 1: checkpoints {[Path(m).name for m in marks]} -> {verdict(at is not None)}; "
              f"relaunch bitwise equal to the uninterrupted run: {key(stop) == key(det)} -> {verdict(key(stop) == key(det))}; "
              f"2 -> 1 GPU resume: {n} steps, max relative loss difference {worst:.2e} -> {verdict(n and worst < TOL)}"]
enc = [scratch / f"enc{n}.safetensors" for n in (1, 2)]
if all(p.exists() for p in enc):
    from safetensors.torch import load_file
    a, b = (load_file(p) for p in enc)
    diffs = {k: ((a[k].float() - b[k].float()).norm() / a[k].float().norm().clamp_min(1e-12)).item()
             for k in a if a[k].is_floating_point()}
    rates = {n: re.findall(r"([\d,.]+) img/s", text(f"encode{n}.log")) for n in (1, 2)}
    lines += [f"- encode on 1 vs 2 GPUs: same keys {a.keys() == b.keys()}, largest relative difference "
              f"{max(diffs.values(), default=float('nan')):.2e} -> {verdict(a.keys() == b.keys() and max(diffs.values()) < TOL)}"
              f"; img/s {rates[1][-1:] } (1) vs {rates[2][-1:]} (2)"]
evals = scratch / "digits" / "eval.jsonl"      # archirf.eval's records, full precision, one per FID run
recs = [json.loads(line) for line in evals.read_text().splitlines()] if evals.exists() else []
fid_by_world = {r.get("world_size"): r for r in recs if "fid" in r}     # the last record of each world size
times = dict(line.split() for line in text("times.txt").splitlines() if line.strip())
if 1 in fid_by_world and 2 in fid_by_world:
    (f1, s1), (f2, s2) = ((fid_by_world[n]["fid"], fid_by_world[n]["samples_per_s"]) for n in (1, 2))
    t1, t2 = float(times.get("fid1", "nan")), float(times.get("fid2", "nan"))
    lines += [f"- FID on 1 vs 2 GPUs: {f1:.6g} vs {f2:.6g} -> {verdict(rel(f2, f1) < 1e-3)}; sampling {s1:.1f} vs "
              f"{s2:.1f} samples/s: per-GPU scaling {s2 / (2 * s1):.3f} -> {verdict(s2 / (2 * s1) >= 0.9)} (target "
              f"0.9); wall with start-up {t1:.0f} s vs {t2:.0f} s"]
elif "fid1" in times or "fid2" in times:
    lines += [f"- FID on 1 vs 2 GPUs: not found (records of world sizes {sorted(fid_by_world)} in {evals}) -> CHECK"]
d1, d2, moved = rows("dali1"), rows("dali2"), rows("dalimove")
if d1 and d2:
    n, worst = losses(d1, d2)
    wait = max((r.get("data_wait_frac", 0) for r in (d1 + d2)[2:]), default=float("nan"))
    m, worst_move = losses(moved, d2, after=STEPS // 2 * 16)
    lines += [f"- DALI 1 vs 2 GPUs: {n} steps, max relative loss difference {worst:.2e} -> {verdict(worst < TOL)}; "
              f"2 -> 1 GPU mid-epoch resume: {m} steps after it, max relative loss difference to the 2-GPU run "
              f"{worst_move:.2e} -> {verdict(m and worst_move < TOL)}; largest data wait {wait:.2%} -> {verdict(wait < 0.02)}"]
text_out = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text_out)
print(text_out)
EOF
