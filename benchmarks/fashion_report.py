"""The Fashion-MNIST ResNet-20 benchmark's report (issue 18), from the committed result files only.

Reads every run directory ``<config>-s<seed>`` under ``--runs`` (``config.json``, ``metrics.jsonl``,
the split summaries ``decomposed-<scheme>-<criterion>[-calN].json``, the fine-tunes
``finetune-<stem>/metrics.jsonl`` and the measured-speed records ``bench-decomposed-<stem>.json``),
evaluates no model, and writes the table (``--out``: ``.md`` and ``.csv``) and two plots
(``--plots``: ``-top1-vs-macs.png`` and ``-top1-vs-speedup.png``). Old and new spellings are both
read: ``speedup``/``mac_reduction``, ``target_speedup``/``target_macs``, ``-speedup3``/``-macs3``.

Usage::

    python benchmarks/fashion_report.py [--runs benchmarks/results/fashion] [--out docs/fashion-table]
                                        [--plots docs/img/fashion]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from trp.errors import Error, FileError, one_line
from trp.limits import parse_json, read_json, read_json_lines

ORDER = ["baseline", "TRP2+Nu→3× MACs", "TRP2+Nu→3× MACs, 5-epoch ramp", "TRP2+Nu→3× MACs, 10-epoch ramp",
         "TRP2+Nu→3× MACs, 5-epoch ramp, last 8 epochs factored", "TRP2+Nu→3× MACs, 10-epoch ramp, last 5 epochs factored",
         "TRP2+Nu→2× latency", "TRP1+Nu", "TRP2+Nu", "LoRITa N=2"]
VARIANTS = (("plain", "without fine-tuning"), ("bn", "with BatchNorm re-estimated"), ("ft", "fine-tuned"),
            ("cal", "calibrated"))
DASH = "—"


@dataclass
class Row:
    """One model of the table: a run's dense model, one of its splits, or a run still training."""

    label: str                 # the run's method label (baseline, TRP2+Nu, ...)
    seed: Optional[int]
    run: str                   # the run directory's name
    kind: str                  # "dense", "split", "calibrated" or "in progress"
    what: str                  # the table's description of the row
    scheme: str = ""
    criterion: str = ""
    calibrate: int = 0
    macs: Optional[float] = None       # MAC reduction (1 for a dense model)
    top1: Optional[float] = None       # no fine-tuning
    bn: Optional[float] = None         # BatchNorm statistics re-estimated
    ft: Optional[float] = None         # fine-tuned
    ms1: Optional[float] = None        # measured speedup, ONNX Runtime, batch 1
    ms64: Optional[float] = None       # ... batch 64
    vs: Optional[float] = None         # top-1 (no fine-tuning) minus the same-seed baseline's dense top-1
    device: str = ""                   # the machine the speedups were measured on (the bench record's)

    @property
    def baseline(self) -> bool:
        return self.label == "baseline"


def number(doc: Any, path: Path, *keys: str) -> Optional[float]:
    """The number at ``doc[keys[0]][keys[1]]...``; None when absent or null; a FileError naming ``path``
    when present but not a number."""
    for i, key in enumerate(keys):
        if doc is None:
            return None
        if not isinstance(doc, dict):
            raise FileError(f"{path}: {'.'.join(keys[:i]) or 'the file'} should be a JSON object, got {doc!r:.60}")
        doc = doc.get(key)
    if doc is None:
        return None
    if isinstance(doc, bool) or not isinstance(doc, (int, float)) or not math.isfinite(doc):
        raise FileError(f"{path}: {'.'.join(keys)} should be a number, got {doc!r:.60}")
    return float(doc)


