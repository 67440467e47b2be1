"""Result tables across run directories: dense and decomposed accuracy, MACs, MAC reductions.

:func:`collect` reads run directories written by ``trp train`` (``config.json``,
``metrics.jsonl``) and the ``decomposed-*.json`` summaries ``trp decompose`` writes next
to them, and returns one :class:`ResultRow` per model: the dense one, each decomposition
and each fine-tuned decomposition; :func:`seed_table` averages rows that differ only in seed.
Rows carry the published number for the same method (:mod:`trp.app.paper`) where there is one.
:func:`markdown_table`, :func:`write_csv` and :func:`tradeoff_notes` turn rows into tables and
plain sentences.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from . import report
from .config import TrainConfig
from ..deploy.io import atomic_write
from ..limits import parse_json, read_json, read_json_lines
from .paper import find_paper_result

__all__ = [
    "SCHEME_LABELS",
    "CLASSIC_LABELS",
    "ResultRow",
    "method_label",
    "collect",
    "markdown_table",
    "write_csv",
    "tradeoff_notes",
    "seed_table",
]

PathLike = Union[str, os.PathLike]

#: TRP variant name per scheme (SPEC §1.3: TRP1 = channel, TRP2 = spatial).
SCHEME_LABELS = {"channel": "TRP1", "spatial": "TRP2", "decouple": "TRP-decouple"}
#: The classic decomposition each scheme comes from, for decomposed normally trained nets.
CLASSIC_LABELS = {
    "channel": "Zhang et al. (channel)",
    "spatial": "Jaderberg et al. (spatial)",
    "decouple": "Guo et al. (decouple)",
}
SUMMARY_KIND = "trp-decomposition"
SUMMARY_VERSION = 1
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def _cfg(config: dict, key: str) -> Any:
    return config.get(key, _DEFAULTS.get(key))


def write_table(rows: Sequence["ResultRow"], out: Path, text: str, notes: Sequence[str], seeds: str) -> Path:
    """Write ``trp table --out OUT``: OUT.md (the table, its notes, the seed table) and OUT.csv; the .md path."""
    md = Path(out).with_suffix(".md")
    with atomic_write(md) as tmp:
        tmp.write_text(text + "\n\n" + "".join(f"- {n}\n" for n in notes)
                       + (f"\nRows trained with several seeds:\n\n{seeds}\n" if seeds else ""))
    write_csv(rows, Path(out).with_suffix(".csv"))
    return md


def sweep_curves(run_dirs: Sequence[Path], rows: Sequence["ResultRow"]) -> tuple[dict[str, Any], dict[str, tuple]]:
    """The curves of every ``sweep-*.json`` in the runs and a marker per fine-tuned row, for ``trp table --plot``."""
    from .sweep import load_sweep

    curves: dict[str, Any] = {}
    markers: dict[str, tuple] = {}
    for run_dir in run_dirs:
        for path in sorted(Path(run_dir).glob("sweep-*.json")):
            meta, pts = load_sweep(path)
            kind = {"speedup": "macs"}.get(str(meta.get("criterion_kind", "")), meta.get("criterion_kind", ""))
            curves[str(meta.get("label", path.stem)) + f" [{kind}]"] = pts
    for r in rows:
        if r.finetuned and r.top1 is not None and r.conv_mac_reduction:
            markers[f"{r.label}, fine-tuned"] = (r.conv_mac_reduction, r.top1)
    if not curves:
        raise ValueError("no sweep-*.json in these runs: run `trp sweep RUN_DIR...` first")
    return curves, markers


def run_label(config: TrainConfig) -> str:
    """The method label of a run's config (e.g. ``TRP+Nu``)."""
    return method_label(dataclasses.asdict(config))


