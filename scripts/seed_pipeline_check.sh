#!/usr/bin/env bash
# The seed's ImageNet-64 latent pipeline at small scale on one GPU, on a stand-in image set (scikit-image's
# photographs, scripts/photo_folder.py): configs/ae_seed_64px.yaml -> archirf.encode --flips ->
# configs/mmdit_seed_latent.yaml with its decoded sample grids -> archirf.sample. The recipes as they are,
# shortened (total_images, disc_start, sample_every) and without FID while training.
#
#   bash scripts/seed_pipeline_check.sh OUT_DIR [extra key=value for the autoencoder, e.g. loss.lpips_weights=F]
#
# Sizes (environment): COUNT images (20000), AE_IMAGES (48000), LATENT_IMAGES (2560000), SAMPLE_EVERY (512000);
# EXTRA: key=value overrides for both trainings (e.g. compile=off precision=fp32 on a CPU).
set -euo pipefail
out=${1:?usage: seed_pipeline_check.sh OUT_DIR [autoencoder overrides]}
shift
COUNT=${COUNT:-20000}; AE_IMAGES=${AE_IMAGES:-48000}; LATENT_IMAGES=${LATENT_IMAGES:-2560000}
SAMPLE_EVERY=${SAMPLE_EVERY:-512000}
mkdir -p "$out"
python scripts/photo_folder.py --out "$out/photos" --count "$COUNT" --size 64
classes=$(find "$out/photos" -mindepth 1 -maxdepth 1 -type d | wc -l)
start=$(date +%s)
torchrun --nproc_per_node=1 -m archirf.train --config configs/ae_seed_64px.yaml run_dir="$out/ae" \
    data.root="$out/photos" data.num_classes="$classes" total_images="$AE_IMAGES" loss.disc_start=$((AE_IMAGES / 3)) log_every=$((AE_IMAGES / 6)) \
    sample_every=0 checkpoint_every=0 eval.every=0 eval.ref=null progress=false ${EXTRA:-} "$@" | tee "$out/ae.log"
ae=$(date +%s)
torchrun --nproc_per_node=1 -m archirf.encode "$out/ae" --out "$out/latents.safetensors" --flips --batch 256 \
    --no-progress | tee "$out/encode.log"
enc=$(date +%s)
torchrun --nproc_per_node=1 -m archirf.train --config configs/mmdit_seed_latent.yaml run_dir="$out/latent" \
    model.autoencoder="$out/ae" data.root="$out/latents.safetensors" data.num_classes="$classes" \
    total_images="$LATENT_IMAGES" log_every="$SAMPLE_EVERY" sample_every="$SAMPLE_EVERY" checkpoint_every=0 \
    eval.every=0 progress=false ${EXTRA:-} | tee "$out/latent.log"
lat=$(date +%s)
python -m archirf.sample "$out/latent" --classes 0,1,2,3,4,5,6,7 --per-class 8 --out "$out/samples.png"
echo "seconds: autoencoder $((ae - start)), encode $((enc - ae)), latent model $((lat - enc))"
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
ae = [json.loads(l) for l in (out / "ae" / "metrics.jsonl").read_text().splitlines()][-1]
print(f"autoencoder: {ae['images_seen']:,} images, last interval {ae['img_per_s']:,.0f} img/s, PSNR {ae.get('psnr', float('nan')):.2f} dB")
rows = [json.loads(l) for l in (out / "latent" / "metrics.jsonl").read_text().splitlines()]
for r in rows:
    print(f"latent: {r['images_seen']:>10,} images  {r['img_per_s']:>9,.0f} img/s  mfu {r.get('mfu', 0):.3f}  "
          f"paused {r['paused_s']:.2f} s  loss {r['loss']:.4f}")
steady = rows[1:-1] or rows
rate = sum(r["img_per_s"] for r in steady) / len(steady)
grid = sorted(r["paused_s"] for r in steady)[len(steady) // 2]
every = 5_120_000
print(f"decoded grid: {grid:.2f} s (median interval); at the recipe's sample_every={every:,} and {rate:,.0f} img/s "
      f"a grid costs {grid / (every / rate) * 100:.3f} % of training time")
PY