def read_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (bounded read); a FileError naming the file otherwise."""
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise FileError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The epochs of a ``metrics.jsonl`` (a partial last line, being written, is left out)."""
    if not path.is_file():
        return []
    lines = [(n, text) for n, text in read_json_lines(path) if text.strip()]
    epochs = []
    for i, (n, text) in enumerate(lines):
        try:
            doc = parse_json(text, f"{path} line {n}")
        except FileError:
            if i == len(lines) - 1:
                break
            raise
        if not isinstance(doc, dict):
            raise FileError(f"{path} line {n}: expected a JSON object")
        epochs.append(doc)
    return epochs


def run_label(config: dict[str, Any], path: Path) -> str:
    """The method label of a run from its config (``path``): baseline, TRP1/TRP2 (+Nu) (→ target), LoRITa N=..."""
    method = config.get("method")
    if method == "baseline":
        return "baseline"
    if method == "lorita":
        return f"LoRITa N={config.get('factor', 2)}"
    if method != "trp":
        return str(method)
    scheme = str(config.get("scheme"))
    label = {"channel": "TRP1", "spatial": "TRP2"}.get(scheme, f"TRP ({scheme})")
    if (number(config, path, "nuclear_weight") or 0) > 0:
        label += "+Nu"
    macs = number(config, path, "target_macs") or number(config, path, "target_speedup")
    latency = number(config, path, "target_latency")
    label += (f"→{macs:g}× MACs" if macs else "") + (f"→{latency:g}× latency" if latency else "")
    ramp = number(config, path, "target_ramp")
    if ramp:
        label += f", {ramp:g}-epoch ramp"
    factored = number(config, path, "factored_epochs")
    if factored:
        label += f", last {factored:g} epochs factored"
    return label


def spellings(stem: str) -> list[str]:
    """``stem`` and its other spelling (``-speedup3`` ⇄ ``-macs3``)."""
    other = re.sub(r"-speedup(?=[\d.])", "-macs", stem)
    if other == stem:
        other = re.sub(r"-macs(?=[\d.])", "-speedup", stem)
    return [stem] if other == stem else [stem, other]


def measured(run_dir: Path, stem: str, summary: dict[str, Any]) -> tuple[dict[int, float], str]:
    """ONNX Runtime measured speedup by batch size, from ``bench-<stem>.json`` (or ``<stem>.bench.json``,
    or the summary's ``measured`` record), and the device the record names; empty when never timed."""
    paths = [run_dir / name for s in spellings(stem) for name in (f"bench-{s}.json", f"{s}.bench.json")]
    found = [(p, read_object(p)) for p in paths if p.is_file()]
    if not found and isinstance(summary.get("measured"), dict):
        found = [(run_dir / f"{stem}.json", summary["measured"])]
    speeds: dict[int, float] = {}
    device = ""
    for path, record in found[:1]:
        device = record.get("device") if isinstance(record.get("device"), str) else ""
        rows = record.get("rows")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise FileError(f"{path}: 'rows' should be a list of objects (a `trp bench` record)")
        for r in rows:
            if r.get("runtime") == "onnxruntime" and isinstance(r.get("batch"), int):
                value = number(r, path, "speedup")
                if value is not None:
                    speeds[r["batch"]] = value
    return speeds, device


def finetuned(run_dir: Path, stem: str, summary: dict[str, Any], path: Path) -> Optional[float]:
    """The fine-tuned top-1: the summary's ``finetune.top1``, else the last ``test_top1`` of a finished
    ``finetune-<stem>/metrics.jsonl``."""
    top1 = number(summary, path, "finetune", "top1")
    if top1 is not None:
        return top1
    for s in spellings(stem.removeprefix("decomposed-")):
        folder = run_dir / f"finetune-{s}"
        epochs = read_metrics(folder / "metrics.jsonl")
        if epochs and not (folder / "checkpoint.pt").exists():
            return number(epochs[-1], folder / "metrics.jsonl", "test_top1")
    return None