def method_label(config: dict, decomposed_scheme: Optional[str] = None) -> str:
    """The row label of a run (``config`` as in ``config.json``), or of its decomposition.

    Dense models: "baseline", "Nu only", "TRP1"/"TRP2"/"TRP-decouple" (+"+Nu" with a
    nuclear term, + " → 3× MACs" or " → 2× latency" when trained toward a target),
    "LoRITa N=<factor>", "fine-tuned". With ``decomposed_scheme``, a
    baseline run becomes that scheme's classic method (e.g. "Zhang et al. (channel)"), a
    nuclear-only run "Nu only + <scheme>", and a TRP run decomposed with another scheme
    than it was trained with gets " / <scheme>" appended. Unknown methods keep their name.
    """
    method = str(_cfg(config, "method"))
    scheme = str(_cfg(config, "scheme"))
    nuclear = float(_cfg(config, "nuclear_weight") or 0.0)
    if method == "baseline":
        if decomposed_scheme is None:
            return "baseline"
        return CLASSIC_LABELS.get(decomposed_scheme, f"baseline + {decomposed_scheme}")
    if method == "nuclear":
        return "Nu only" if decomposed_scheme is None else f"Nu only + {decomposed_scheme}"
    if method == "trp":
        label = SCHEME_LABELS.get(scheme, f"TRP-{scheme}") + ("+Nu" if nuclear > 0 else "")
        target_macs = _cfg(config, "target_macs") or _cfg(config, "target_speedup")  # the key before issue 21
        if target_macs:
            label += f" → {float(target_macs):g}× MACs"
        elif _cfg(config, "target_latency"):
            label += f" → {float(_cfg(config, 'target_latency')):g}× latency"
        if decomposed_scheme is not None and decomposed_scheme != scheme:
            label += f" / {decomposed_scheme}"
        return label
    if method == "lorita":
        factor = _cfg(config, "factor")
        return f"LoRITa N={factor}" if factor is not None else "LoRITa"
    if method == "finetune":
        return "fine-tuned"
    return method


@dataclass
class ResultRow:
    """One model in a result table (dense, decomposed, or decomposed and fine-tuned).

    ``criterion`` is None for dense rows. MACs and params are of this row's model;
    MAC reductions are against the dense model of the same run. ``paper_*`` hold the published
    number for the same label (``paper_dataset`` says which dataset it is from).
    """

    run_dir: str
    label: str
    method: str
    scheme: Optional[str]
    model: str
    data: str
    criterion: Optional[str]
    finetuned: bool
    finetune_epochs: Optional[int]
    top1: Optional[float]
    top5: Optional[float]
    macs: Optional[int]
    conv_macs: Optional[int]
    params: Optional[int]
    mac_reduction: Optional[float]
    conv_mac_reduction: Optional[float]
    paper_top1: Optional[float] = None
    paper_mac_reduction: Optional[float] = None
    paper_dataset: Optional[str] = None
    paper_note: str = ""

    @property
    def decomposed(self) -> bool:
        return self.criterion is not None


# -- reading ------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    return read_json(path)


def _read_last_metrics(path: Path) -> dict:
    if not path.is_file():
        return {}
    last: dict = {}
    for n, line in read_json_lines(path):
        if not line.strip():
            continue
        row = parse_json(line, f"{path}, line {n},")
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {n}, is not a JSON object: the metrics file is corrupt")
        last = row
    return last


def _read_summary(path: Path) -> dict:
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("kind") != SUMMARY_KIND:
        raise ValueError(f"{path} is not a trp decomposition summary (no \"kind\": \"{SUMMARY_KIND}\")")
    version = data.get("version")
    if not isinstance(version, int) or version > SUMMARY_VERSION:
        raise ValueError(
            f"{path} has summary version {version!r}; this trp reads version {SUMMARY_VERSION}: upgrade trp"
        )
    return data


# Criterion kinds renamed in issue 21 (a MAC reduction is not a speedup): summaries written before
# read with the new spelling, so that old and new results group together.
_OLD_KINDS = {"speedup": "macs", "global-speedup": "global-macs"}


