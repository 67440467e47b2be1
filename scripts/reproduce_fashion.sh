#!/usr/bin/env bash
# The Fashion-MNIST benchmark (issue 18): ResNet-20 on the full 60,000/10,000 images (5,000 training
# images held out for rank searches), as baseline (seeds 0 and 1), TRP2+Nu toward 3x MACs (seeds 0
# and 1), TRP2+Nu toward 2x measured latency, TRP1+Nu, TRP2+Nu and LoRITa N=2 (configs/fashion/*.yaml);
# the baseline split to the MAC reduction of each TRP row without fine-tuning, with BatchNorm
# re-estimated, with a short fine-tune, and calibrated (channel scheme, 1,024 images); top-1 on all 10,000 test images; measured speedups
# (ONNX Runtime, batch 1 and 64) of every split model.
#
#   bash scripts/reproduce_fashion.sh            # the benchmark; with the committed results: no training
#   TRP_SMOKE=1 bash scripts/reproduce_fashion.sh  # every step, 1 epoch of 5 batches, on a subset:
#                                                  # 6,000 training images (5,000 held out) and 1,000 test images
#
# Protocol (configs/fashion/): 15 epochs, batch 128, SGD lr 0.1 divided by 10 after epochs 7 and 11,
# autocast bf16 + channels_last (1.86x faster per step than fp32 on one core of this CPU, same
# accuracy: README, "Training on a CPU"). About 1.7 minutes per epoch on one core (one thread), so
# about 30 minutes per run, 45 with the baseline's fine-tunes; ResNet-56 (configs/fashion/resnet56-*)
# stays for whoever has a GPU: TRP_MODELS="resnet20 resnet56".
#
# Results persist in the repository: every run lives in benchmarks/results/fashion/<config>-s<seed>
# with its config, metrics.jsonl, train.log, trained model, split models, summaries and benchmark
# JSON; a finished run's checkpoint is removed, a run in progress keeps its latest one (commit it
# before stopping). Rerun the same command to continue: finished runs are skipped, a run with a
# checkpoint continues with `trp train --resume`, finished decompositions and benchmarks are skipped.
# Environment: TRP_JOBS (runs trained at once, default 2: one per core, one thread each; 1 leaves a
# core free), TRP_MODELS (default "resnet20"), TRP_RUNS (default benchmarks/results/fashion,
# runs/fashion-smoke when smoke), TRP_DATA_DIR (default: the Debian package's folder
# /usr/share/datasets/fashion-mnist), TRP_NO_BENCH=1 (skip the timings and the baseline's split toward a
# measured latency: they need an idle machine),
# TRP_BENCH_THREADS (ONNX Runtime threads of the timings, default 2), TRP_BENCH_REPEATS (interleaved
# dense/split timings per batch size, default 100: one batch-1 inference is under a millisecond), TRP_ONLY (space-separated run names, e.g. "resnet20-baseline-s0": train only these), TRP_VERIFY=1
# (at the end, re-evaluate every committed model file and check it reproduces the table's top-1).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${TRP_NO_SETUP:-}" ] || bash scripts/setup.sh
TRP="${TRP_BIN:-.venv/bin/trp}"
PY="${TRP_PYTHON:-.venv/bin/python}"
# One thread per process (CPU training is deterministic for a given thread count) and two processes.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
JOBS="${TRP_JOBS:-2}"
MODELS="${TRP_MODELS:-resnet20}"
FT_EPOCHS=3        # the baselines' short fine-tune after the split (lr 0.01)
BN_BATCHES=50      # training batches to re-estimate BatchNorm statistics on after the split
CALIBRATE=1024     # training images (not augmented) the baseline's calibrated splits are calibrated on
EXTRA=()
if [ -n "${TRP_SMOKE:-}" ]; then
  RUNS="${TRP_RUNS:-runs/fashion-smoke}"
  EXTRA=(--epochs 1 --steps-per-epoch 5)
  FT_EPOCHS=1
  BN_BATCHES=2
  CALIBRATE=64
