#!/usr/bin/env bash
# The eval table of BENCHMARKS.md: dinov2-vits14 on both shared datasets, 1/2/4 shots x 3 seeds,
# knn / aprilgan / cff, in both protocols. Tokens are cached, so every image is extracted once.
#   CFF_INSPECT_DATA_ROOT=/path/to/datasets bash experiments/first_quality_table/quality_table.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-reports}
DATA=${CFF_INSPECT_DATA_ROOT:?set CFF_INSPECT_DATA_ROOT to the folder holding kolektor_sdd/ and magnetic_tile/}
CACHE=${CFF_INSPECT_CACHE_DIR:-.cache/tokens}
BIN=${CFF_INSPECT_BIN:-.venv/bin/cff-inspect}
mkdir -p "$OUT"
for ds in magnetic_tile kolektor_sdd; do
  "$BIN" eval --data "$DATA/$ds" --shots 1 2 4 --seeds 0 1 2 --method cff aprilgan knn --per-stage \
    --bank-dtype bfloat16 --cache-dir "$CACHE" --out "$OUT/deploy-$ds.json" > "$OUT/deploy-$ds.md" 2> "$OUT/deploy-$ds.log"
done
"$BIN" train-base --data "$DATA/magnetic_tile" --out "$OUT/base-magnetic_tile.safetensors" --cache-dir "$CACHE" \
  > "$OUT/base-magnetic_tile.json" 2> "$OUT/base-magnetic_tile.log"
"$BIN" train-base --data "$DATA/kolektor_sdd" --out "$OUT/base-kolektor_sdd.safetensors" --cache-dir "$CACHE" \
  > "$OUT/base-kolektor_sdd.json" 2> "$OUT/base-kolektor_sdd.log"
# cross-dataset: the base head is trained on the *other* dataset
"$BIN" eval --data "$DATA/kolektor_sdd" --base-head "$OUT/base-magnetic_tile.safetensors" --shots 1 2 4 \
  --seeds 0 1 2 --method cff aprilgan --per-stage --bank-dtype bfloat16 --cache-dir "$CACHE" --out "$OUT/cross-kolektor_sdd.json" \
  > "$OUT/cross-kolektor_sdd.md" 2> "$OUT/cross-kolektor_sdd.log"
"$BIN" eval --data "$DATA/magnetic_tile" --base-head "$OUT/base-kolektor_sdd.safetensors" --shots 1 2 4 \
  --seeds 0 1 2 --method cff aprilgan --per-stage --bank-dtype bfloat16 --cache-dir "$CACHE" --out "$OUT/cross-magnetic_tile.json" \
  > "$OUT/cross-magnetic_tile.md" 2> "$OUT/cross-magnetic_tile.log"
echo "done: $OUT"
