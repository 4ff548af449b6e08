#!/usr/bin/env bash
# Regenerate the raw results behind the headline numbers into benchmarks/results/ (not in git), then rebuild
# benchmarks/summary.json and the headline blocks of README.md and BENCHMARKS.md from them.
#   CFF_INSPECT_DATA_ROOT=/path/to/datasets bash benchmarks/regenerate.sh
# About 2 hours on a 2-core CPU: the quality evals dominate. The fit-time comparison checks out the last commit
# with the old cff default (5f4c226) into a temporary git worktree and times it in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CFF_INSPECT_DATA_ROOT:?set CFF_INSPECT_DATA_ROOT to the folder holding kolektor_sdd/ and magnetic_tile/}
export CFF_INSPECT_RESULTS_DIR=${CFF_INSPECT_RESULTS_DIR:-benchmarks/results}
RES=$CFF_INSPECT_RESULTS_DIR
CACHE=${CFF_INSPECT_CACHE_DIR:-.cache/tokens}
BIN=${CFF_INSPECT_BIN:-.venv/bin/cff-inspect}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$RES"
# detection quality of the default head, deployment protocol
for ds in kolektor_sdd magnetic_tile; do
  "$BIN" eval --data "$DATA/$ds" --method knn --shots 1 2 4 --seeds 0 1 2 --cache-dir "$CACHE" --no-plots \
    --out "$RES/quality-knn-$ds.json"
done
# the verdict: the fit's threshold and one from 16 known-good frames, per dataset, K and seed
"$PY" -m experiments.verdict_threshold.good_frames 1,2,4 > "$RES/good-frames-threshold.jsonl"
# speed on this CPU
"$BIN" bench scorer --backbone dinov2-vits14 --device cpu --batch-sizes 1 8 --precision fp32 bf16 --repeats 3 \
  --shots 1 4 16 --out "$RES/scorer-cpu.jsonl"
"$BIN" bench pipeline --backbone dinov2-vits14 --method cff --precision bf16 --frames 40 --offered-fps 4 \
  --sweep-batch 1 4 8 --sweep-wait 20 200 --out "$RES/pipeline-cpu-saturated.jsonl"
"$BIN" bench pipeline --backbone dinov2-vits14 --method cff --precision bf16 --frames 40 --offered-fps 2.5 \
  --sweep-batch 1 4 8 --sweep-wait 20 --out "$RES/pipeline-cpu-below-capacity.jsonl"
"$PY" -m experiments.fit_and_frame_cost.score_cost 4 8 bfloat16 >> "$RES/score-cost-k4-bf16.jsonl"
# K = 4 fit: today, the old cff default, today again (headline reads the last three lines)
OLD=$(mktemp -d)/old
git worktree add --detach "$OLD" 5f4c226 > /dev/null
trap 'git worktree remove --force "$OLD"' EXIT
"$PY" -m experiments.fit_and_frame_cost.fit_time "$PWD" knn 4 1 >> "$RES/fit-time-k4-views.jsonl"
"$PY" -m experiments.fit_and_frame_cost.fit_time "$OLD" cff 4 1 >> "$RES/fit-time-k4-views.jsonl"
"$PY" -m experiments.fit_and_frame_cost.fit_time "$PWD" knn 4 1 >> "$RES/fit-time-k4-views.jsonl"
"$PY" -m benchmarks.headline --summarise "$RES"
echo "done: $RES; review: git diff benchmarks/summary.json README.md BENCHMARKS.md"