def split_row(run_dir: Path, path: Path, label: str, seed: Optional[int]) -> Row:
    """The row of one split summary ``decomposed-<...>.json``."""
    doc = read_object(path)
    for key in ("scheme", "criterion"):
        if not isinstance(doc.get(key), str):
            raise FileError(f"{path}: '{key}' should be a string, got {doc.get(key)!r:.60}")
    cal = number(doc, path, "calibrate") or 0
    macs = number(doc, path, "mac_reduction")
    if macs is None:
        macs = number(doc, path, "speedup")
    what = f"split ({doc['scheme']}, {doc['criterion']})"
    if cal:
        what = f"calibrated split ({doc['scheme']}, {doc['criterion']}, {int(cal)} images)"
    speeds, device = measured(run_dir, path.stem, doc)
    return Row(label, seed, run_dir.name, "calibrated" if cal else "split", what, doc["scheme"], doc["criterion"],
               int(cal), macs, number(doc, path, "decomposed", "top1"), number(doc, path, "bn_recalibrated", "top1"),
               finetuned(run_dir, path.stem, doc, path), speeds.get(1), speeds.get(64), device=device)


def run_rows(run_dir: Path) -> list[Row]:
    """The rows of one run directory: in progress, or its dense model and each split."""
    config = read_object(run_dir / "config.json")
    label = run_label(config, run_dir / "config.json")
    m = re.search(r"-s(\d+)$", run_dir.name)
    seed = config["seed"] if isinstance(config.get("seed"), int) else int(m.group(1)) if m else None
    epochs = read_metrics(run_dir / "metrics.jsonl")
    last = int(number(epochs[-1], run_dir / "metrics.jsonl", "epoch") or 0) if epochs else 0
    total = config.get("epochs")
    if (run_dir / "checkpoint.pt").exists() or (isinstance(total, int) and last < total) or not epochs:
        return [Row(label, seed, run_dir.name, "in progress", f"in progress (epoch {last} of {total})")]
    rows = [Row(label, seed, run_dir.name, "dense", "dense", macs=1.0,
                top1=number(epochs[-1], run_dir / "metrics.jsonl", "test_top1"))]
    summaries = [p for p in sorted(run_dir.glob("decomposed-*.json")) if not p.name.endswith(".bench.json")]
    splits = [split_row(run_dir, p, label, seed) for p in summaries]
    return rows + sorted(splits, key=lambda r: (r.scheme, r.calibrate, r.macs or 0, r.criterion))


def collect(runs: Path) -> list[Row]:
    """Every row of every run under ``runs``, in the report's order, with the "vs baseline" column."""
    if not runs.is_dir():
        raise FileNotFoundError(f"{runs}: no such results folder")
    rows = [r for d in sorted(runs.iterdir()) if (d / "config.json").is_file() for r in run_rows(d)]
    rank = {label: i for i, label in enumerate(ORDER)}
    rows.sort(key=lambda r: (rank.get(r.label, len(ORDER)), r.label, r.seed if r.seed is not None else -1))
    dense = {r.seed: r.top1 for r in rows if r.baseline and r.kind == "dense"}
    for r in rows:
        base = dense.get(r.seed)
        if r.top1 is not None and base is not None:
            r.vs = r.top1 - base
    return rows


def fmt(value: Optional[float], suffix: str = "", signed: bool = False) -> str:
    """A number to two decimals (with ``suffix``), or the missing mark."""
    if value is None:
        return DASH
    return f"{value:+.2f}{suffix}" if signed else f"{value:.2f}{suffix}"