def new_criterion(text: str) -> str:
    """A criterion string in its current spelling (``speedup:3`` -> ``macs:3``; others unchanged)."""
    kind, sep, rest = text.partition(":")
    return f"{_OLD_KINDS[kind]}:{rest}" if sep and kind in _OLD_KINDS else text


def _new_or_old(record: dict, key: str, old_key: str) -> Any:
    """``record[key]``, or ``record[old_key]`` in files written before the key was renamed."""
    return record[key] if key in record else record.get(old_key)


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _int(value: Any) -> Optional[int]:
    v = _num(value)
    return None if v is None else int(v)


def _acc(block: Any, key: str) -> Optional[float]:
    return _num(block.get(key)) if isinstance(block, dict) else None


def _add_paper(row: ResultRow) -> None:
    # The paper's TRP numbers are without fine-tuning, and its dense numbers are baselines.
    if row.finetuned or (not row.decomposed and row.method != "baseline"):
        return
    found = find_paper_result(row.data, row.model, row.label, row.conv_mac_reduction if row.decomposed else None)
    if found is not None:
        row.paper_top1, row.paper_mac_reduction = found.top1, found.mac_reduction
        row.paper_dataset, row.paper_note = found.dataset, found.note


def collect(run_dirs: Sequence[PathLike]) -> list[ResultRow]:
    """Rows for each run directory: dense, then each ``decomposed-*.json`` (by name) and its fine-tuning."""
    rows: list[ResultRow] = []
    for run_dir in map(Path, run_dirs):
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{run_dir} is not a run directory: it has no config.json. A run directory is what "
                "`trp train --out DIR` writes (config.json, metrics.jsonl, model.safetensors, and "
                "decomposed-*.json after `trp decompose`)"
            )
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} is not a JSON object: the file is corrupt")
        summaries = [(p, _read_summary(p)) for p in sorted(run_dir.glob("decomposed-*.json"))]
        method = str(_cfg(config, "method"))
        model, data = str(_cfg(config, "model")), str(_cfg(config, "data"))
        base = dict(run_dir=str(run_dir), method=method, model=model, data=data)

        last = _read_last_metrics(run_dir / "metrics.jsonl")
        top1, top5 = _num(last.get("test_top1")), _num(last.get("test_top5"))
        if top1 is None:  # no metrics: fall back on the dense evaluation of a decomposition
            dense = next((s["dense"] for _, s in summaries if isinstance(s.get("dense"), dict)), {})
            top1, top5 = _acc(dense, "top1"), _acc(dense, "top5")
        before = next((s for _, s in summaries if _int(s.get("macs_before")) is not None), {})
        rows.append(ResultRow(
            **base, label=method_label(config), scheme=_cfg(config, "scheme") if method in ("trp", "nuclear") else None,
            criterion=None, finetuned=False, finetune_epochs=None, top1=top1, top5=top5,
            macs=_int(before.get("macs_before")), conv_macs=_int(before.get("conv_macs_before")),
            params=_int(before.get("params_before")), mac_reduction=1.0, conv_mac_reduction=1.0,
        ))

        for path, s in summaries:
            scheme = s.get("scheme")
            if not isinstance(scheme, str) or not s.get("criterion"):
                raise ValueError(f"{path} lacks \"scheme\" or \"criterion\": the summary is incomplete; decompose again")
            common = dict(
                base, label=method_label(config, scheme), scheme=scheme, criterion=new_criterion(str(s["criterion"])),
                macs=_int(s.get("macs_after")), conv_macs=_int(s.get("conv_macs_after")),
                params=_int(s.get("params_after")), mac_reduction=_num(_new_or_old(s, "mac_reduction", "speedup")),
                conv_mac_reduction=_num(_new_or_old(s, "conv_mac_reduction", "conv_speedup")),
            )
            rows.append(ResultRow(
                **common, finetuned=False, finetune_epochs=None,
                top1=_acc(s.get("decomposed"), "top1"), top5=_acc(s.get("decomposed"), "top5"),
            ))
            bn = s.get("bn_recalibrated")
            if isinstance(bn, dict):  # BatchNorm statistics re-estimated after the split (no training)
                rows.append(ResultRow(
                    **{**common, "criterion": f"{common['criterion']} + BN re-estimated"}, finetuned=False,
                    finetune_epochs=None, top1=_acc(bn, "top1"), top5=_acc(bn, "top5"),
                ))
            ft = s.get("finetune")
            if isinstance(ft, dict):
                rows.append(ResultRow(
                    **common, finetuned=True, finetune_epochs=_int(ft.get("epochs")),
                    top1=_acc(ft, "top1"), top5=_acc(ft, "top5"),
                ))
    for row in rows:
        _add_paper(row)
    return rows