else
  RUNS="${TRP_RUNS:-benchmarks/results/fashion}"
fi
mkdir -p "$RUNS" docs/img
# Fail early, with the install command, when the data are missing.
"$PY" -c "import sys; from trp.data import fashion_mnist_files; fashion_mnist_files(sys.argv[1] or None)" "${TRP_DATA_DIR:-}"
if [ -n "${TRP_SMOKE:-}" ]; then  # the smoke run's subset: the first images of each split, as plain IDX files
  "$PY" - "${TRP_DATA_DIR:-}" "$RUNS/data" <<'PY'
import struct, sys
from pathlib import Path
from trp.data import fashion_mnist
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
for train, stem, n in ((True, "train", 6000), (False, "t10k", 1000)):
    ds = fashion_mnist(sys.argv[1] or None, train=train)
    for kind, array in (("images-idx3", ds.data[:n]), ("labels-idx1", ds.targets[:n].byte())):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
        (out / f"{stem}-{kind}-ubyte").write_bytes(header + array.numpy().tobytes())
PY
  TRP_DATA_DIR="$RUNS/data"
fi
DATA=()
[ -z "${TRP_DATA_DIR:-}" ] || DATA=(--data-dir "$TRP_DATA_DIR")

HAVE_LATENCY=$("$PY" -c "import trp; print(int(hasattr(trp, 'TargetLatency')))")
HAVE_BENCH=$("$TRP" bench --help >/dev/null 2>&1 && echo 1 || echo 0)

# train CONFIG SEED: train (or resume) one run into $RUNS/<config>-s<seed>, then run its decompositions.
train() {
  local config=$1 seed=$2
  local run="$RUNS/$(basename "$config" .yaml)-s$seed"
  if [ -f "$run/.decomposed" ]; then return 0; fi
  if [ -n "${TRP_ONLY:-}" ] && [[ " $TRP_ONLY " != *" $(basename "$run") "* ]]; then return 0; fi
  if [ -f "$run/model.safetensors" ]; then  # trained; its decompositions were interrupted
    "$TRP" decompose "$run" "${DATA[@]}" --no-progress >>"$run/train.log" 2>&1
  elif [ -f "$run/checkpoint.pt" ]; then
    echo "resuming $run" >&2
    "$TRP" train --resume "$run" --no-progress >>"$run/train.log" 2>&1
  else
    echo "training $run" >&2
    mkdir -p "$run"
    "$TRP" train --config "$config" --seed "$seed" --out "$run" "${DATA[@]}" "${EXTRA[@]}" --no-progress \
      >"$run/train.log" 2>&1
  fi
  rm -f "$run/checkpoint.pt" "$run"/finetune-*/checkpoint.pt  # finished: the models and splits are what is kept
  touch "$run/.decomposed"
}

