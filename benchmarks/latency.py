"""MAC-based ranks against measured-latency ranks: does the promised speedup show up on the clock? (issue 8)

For each model, scheme, batch size and target ``x``, the dense model is split twice:

- ``TargetMACs(x)``: the model's MACs drop ``x`` times (the most spectral energy per MAC);
- ``TargetLatency(x)``: its measured time in ``--latency-runtime`` at that batch size drops ``x``
  times (the most spectral energy per millisecond saved, from a per-layer latency profile
  cached on disk, then calibrated on the whole model).

Each split is then timed against the dense model in every runtime (BatchNorm folded in both,
interleaved runs, median of the per-pair ratios or, with ``--statistic min`` on a busy machine,
fastest dense run / fastest split run; random inputs), and reported with its MAC
reduction and the spectral energy it keeps (mean over the target layers of the kept share of
sum(sigma^2); a dense layer keeps 1). Weights are random (nothing is downloaded): timings do
not depend on them, the energy column does (random weights are far from low rank).

    python benchmarks/latency.py                                   # everything (long; a quiet machine)
    python benchmarks/latency.py --models resnet20-32,resnet18 --batches 1,64 --threads 2
    python benchmarks/latency.py --models resnet20-28 --targets 2 --batches 1 --repeats 5   # a smoke run

Rows accumulate in ``--out``.json (a row is replaced when measured again), so the benchmark
can run in pieces; the Markdown table (``--out``.md) and the plot of target against measured
speedup (``--out``.png) are redrawn from all rows after every piece.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import trp
from trp.app.report import markdown_table
from trp.core.allocation import pooled_spectrum
from trp.core.layers import select_layers
from trp.core.schemes import scheme_for
from trp.core.svd import checked_svd
from trp.deploy.io import atomic_write
from trp.models import create_model


def _all_plain_convs(name: str, module: nn.Module) -> bool:
    """MobileNetV2's splittable layers: its 3x3 convs are depthwise, so the 1x1 convs (not the stem, not the head)."""
    return isinstance(module, nn.Conv2d) and module.groups == 1 and name not in ("features.0.0",)


# name: (registry name, input channels, image size, classes, layer selection)
MODELS: dict[str, tuple[str, int, int, int, Optional[Callable[[str, nn.Module], bool]]]] = {
    "resnet20-28": ("resnet20", 1, 28, 10, None),
    "resnet20-32": ("resnet20", 3, 32, 10, None),
    "resnet56": ("resnet56", 3, 32, 10, None),
    "resnet18": ("torchvision.resnet18", 3, 224, 1000, None),
    "resnet50": ("torchvision.resnet50", 3, 224, 1000, None),
    "mobilenet_v2": ("torchvision.mobilenet_v2", 3, 224, 1000, _all_plain_convs),
    "vit_tiny": ("vit_tiny", 3, 32, 10, None),
}


def _list(text: str, cast):
    return [cast(t.strip()) for t in text.split(",") if t.strip()]


def energy_kept(model: nn.Module, scheme: str, ranks: dict[str, int], layers) -> float:
    """Mean over the target layers of the kept share of the squared singular values (dense: 1)."""
    shares = []
    targets, _ = select_layers(model, layers)
    for name, module in targets:
        if name not in ranks:
            shares.append(1.0)
            continue
        sch = scheme_for(module, scheme)
        _, s, _ = checked_svd(sch.to_matrix(module.weight.detach()), name)
        energy = pooled_spectrum(s).square()
        shares.append(float(energy[: ranks[name]].sum() / energy.sum()))
    return sum(shares) / len(shares)


