"""LoRITa vs TRP vs the decomposed baseline at matched MAC reductions (issue 4's benchmark).

For every run directory given (trained with `trp train --config configs/lorita/...`), the
trained model is decomposed at whole-model MAC reductions of 2x, 3x and 4x with each rank
selection mode, and evaluated on the test split:

- ``energy/MAC``: :class:`trp.TargetMACs` (the most spectral energy per MAC, trp's own);
- ``local``: the same kept fraction in every layer (:class:`trp.Ratio`, bisected to the target);
- ``global``: LoRITa's pooled normalized singular values (:class:`trp.Global` with ``mac_reduction``);
- ``iterative``: the per-layer search scored on the run's held-out training images
  (:func:`trp.methods.search.iterative_rank_search`).

A curve of top-1 against MAC reduction (``energy/MAC`` at 1.5x-6x) is plotted per model.
Each run is decomposed with its own config's scheme (LoRITa's conv + 1x1 factors are the
channel scheme's structure). Usage::

    python benchmarks/lorita_compare.py runs/lorita/* --out benchmarks/results/lorita_compare
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import trp
from trp.app import engine, workflow
from trp.core.decompose import fit_criterion
from trp.deploy.io import atomic_write
from trp.app.plot import plot_tradeoff
from trp.app.report import markdown_table
from trp.app.results import method_label
from trp.methods.search import iterative_rank_search
from trp.app.sweep import SweepPoint, point_from_dict

MODES = ("energy/MAC", "local", "global", "iterative")


def ratio_for_mac_reduction(model, scheme, target, shape):
    """The largest kept fraction whose MACs are at least ``target`` times lower."""
    budget = trp.count_macs(model, shape) / target
    p, _ = fit_criterion(model, scheme, trp.Ratio, budget, shape, lo=1e-4, hi=1.0, steps=20)
    return trp.Ratio(p)


def criterion_for(mode, model, scheme, target, shape, held_loader):
    if mode == "energy/MAC":
        return trp.TargetMACs(target)
    if mode == "local":
        return ratio_for_mac_reduction(model, scheme, target, shape)
    if mode == "global":
        return trp.Global(mac_reduction=target)
    return iterative_rank_search(model, scheme, held_loader, target, shape)


def render(results: list[dict], targets: list[float], modes: list[str], out: Path) -> None:
    """Write OUT.md: one row per run and selection mode, top-1 (actual MAC reduction) per target. Reads files written
    before the rename too (key ``speedup``)."""
    headers = ["model", "run", "method", "dense top-1", "selection"] + [f"top-1 @ {t:g}× MAC reduction (actual)" for t in targets]
    rows = []
    for r in results:
        for mode in modes:
            cells = [r["at"].get(f"{mode}@{t:g}") for t in targets]
            if not any(cells):
                continue
            rows.append([r["model"], Path(r["run"]).name, f"{r['method']} ({r['scheme']})", f"{r['dense_top1']:.2f}", mode]
                        + [f"{c['top1']:.2f} ({c.get('mac_reduction', c.get('speedup')):.2f}×)" if c else "–" for c in cells])
    table = markdown_table(headers, rows)
    with atomic_write(out.with_suffix(".md")) as tmp:
        tmp.write_text(table + "\n")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--targets", default="2,3,4")
    parser.add_argument("--curve", default="1.5,2,2.5,3,4,5,6")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lorita_compare"))
    parser.add_argument("--render-only", action="store_true", help="Rewrite OUT.md from OUT.json, measure nothing.")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    curve_targets = [float(t) for t in args.curve.split(",")]
    modes = args.modes.split(",")
    if args.render_only:
        results = json.loads(args.out.with_suffix(".json").read_text())
        render(results, targets, modes, args.out)
        curves: dict = {}
        for r in results:
            curves.setdefault(r["model"], {})[f"{Path(r['run']).name}: {r['method']}"] = [point_from_dict(p) for p in r["curve"]]
        plot_curves(curves, args.out)
        return
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=r"trp\.decompose left")

    results, curves = [], {}
    for run in args.runs:
        if not (run / "model.safetensors").exists():
            print(f"skipping {run}: no model.safetensors (training not finished)", file=sys.stderr)
            continue
        config = engine.load_config(run)
        model, spec, _ = workflow.load_source(run, "cpu")
        shape = spec.input_shape
        label = method_label(dataclasses.asdict(config))
        test = workflow.test_loader(spec, config.data_dir, config.seed)
        train_set, _, _ = trp.data.get_datasets(spec.data, config.data_dir, seed=config.seed)
        _, held = engine.holdout_split(train_set, config.holdout)
        held_loader = engine.make_loader(held, 250, False) if len(held) else None
        dense = engine.evaluate(model, test, "cpu")["top1"]
        print(f"{run}: {spec.model} {label} ({config.scheme}), dense top-1 {dense:.2f}%", flush=True)
        row = {"run": str(run), "model": spec.model, "method": label, "scheme": config.scheme, "dense_top1": dense,
               "macs": trp.count_macs(model, shape), "params": trp.count_params(model), "at": {}}
        for mode in modes:
            if mode == "iterative" and held_loader is None:
                continue
            for target in targets:
                start = time.perf_counter()
                crit = criterion_for(mode, model, config.scheme, target, shape, held_loader)
                compact = trp.decompose(model, config.scheme, crit, input_shape=shape)
                top1 = engine.evaluate(compact, test, "cpu")["top1"]
                reduction = row["macs"] / trp.count_macs(compact, shape)
                row["at"][f"{mode}@{target:g}"] = {"top1": top1, "mac_reduction": reduction,
                                                   "seconds": time.perf_counter() - start}
                print(f"  {mode:>10} @ {target:g}x: {top1:6.2f}% (actual MAC reduction {reduction:.2f}x, "
                      f"{time.perf_counter() - start:.1f}s)", flush=True)
        points = []
        for x in curve_targets:
            compact = trp.decompose(model, config.scheme, trp.TargetMACs(x), input_shape=shape)
            s = trp.app.report.summarize(model, compact, shape)
            points.append(SweepPoint(f"macs:{x:g}", engine.evaluate(compact, test, "cpu")["top1"], None,
                                     s.macs_after, s.conv_macs_after, s.params_after, s.mac_reduction, s.conv_mac_reduction))
        row["curve"] = [dataclasses.asdict(p) for p in points]
        curves.setdefault(spec.model, {})[f"{run.name}: {label}"] = points
        results.append(row)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    render(results, targets, modes, args.out)
    plot_curves(curves, args.out)


def plot_curves(curves: dict, out: Path) -> None:
    """One PNG per model: top-1 against whole-model MAC reduction, one curve per run."""
    for model_name, model_curves in curves.items():
        png = out.parent / f"{out.name}-{model_name}.png"
        plot_tradeoff(model_curves, png, title=f"{model_name} on MNIST-5k: top-1 vs MAC reduction (TargetMACs)",
                      x="mac_reduction")
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