# The runs, headline rows first (two seeds), at most $JOBS at a time.
jobs_list=()
for m in $MODELS; do
  for seed in 0 1; do
    jobs_list+=("configs/fashion/$m-baseline.yaml $seed" "configs/fashion/$m-trp2-nu-macs3.yaml $seed")
  done
  # toward 2x measured latency: the target is measured on the machine that trains. The committed seed 0 was
  # trained on an AMD EPYC (1.87x there); on an Intel Xeon 2-core machine 2x is out of reach (about 1.82x with
  # every layer at its fastest split) and `trp train` stops at its start with that message (docs/results.md 6).
  [ "$HAVE_LATENCY" = 1 ] && jobs_list+=("configs/fashion/$m-trp2-nu-latency2.yaml 0")
  for c in trp1-nu trp2-nu lorita2; do jobs_list+=("configs/fashion/$m-$c.yaml 0"); done
  # What closes TRP's gap to the baseline: the 3x MAC target without the nuclear term (lambda = 0)
  jobs_list+=("configs/fashion/$m-trp2-macs3.yaml 0" "configs/fashion/$m-trp2-macs3.yaml 1")
  # ... and the reduction ramped in over the first 5 epochs instead of imposed from the first projection
  jobs_list+=("configs/fashion/$m-trp2-nu-macs3-ramp5.yaml 0" "configs/fashion/$m-trp2-nu-macs3-ramp5.yaml 1")
  # ... ramped over 10 epochs instead of 5
  jobs_list+=("configs/fashion/$m-trp2-nu-macs3-ramp10.yaml 0" "configs/fashion/$m-trp2-nu-macs3-ramp10.yaml 1")
  # ... and its last 8 epochs trained as each layer's rank-r factors (no projection-induced jumps)
  jobs_list+=("configs/fashion/$m-trp2-nu-macs3-ramp5-fact8.yaml 0" "configs/fashion/$m-trp2-nu-macs3-ramp5-fact8.yaml 1")
  # ... and the 10-epoch ramp with its last 5 epochs factored
  jobs_list+=("configs/fashion/$m-trp2-nu-macs3-ramp10-fact5.yaml 0" "configs/fashion/$m-trp2-nu-macs3-ramp10-fact5.yaml 1")
done
[ "$HAVE_LATENCY" = 1 ] || echo "skipping the 'toward 2x measured latency' rows: this trp has no trp.TargetLatency" >&2
for job in "${jobs_list[@]}"; do
  train $job &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n; done

# reduction SUMMARY: the all-MAC reduction a decomposition summary records (key mac_reduction; summaries
# written before issue 21 call it speedup: both are read).
reduction() {
  "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(round(d.get('mac_reduction', d.get('speedup')), 2))" "$1"
}

# have_split RUN SCHEME X KIND: whether RUN already has a split of SCHEME within 1% of X fewer MACs, of KIND
# "plain" (with its BatchNorm and fine-tuned variants) or "calN" (calibrated on N images), e.g. the
# baseline's own macs:3 split (3.01x) for a TRP row at 3.01x. Summaries named speedup:X (before issue 21)
# count too.
have_split() {
  "$PY" - "$@" <<'PY'
import json, sys
from pathlib import Path
run, scheme, x, kind = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
for f in run.glob(f"decomposed-{scheme}-*.json"):
    if (f.stem.endswith("-" + kind) if kind != "plain" else "-cal" not in f.stem):
        d = json.loads(f.read_text())
        got = d.get("mac_reduction", d.get("speedup"))
        if got and abs(got / x - 1) <= 0.01:
            sys.exit(0)
sys.exit(1)
PY
}

# The baseline split to the MAC reduction of each TRP row's split (every decomposition summary of the
# TRP1+Nu, TRP2+Nu, target and LoRITa runs), in that row's scheme: no fine-tuning, BatchNorm statistics
# re-estimated, and fine-tuned FT_EPOCHS epochs (one summary holds all three); and the baseline's
# calibrated split (channel scheme: calibration refuses the spatial one) to the same reduction on
# CALIBRATE training images (BatchNorm statistics re-estimated on them; no fine-tuning).
for m in $MODELS; do
  for seed in 0 1; do
    base="$RUNS/$m-baseline-s$seed"
    [ -f "$base/model.safetensors" ] || continue
    for summary in "$RUNS/$m"-{trp,lorita}*-s"$seed"/decomposed-*.json; do
      [ -f "$summary" ] || continue
      scheme=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['scheme'])" "$summary")
      x=$(reduction "$summary")
      if "$PY" -c "import sys; sys.exit(float(sys.argv[1]) > 1.0)" "$x"; then
        echo "$summary: the TRP split reduces MACs by only ${x}x; no baseline split to match" >&2
        continue
      fi
      if ! have_split "$base" "$scheme" "$x" plain; then
        "$TRP" decompose "$base" --scheme "$scheme" --criterion "macs:$x" --recalibrate-bn "$BN_BATCHES" \
          --finetune "$FT_EPOCHS" "${DATA[@]}" --no-progress >>"$base/decompose.log" 2>&1
      fi
      if ! have_split "$base" channel "$x" "cal$CALIBRATE"; then
        "$TRP" decompose "$base" --scheme channel --criterion "macs:$x" --calibrate "$CALIBRATE" \
          "${DATA[@]}" --no-progress >>"$base/decompose.log" 2>&1
      fi
    done
    # The target rows' comparison at 2x measured latency (the 3x MACs one is in the baseline's config), for the
    # seeds that have that row. It times the model: run it on a quiet machine (TRP_NO_BENCH skips it).
    if [ "$HAVE_LATENCY" != 1 ] || [ ! -d "$RUNS/$m-trp2-nu-latency2-s$seed" ] \
        || [ -f "$base/decomposed-spatial-latency2onnxruntime64.json" ]; then
      :  # no latency row for this seed, or done
    elif [ -n "${TRP_NO_BENCH:-}" ]; then
      echo "skipping $base's split toward 2x measured latency (TRP_NO_BENCH: it times the model)" >&2
    else
      "$TRP" decompose "$base" --scheme spatial --criterion latency:2:onnxruntime:64 --recalibrate-bn "$BN_BATCHES" \
        --finetune "$FT_EPOCHS" "${DATA[@]}" --no-progress >>"$base/decompose.log" 2>&1
    fi
  done