def headline(rows: list[Row]) -> list[str]:
    """The headline rows over seeds 0 and 1: mean and spread (and the split rows' difference from the
    baseline's mean), or which seed is missing (or in progress)."""
    lines = []
    base_mean: Optional[float] = None
    # the baseline, then every run trained toward 3x MACs (plain, lambda = 0, ramped, factored ...), in table order
    targets = list(dict.fromkeys(r.label for r in rows if "→3× MACs" in r.label))
    entries = [("baseline, dense", "baseline", "dense")]
    entries += [(("TRP2→3× MACs (λ = 0)" if label == "TRP2→3× MACs" else label) + ", split", label, "split")
                for label in targets]
    if "TRP2+Nu→3× MACs" not in targets:
        entries.insert(1, ("TRP2+Nu→3× MACs, split", "TRP2+Nu→3× MACs", "split"))  # the headline row: say it is missing
    for name, label, kind in entries:
        mine = [r for r in rows if r.label == label and r.seed in (0, 1)]
        top = {r.seed: r.top1 for r in mine if r.kind == kind and r.top1 is not None}
        busy = {r.seed for r in mine if r.kind == "in progress"}
        why = {s: f"seed {s} in progress" if s in busy else f"seed {s} missing" for s in (0, 1)}
        macs = {r.seed: f"{r.macs:.2f}×" for r in mine if r.kind == "split" == kind and r.top1 is not None and r.macs}
        at = ""
        if len(set(macs.values())) == 1:
            at = f" at {next(iter(macs.values()))}"
        elif macs:
            at = " at " + ", ".join(f"{m} (seed {s})" for s, m in sorted(macs.items()))
        if len(top) == 2:
            a, b = top[0], top[1]
            mean = (a + b) / 2
            versus = ""
            if label == "baseline":
                base_mean = mean
            elif base_mean is not None:
                versus = f"; {mean - base_mean:+.2f} against the baseline's mean"
            lines.append(f"- **{name}**{at}: top-1 mean {mean:.2f} over seeds 0 and 1 "
                         f"(spread {min(a, b):.2f}–{max(a, b):.2f}; seed 0 {a:.2f}, seed 1 {b:.2f}{versus})")
        elif top:
            s = 0 if 0 in top else 1
            lines.append(f"- **{name}**{at}: top-1 {top[s]:.2f} (seed {s} only; {why[1 - s]})")
        else:
            lines.append(f"- **{name}**: missing ({why[0]}, {why[1]})")
    return lines


def value(row: Row, variant: str) -> Optional[float]:
    """The top-1 of ``row`` in a comparison variant (plain/bn/ft of a split, cal of a calibrated split)."""
    if variant == "cal":
        return row.top1 if row.kind == "calibrated" else None
    return None if row.kind != "split" else {"plain": row.top1, "bn": row.bn, "ft": row.ft}[variant]


def notes(rows: list[Row]) -> list[str]:
    """For each TRP (non-baseline) split, the nearest baseline split (MAC reduction within 5%, same scheme
    preferred) in each variant, and the top-1 difference."""
    out = []
    for t in rows:
        x, top1 = t.macs, t.top1
        if t.baseline or t.kind not in ("split", "calibrated") or x is None or top1 is None:
            continue
        base = [(b, b.macs) for b in rows if b.baseline and b.seed == t.seed and b.kind in ("split", "calibrated")]
        parts, absent = [], []
        for variant, words in VARIANTS:
            near = [(b, m, v) for b, m in base if m and (v := value(b, variant)) is not None and abs(m / x - 1) <= 0.05]
            if not near:
                absent.append(words)
                continue
            b, m, v = min(near, key=lambda n: (n[0].scheme != t.scheme, abs(math.log(n[1] / x))))
            parts.append(f"{words}, the baseline's {b.scheme} split at {m:.2f}× has {v:.2f} ({top1 - v:+.2f})")
        if absent:
            parts.append(f"no baseline split within 5% of {x:.2f}× {' or '.join(absent)}"
                         if base else f"no baseline split of seed {t.seed} yet")
        text = "; ".join(parts)
        out.append(f"- {t.label} (seed {t.seed}), {t.what} at {x:.2f}×, top-1 {top1:.2f} without "
                   f"fine-tuning. {text[:1].upper()}{text[1:]}.")
    return out


