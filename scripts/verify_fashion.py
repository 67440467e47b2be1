"""Re-evaluate every committed model of the Fashion-MNIST benchmark and compare with its recorded top-1.

Each model file under the results folder is loaded and evaluated on the 10,000 test images exactly
as ``trp evaluate FILE`` does (same loader, same function); the expected figure is the one the
table shows for that file:

- ``<run>/model.safetensors``: the last ``test_top1`` of ``metrics.jsonl`` (the trained model);
- ``<run>/decomposed-*.safetensors``: the summary's ``bn_recalibrated.top1`` when BatchNorm was
  re-estimated (the saved model holds those statistics), else its ``decomposed.top1``;
- ``<run>/finetune-*/model.safetensors``: the fine-tune's last ``test_top1``.

Usage: ``python scripts/verify_fashion.py [RUNS] [--tolerance 0.01]``; exit status 1 when a model
does not reproduce its figure (each mismatch printed), 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from trp.app import engine, workflow
from trp.limits import parse_json, read_json, read_json_lines


def _last_top1(metrics: Path) -> Optional[float]:
    rows = []
    for _, line in read_json_lines(metrics):
        if line.strip():
            row = parse_json(line, f"{metrics}")
            if isinstance(row, dict) and "test_top1" in row:
                rows.append(row)
    return float(rows[-1]["test_top1"]) if rows else None


def expected_top1(model_file: Path) -> Optional[float]:
    """The top-1 the results record for ``model_file`` (None: nothing recorded, e.g. a run in progress)."""
    if model_file.name == "model.safetensors":
        metrics = model_file.parent / "metrics.jsonl"
        return _last_top1(metrics) if metrics.is_file() else None
    summary = model_file.with_suffix(".json")
    if not summary.is_file():
        return None
    doc = read_json(summary)
    bn = doc.get("bn_recalibrated")
    block = bn if isinstance(bn, dict) else doc.get("decomposed")
    return float(block["top1"]) if isinstance(block, dict) and "top1" in block else None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="?", type=Path, default=Path("benchmarks/results/fashion"))
    parser.add_argument("--tolerance", type=float, default=0.01, help="points of top-1 allowed to differ")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    files = sorted(args.runs.glob("*/model.safetensors")) + sorted(args.runs.glob("*/decomposed-*.safetensors")) \
        + sorted(args.runs.glob("*/finetune-*/model.safetensors"))
    dev = engine.resolve_device("cpu")
    bad = checked = 0
    for f in files:
        want = expected_top1(f)
        if want is None:
            print(f"{f}: no recorded top-1 (skipped)")
            continue
        model, spec, config = workflow.load_source(f, dev)
        loader = workflow.test_loader(spec, args.data_dir or (config.data_dir if config else None),
                                      config.seed if config else 0, 512)
        got = float(engine.evaluate(model, loader, dev)["top1"])
        checked += 1
        ok = abs(got - want) <= args.tolerance
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {f}: top-1 {got:.2f}% (recorded {want:.2f}%)", flush=True)
    print(f"{checked} model(s) re-evaluated, {bad} not reproducing their recorded top-1")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
