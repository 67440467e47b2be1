#!/usr/bin/env bash
# The CPU-scale reproduction of every row of the TRP tables (docs/results.md, part 1):
# ResNet-20 on MNIST-5k, one `trp train --config` per row (each also runs its decompositions),
# then criterion sweeps, the comparison table and the plot. About 45 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One thread per process, as the numbers in docs/results.md were measured (CPU training is
# deterministic for a given thread count; another count moves results by a few tenths).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
TRP=.venv/bin/trp
for f in configs/mnist5k/*.yaml; do
  run="runs/mnist5k/$(basename "$f" .yaml)"
  [ -f "$run/model.safetensors" ] || $TRP train --config "$f" --out "$run" --no-progress
done
# Accuracy at matched whole-model MAC reductions (TargetMACs 1.5x..6x), each run with its own scheme,
# and the baseline also with the channel and decouple schemes.
$TRP sweep runs/mnist5k/resnet20-* --kind macs
$TRP sweep runs/mnist5k/resnet20-baseline --scheme channel --kind macs
$TRP sweep runs/mnist5k/resnet20-baseline --scheme decouple --kind macs
mkdir -p docs/img
$TRP table runs/mnist5k/resnet20-* --out docs/mnist5k-table --plot docs/img/mnist5k-tradeoff.png \
  --title "ResNet-20 on MNIST-5k: top-1 vs conv-MAC reduction"