def _folded(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trp.fold_batchnorm(model)


def run_model(key: str, args: argparse.Namespace, emit) -> None:
    registry, channels, size, classes, layers = MODELS[key]
    torch.manual_seed(0)
    dense = create_model(registry, in_channels=channels, num_classes=classes).eval()
    shape = (1, channels, size, size)
    dense_macs = trp.count_macs(dense, shape)
    folded_dense = _folded(dense)
    for scheme in args.schemes:
        mac_splits: dict[float, Any] = {}
        for batch in args.batches:
            x_in = torch.randn((batch, channels, size, size), generator=torch.Generator().manual_seed(0))
            for target in args.targets:
                for kind in ("TargetMACs", "TargetLatency"):
                    row: dict[str, Any] = {"model": key, "scheme": scheme, "batch": batch, "target": target,
                                           "criterion": kind, "threads": args.threads, "repeats": args.repeats,
                                           "statistic": args.statistic}
                    start = time.perf_counter()
                    try:
                        if kind == "TargetMACs":
                            if target not in mac_splits:
                                mac_splits[target] = trp.decompose_with_report(
                                    dense, scheme, trp.TargetMACs(target), layers=layers, input_shape=shape)
                            report = mac_splits[target]
                        else:
                            crit = trp.TargetLatency(target, runtime=args.latency_runtime, batch_size=batch,
                                                     threads=args.threads, calibrate=args.calibrate,
                                                     repeats=args.repeats, warmup=args.warmup,
                                                     statistic=args.statistic)
                            report = trp.decompose_with_report(dense, scheme, crit, layers=layers, input_shape=shape)
                            row["calibration"] = [[c.target, c.measured] for c in crit.history]
                    except ValueError as err:
                        row["error"] = str(err)
                        emit(row)
                        continue
                    row["split_seconds"] = time.perf_counter() - start
                    ranks = {r.name: r.rank for r in report.factorized}
                    row["ranks"] = ranks
                    row["mac_reduction"] = dense_macs / trp.count_macs(report.model, shape)
                    row["energy_kept"] = energy_kept(dense, scheme, ranks, layers)
                    folded = _folded(report.model)
                    for runtime in args.runtimes:
                        c = trp.compare_latency(folded_dense, folded, x_in, runtime, args.threads, args.repeats,
                                                args.warmup)
                        q1, q3 = c.spread
                        row[runtime] = {"speedup": c.speedup, "q1": q1, "q3": q3, "speedup_of_minima": c.speedup_of_minima,
                                        "dense_ms": c.dense.median_ms, "split_ms": c.compact.median_ms}
                    row["device"] = c.dense.device
                    emit(row)


def _current_names(row: dict) -> dict:
    """A row as written now: rows written before issue 21 name the MAC-based criterion TargetSpeedup."""
    return {**row, "criterion": "TargetMACs"} if row.get("criterion") == "TargetSpeedup" else row


def _row_key(row: dict[str, Any]) -> tuple:
    return (row["model"], row["scheme"], row["batch"], row["target"], row["criterion"])


def _measured(row: dict[str, Any], runtime: str) -> float:
    """The row's measured speedup by its statistic: median of per-pair ratios, or ratio of the fastest runs."""
    m = row[runtime]
    return m["speedup_of_minima"] if row.get("statistic") == "min" else m["speedup"]


def _cell(row: dict[str, Any], runtime: str) -> str:
    m = row.get(runtime)
    if not m:
        return "-"
    if row.get("statistic") == "min":
        return f"{m['speedup_of_minima']:.2f}x (median {m['speedup']:.2f}x)"
    return f"{m['speedup']:.2f}x ({m['q1']:.2f}-{m['q3']:.2f})"


def table(rows: list[dict[str, Any]], runtimes: list[str]) -> str:
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["model"], r["scheme"], str(r["batch"]), f"{r['target']:g}", r["criterion"], "-",
                         *["-" for _ in runtimes], "-", "unreachable: " + r["error"].split(": ", 1)[-1][:90]])
            continue
        within = ""
        lat = r.get(runtimes[-1])
        if lat:
            within = "yes" if abs(_measured(r, runtimes[-1]) / r["target"] - 1) <= 0.15 else "no"
        body.append([r["model"], r["scheme"], str(r["batch"]), f"{r['target']:g}", r["criterion"],
                     f"{r['mac_reduction']:.2f}x", *[_cell(r, rt) for rt in runtimes], f"{r['energy_kept']:.3f}",
                     within])
    return markdown_table(
        ["model", "scheme", "batch", "target x", "criterion", "MAC reduction",
         *[f"measured speedup, {rt}" for rt in runtimes], "energy kept", f"{runtimes[-1]} within ±15% of x"],
        body,
    )