# -- formatting ---------------------------------------------------------------------------
MISSING = "–"


def _fmt(value: Optional[float], spec: str, suffix: str = "", scale: float = 1.0) -> str:
    return MISSING if value is None else f"{value / scale:{spec}}{suffix}"


def _paper_cell(row: ResultRow) -> str:
    if row.paper_mac_reduction is None:
        return MISSING
    cell = f"{_fmt(row.paper_top1, '.2f')} @ {row.paper_mac_reduction:.2f}× ({row.paper_dataset}"
    return cell + (f"; {row.paper_note})" if row.paper_note else ")")


def _finetune_cell(row: ResultRow) -> str:
    if not row.finetuned:
        return "no"
    return "yes" if row.finetune_epochs is None else f"yes ({row.finetune_epochs} ep)"


MARKDOWN_HEADERS = (
    "label", "scheme", "criterion", "fine-tuned", "top-1", "top-5", "conv MACs", "all MACs",
    "MAC reduction (conv)", "MAC reduction (all)", "params", "paper (dataset)",
)


def markdown_table(rows: Sequence[ResultRow]) -> str:
    """A Markdown table of ``rows``: MACs and params in millions, accuracies in %, "–" where unknown."""
    return report.markdown_table(MARKDOWN_HEADERS, [
        (
            r.label, r.scheme or MISSING, r.criterion or MISSING, _finetune_cell(r),
            _fmt(r.top1, ".2f"), _fmt(r.top5, ".2f"),
            _fmt(r.conv_macs, ".2f", "M", 1e6), _fmt(r.macs, ".2f", "M", 1e6),
            _fmt(r.conv_mac_reduction, ".2f", "×"), _fmt(r.mac_reduction, ".2f", "×"),
            _fmt(r.params, ".3f", "M", 1e6), _paper_cell(r),
        )
        for r in rows
    ])


CSV_FIELDS = tuple(f.name for f in dataclasses.fields(ResultRow))


