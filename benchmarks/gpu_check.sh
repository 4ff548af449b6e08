#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the `device` tool): GPU tests, then the scorer and pipeline
# benchmarks, all results under $OUT (one JSON line per run: benchmarks/report.py). Carry .venv-free: the GPU
# image has torch; add open_clip/timm wheels and the converted fp16 DINOv2 weights (~44 MB) as the device notes describe.
set -uo pipefail
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -m pytest -q -m gpu tests/scorer/test_gpu.py > "$OUT/gpu-tests.txt" 2>&1
python -m cff_inspect bench scorer --backbone dinov2-vits14 clip:ViT-L-14-336 --weights random --device cuda \
  --shots 1 4 16 --precision bf16 fp16 fp32 --repeats 10 --out "$OUT/scorer-gpu.jsonl" > "$OUT/scorer-gpu.txt" 2>&1
python -m cff_inspect bench scorer --backbone clip:ViT-L-14-336 --weights random --device cuda --shots 4 \
  --precision bf16 --batch-sizes 16 32 64 --compile reduce-overhead --no-reference --out "$OUT/scorer-gpu-compiled.jsonl" \
  > "$OUT/scorer-gpu-compiled.txt" 2>&1
python -m cff_inspect bench pipeline --backbone dinov2-vits14 --device cuda --frames 2400 --offered-fps 240 \
  --max-batch 64 --sweep-batch 8 16 32 64 --sweep-wait 2 5 10 20 --out "$OUT/pipeline-gpu.jsonl" \
  > "$OUT/pipeline-gpu.txt" 2>&1
tail -n 5 "$OUT"/*.txt