def timed_on(rows: list[Row]) -> str:
    """The sentence naming the machine(s) the speedups were measured on (each with its count of splits)."""
    devices: dict[str, int] = {}
    for r in rows:
        if r.device:
            devices[r.device] = devices.get(r.device, 0) + 1
    if not devices:
        return "No split has been timed yet."
    if len(devices) == 1:
        return f"Speedups measured on {next(iter(devices))}."
    parts = ", ".join(f"{d} ({n} split{'' if n == 1 else 's'})" for d, n in sorted(devices.items(), key=lambda kv: -kv[1]))
    return f"Speedups measured on more than one machine, not comparable across them: {parts}."


def markdown(rows: list[Row], runs: Path) -> str:
    """The report in markdown: the table, the headline block and the notes."""
    head = ["run", "seed", "row", "MAC reduction", "top-1", "top-1 BN re-estimated", "top-1 fine-tuned",
            "measured speedup ORT b1", "measured speedup ORT b64", "vs baseline (points)"]
    lines = ["# Fashion-MNIST ResNet-20 benchmark", "",
             (f"Generated by `python benchmarks/fashion_report.py --runs {runs}` from the result files (no model "
              "evaluated). Top-1 in % on the 10,000 test images; \"top-1\" is without fine-tuning; measured "
              "speedups are ONNX Runtime's (median time ratio, dense / split); \"vs baseline\" is top-1 without "
              f"fine-tuning minus the same seed's baseline dense top-1; {DASH}: not measured or missing."), "",
             timed_on(rows), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, DASH if r.seed is None else str(r.seed), r.what, fmt(r.macs, "×"), fmt(r.top1), fmt(r.bn),
                 fmt(r.ft), fmt(r.ms1, "×"), fmt(r.ms64, "×"), fmt(r.vs, signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Headline", ""] + headline(rows)
    lines += ["", "## TRP splits against the baseline's", "",
              ("The baseline's split nearest in MAC reduction (within 5%, same scheme first) in each variant; in "
               "parentheses the TRP row's top-1 minus the baseline's, in points."), ""]
    lines += notes(rows) or ["- no TRP split yet."]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    """The table as CSV (empty cells for missing values)."""
    columns = dict(run="label", seed="seed", directory="run", kind="kind", row="what", scheme="scheme",
                   criterion="criterion", calibrate="calibrate", mac_reduction="macs", top1="top1", top1_bn="bn",
                   top1_finetuned="ft", speedup_ort_b1="ms1", speedup_ort_b64="ms64", timed_on="device",
                   vs_baseline="vs")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for cells in ([getattr(r, k) for k in columns.values()] for r in rows):
            w.writerow(["" if c is None else round(c, 4) if isinstance(c, float) else c for c in cells])


def points(rows: list[Row], x: str) -> dict[str, list[tuple[float, float]]]:
    """Plot points by family (each TRP/LoRITa method one, its seeds together): (x, top-1) with ``x`` the
    attribute ``macs`` or ``ms64``."""
    fams: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        pos = getattr(r, x)
        if pos is None:
            continue
        if not r.baseline:
            if r.top1 is not None:
                fams.setdefault(r.label, []).append((pos, r.top1))
            continue
        if r.kind == "dense":
            pairs = [("baseline dense", r.top1)]
        elif r.kind == "calibrated":
            pairs = [("baseline calibrated", r.top1)]
        else:
            pairs = [("baseline split", r.top1), ("baseline + BN", r.bn), ("baseline fine-tuned", r.ft)]
        for fam, y in pairs:
            if y is not None:
                fams.setdefault(fam, []).append((pos, y))
    return fams


def sweep_curves(runs: Path) -> dict[str, list[tuple[float, float]]]:
    """Seed-0 sweeps (``trp sweep RUN --kind macs``): per sweep label, (MAC reduction, top-1) points in order."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for path in sorted(runs.glob("*-s0/sweep-*-macs.json")):
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("kind") != "trp-sweep" or not isinstance(doc.get("points"), list):
            raise ValueError(f"{path}: not a trp sweep file (kind 'trp-sweep' with a list of points)")
        pts = sorted((float(q["mac_reduction"]), float(q["top1"])) for q in doc["points"]
                     if q.get("mac_reduction") and q.get("top1") is not None)
        # the run's own label (the table's), so runs of one method with different schedules stay apart
        config = path.parent / "config.json"
        label = str(doc.get("label") or path.parent.name)
        if config.is_file():
            label = f"{run_label(read_object(config), config)} ({doc.get('scheme', '?')})"
        if label in curves:
            label = f"{label}, {path.parent.name}"
        curves[label] = pts
    return curves


def plot(rows: list[Row], path: Path, x: str, xlabel: str, title: str, empty: str,
         curves: Optional[dict[str, list[tuple[float, float]]]] = None) -> None:
    """Top-1 against ``x`` (log scale), one marker and colour per family, and ``curves`` (sweeps) as thin lines;
    ``empty`` titles a plot with no point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    style = {"baseline dense": ("k", "s"), "baseline split": ("tab:blue", "o"), "baseline + BN": ("tab:green", "^"),
             "baseline fine-tuned": ("tab:purple", "D"), "baseline calibrated": ("tab:orange", "v")}
    fams = points(rows, x)
    # TRP and LoRITa methods: filled markers in colours the baseline families do not use
    methods = [f for f in fams if f not in style]
    colours = ["tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "gold", "navy", "lime", "crimson"]
    markers = ["*", "P", "X", "p", "h", "d", "8", "H"]
    for i, fam in enumerate(methods):
        style[fam] = (colours[i % len(colours)], markers[i % len(markers)])
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for label, pts in (curves or {}).items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", lw=1, alpha=0.6, label=f"sweep: {label}", zorder=2)
    for fam, pts in fams.items():
        colour, marker = style[fam]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=colour, marker=marker, s=70 if marker == "*" else 45,
                   label=fam, zorder=3, edgecolors="none")
    ax.set_xscale("log")
    xs = [p[0] for pts in [*fams.values(), *(curves or {}).values()] for p in pts] or [1.0]
    ax.set_xticks([t for t in (1, 1.5, 2, 3, 4, 6, 8, 12, 16) if min(xs) / 1.2 <= t <= max(xs) * 1.2] or [1])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Fashion-MNIST top-1 (%)")
    ax.set_title(title if fams else f"{title}\n({empty})", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    if fams or curves:  # beside the axes: the points crowd near the top
        ax.legend(fontsize=6 if curves else 7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write the table (.md, .csv) and the two plots; one error line naming the file on a malformed input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("benchmarks/results/fashion"))
    parser.add_argument("--out", type=Path, default=Path("docs/fashion-table"), help="table path without suffix")
    parser.add_argument("--plots", default="docs/img/fashion", help="plot path prefix")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.runs)
        curves = sweep_curves(args.runs)
    except (Error, OSError, ValueError, KeyError, TypeError) as err:
        print(f"fashion_report: error: {one_line(err)}", file=sys.stderr)
        return 1
    out = args.out.with_suffix("") if args.out.suffix in (".md", ".csv") else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(rows, args.runs))
    write_csv(rows, out.with_suffix(".csv"))
    plot(rows, Path(f"{args.plots}-top1-vs-macs.png"), "macs", "MAC reduction (dense = 1×)",
         "Fashion-MNIST ResNet-20: top-1 vs MAC reduction (lines: sweeps, seed 0, no fine-tuning)",
         "no finished run yet", curves)
    plot(rows, Path(f"{args.plots}-top1-vs-speedup.png"), "ms64", "measured speedup, ONNX Runtime, batch 64",
         "Fashion-MNIST ResNet-20: top-1 vs measured speedup", "no measured speedups yet")
    print(f"wrote {out}.md, {out}.csv, {args.plots}-top1-vs-macs.png, {args.plots}-top1-vs-speedup.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