done

rm -f "$RUNS"/*/finetune-*/checkpoint.pt  # finished fine-tunes: their models are what is kept

# Accuracy at matched MAC reductions 1.5x..6x for every run (the plot's curves).
for run in "$RUNS"/*-s0; do
  [ -f "$run/model.safetensors" ] || { echo "$run: not trained yet, no sweep" >&2; continue; }
  compgen -G "$run/sweep-*-macs.json" >/dev/null || compgen -G "$run/sweep-*-speedup.json" >/dev/null \
    || "$TRP" sweep "$run" --kind macs "${DATA[@]}" >>"$run/sweep.log" 2>&1
done
for run in "$RUNS"/*-baseline-s0; do  # the baseline with the other scheme too (its config's scheme is spatial)
  [ -f "$run/sweep-channel-macs.json" ] || [ -f "$run/sweep-channel-speedup.json" ] \
    || "$TRP" sweep "$run" --scheme channel --kind macs "${DATA[@]}" >>"$run/sweep.log" 2>&1
done

# Measured speedup (ONNX Runtime, batch 1 and 64) of every split model, where this trp has `trp bench`.
if [ -n "${TRP_NO_BENCH:-}" ]; then
  echo "skipping measured speedups (TRP_NO_BENCH)" >&2
elif [ "$HAVE_BENCH" = 1 ]; then
  for f in "$RUNS"/*/decomposed-*.safetensors; do
    stem=$(basename "$f" .safetensors)
    [ -f "$(dirname "$f")/bench-$stem.json" ] \
      || "$TRP" bench "$f" --runtime onnxruntime --batch 1,64 --threads "${TRP_BENCH_THREADS:-2}" \
           --repeats "${TRP_BENCH_REPEATS:-100}" >>"$(dirname "$f")/bench.log" 2>&1
  done
else
  echo "skipping measured speedups: this trp has no \`trp bench\`" >&2
fi

table=docs/fashion-table plots=docs/img/fashion
[ -z "${TRP_SMOKE:-}" ] || { table="$RUNS/table"; plots="$RUNS/fashion"; }  # smoke results stay out of docs/
"$PY" benchmarks/fashion_report.py --runs "$RUNS" --out "$table" --plots "$plots"
echo "table: $table.md  plots: $plots-top1-vs-macs.png, $plots-top1-vs-speedup.png"
# TRP_VERIFY=1: re-evaluate every model file and compare with the top-1 the table shows for it.
[ -z "${TRP_VERIFY:-}" ] || "$PY" scripts/verify_fashion.py "$RUNS" "${DATA[@]}"
