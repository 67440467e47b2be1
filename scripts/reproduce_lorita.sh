#!/usr/bin/env bash
# The LoRITa benchmark (docs/results.md, part 2): MLP, ViT and ResNet-20 on MNIST-5k, each trained
# plainly, with TRP+Nu and with LoRITa (N = 2, 3), then decomposed at matched MAC reductions.
# About 40 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One thread per process, as the numbers in docs/results.md were measured (CPU training is
# deterministic for a given thread count; another count moves results by a few tenths).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for f in configs/lorita/*.yaml; do
  run="runs/lorita/$(basename "$f" .yaml)"
  [ -f "$run/model.safetensors" ] || .venv/bin/trp train --config "$f" --out "$run" --no-progress
done
.venv/bin/python benchmarks/lorita_compare.py runs/lorita/* --out benchmarks/results/lorita_compare