def plot(rows: list[dict[str, Any]], runtime: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    batches = sorted({r["batch"] for r in rows if runtime in r})
    if not batches:
        return
    fig = Figure(figsize=(5.5 * len(batches), 5))
    for i, batch in enumerate(batches):
        ax = fig.add_subplot(1, len(batches), i + 1)
        top = max([r["target"] for r in rows] + [_measured(r, runtime) for r in rows if runtime in r]) * 1.1
        xs = [1, top]
        ax.plot(xs, xs, color="black", lw=0.8, label="measured = target")
        ax.fill_between(xs, [0.85 * v for v in xs], [1.15 * v for v in xs], color="grey", alpha=0.15, label="±15%")
        curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in rows:
            if r["batch"] == batch and runtime in r:
                curves.setdefault((r["model"] + "/" + r["scheme"], r["criterion"]), []).append(
                    (r["target"], _measured(r, runtime)))
        for (label, kind), pts in sorted(curves.items()):
            pts.sort()
            ax.plot(*zip(*pts), marker="o" if kind == "TargetLatency" else "x",
                    ls="-" if kind == "TargetLatency" else "--", label=f"{label} {kind}")
        ax.set_xlabel("target x")
        ax.set_ylabel(f"measured speedup ({runtime})")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=6)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--schemes", default="channel", help="comma-separated conv schemes")
    parser.add_argument("--targets", default="1.5,2,3")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--runtimes", default="eager,onnxruntime", help="runtimes the splits are timed in")
    parser.add_argument("--latency-runtime", default="onnxruntime", help="the runtime TargetLatency aims at")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads [default: the runtime's]")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--calibrate", type=int, default=5, help="TargetLatency's measure-and-adjust rounds")
    parser.add_argument("--statistic", choices=["median", "min"], default="median",
                        help="how timed runs are read: median (per-pair ratios), or the fastest run (a busy machine)")
    parser.add_argument("--out", default="benchmarks/results/latency", help="output path without suffix")
    args = parser.parse_args()
    args.models = _list(args.models, str)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}")
    args.schemes, args.targets = _list(args.schemes, str), _list(args.targets, float)
    args.batches, args.runtimes = _list(args.batches, int), _list(args.runtimes, str)
    if args.latency_runtime in args.runtimes:  # the aimed-at runtime last: the "within" column reads it
        args.runtimes = [r for r in args.runtimes if r != args.latency_runtime] + [args.latency_runtime]
    out = Path(args.out)
    path = out.with_suffix(".json")
    rows: dict[tuple, dict[str, Any]] = {}
    if path.exists():
        rows = {_row_key(r): r for r in map(_current_names, json.loads(path.read_text())["rows"])}

    def emit(row: dict[str, Any]) -> None:
        rows[_row_key(row)] = row
        text = (f"{row['model']:>12} {row['scheme']:>8} b{row['batch']:<3} x={row['target']:<4g} {row['criterion']:<13} "
                + (f"unreachable ({row['error'][:100]})" if "error" in row else
                   f"MACs {row['mac_reduction']:.2f}x  " + "  ".join(f"{rt} {_cell(row, rt)}" for rt in args.runtimes)
                   + f"  energy {row['energy_kept']:.3f}"))
        print(text, flush=True)
        ordered = sorted(rows.values(), key=lambda r: (list(MODELS).index(r["model"]) if r["model"] in MODELS else 99,
                                                        r["scheme"], r["batch"], r["target"], r["criterion"] != "TargetMACs"))
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({"kind": "trp-latency-benchmark", "torch": torch.__version__,
                                       "rows": ordered}, indent=1) + "\n")

    for key in args.models:
        run_model(key, args, emit)
    ordered = sorted(rows.values(), key=lambda r: (list(MODELS).index(r["model"]) if r["model"] in MODELS else 99,
                                                    r["scheme"], r["batch"], r["target"], r["criterion"] != "TargetMACs"))
    runtimes = args.runtimes
    text = table(ordered, runtimes)
    with atomic_write(out.with_suffix(".md")) as tmp:
        tmp.write_text(text + "\n")
    plot(ordered, args.latency_runtime, out.with_suffix(".png"))
    print()
    print(text)
    print(f"\nwrote {path}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