def write_csv(rows: Sequence[ResultRow], path: PathLike) -> Path:
    """Write ``rows`` (every :class:`ResultRow` field, empty where unknown) to ``path`` atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: "" if v is None else v for k, v in dataclasses.asdict(r).items()})
    return path


# -- sentences ----------------------------------------------------------------------------
def _points(diff: float) -> str:
    d = abs(diff)
    return f"{d:.1f}" if d >= 0.1 else f"{d:.2f}"


def tradeoff_notes(rows: Sequence[ResultRow], tolerance: float = 0.1) -> list[str]:
    """Sentences comparing each TRP/LoRITa decomposition with decomposed baselines at equal MAC reduction.

    A baseline decomposition (not fine-tuned) of the same model and data counts as equal
    MAC reduction when its conv MAC reduction is within ``±tolerance`` (relative) of the TRP row's.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 (a relative MAC reduction difference), got {tolerance}")

    def usable(r: ResultRow) -> bool:
        return r.decomposed and not r.finetuned and r.top1 is not None and r.conv_mac_reduction is not None

    candidates = [r for r in rows if usable(r) and r.method in ("trp", "lorita")]
    baselines = [r for r in rows if usable(r) and r.method == "baseline"]
    groups = {(r.model, r.data) for r in candidates}
    label_counts: dict[tuple[str, str, str], int] = {}
    for r in candidates + baselines:
        key = (r.model, r.data, r.label)
        label_counts[key] = label_counts.get(key, 0) + 1

    def name(r: ResultRow) -> str:
        unique = label_counts[(r.model, r.data, r.label)] == 1
        return r.label if unique else f"{r.label} [{r.criterion}]"

    def desc(r: ResultRow) -> str:
        return f"{name(r)} ({r.top1:.2f}% @ {r.conv_mac_reduction:.2f}×)"

    notes: list[str] = []
    for t in candidates:
        prefix = f"{t.model} on {t.data}: " if len(groups) > 1 else ""
        same = [b for b in baselines if (b.model, b.data) == (t.model, t.data)]
        near = [b for b in same if abs(b.conv_mac_reduction - t.conv_mac_reduction) <= tolerance * t.conv_mac_reduction]
        if not near:
            text = (
                f"{desc(t)}: no decomposed baseline lies within ±{tolerance:.0%} of its conv MAC reduction, "
                "so there is no comparison at equal MAC reduction"
            )
            if same:
                nearest = min(same, key=lambda b: abs(b.conv_mac_reduction - t.conv_mac_reduction))
                text += f" (the nearest is {desc(nearest)})"
            notes.append(prefix + text + ".")
            continue
        for b in sorted(near, key=lambda b: abs(b.conv_mac_reduction - t.conv_mac_reduction)):
            diff = t.top1 - b.top1
            if diff > 0:
                text = f"{desc(t)} beats {desc(b)} by {_points(diff)} points"
            elif diff == 0:
                text = f"{desc(t)} does NOT beat {desc(b)}: the accuracy is the same"
            else:
                text = f"{desc(t)} does NOT beat {desc(b)}: it is {_points(diff)} points lower"
            notes.append(prefix + text + ".")
    return notes


# -- seeds --------------------------------------------------------------------------------
SEED_HEADERS = ("model", "label", "criterion", "fine-tuned", "seeds", "top-1 mean", "top-1 per seed", "spread",
                "all-MAC reduction")


def _seed_of(run_dir: str) -> Optional[int]:
    config = _read_json(Path(run_dir) / "config.json")
    return _int(_cfg(config, "seed")) if isinstance(config, dict) else None


def seed_table(rows: Sequence[ResultRow]) -> Optional[str]:
    """Markdown table of the rows trained with several seeds: mean top-1, each seed's, and the spread.

    Rows are the same result when model, data, label, scheme, criterion and fine-tuning agree
    and only the run's seed differs; the spread is max − min. None when no row has two seeds.
    """
    groups: dict[tuple, list[tuple[int, ResultRow]]] = {}
    for r in rows:
        if r.top1 is None:
            continue
        key = (r.model, r.data, r.label, r.scheme, r.criterion, r.finetuned, r.finetune_epochs)
        groups.setdefault(key, []).append((_seed_of(r.run_dir) if r.run_dir else None, r))
    table = []
    for key, members in groups.items():
        seeds = sorted({s for s, _ in members if s is not None})
        if len(seeds) < 2:
            continue
        accs = [r.top1 for _, r in sorted(members, key=lambda m: (m[0] is None, m[0]))]
        reductions = [r.mac_reduction for _, r in members if r.mac_reduction is not None]
        table.append((
            key[0], key[2], key[4] or MISSING, _finetune_cell(members[0][1]), ", ".join(map(str, seeds)),
            f"{sum(accs) / len(accs):.2f}", ", ".join(f"{a:.2f}" for a in accs), f"{max(accs) - min(accs):.2f}",
            f"{min(reductions):.2f}–{max(reductions):.2f}×" if reductions else MISSING,
        ))
    return report.markdown_table(SEED_HEADERS, table) if table else None
