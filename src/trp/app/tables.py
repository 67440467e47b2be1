"""What the command line prints: its tables and lines, built from results (rich tables, no torch import).

:mod:`trp.app.cli` parses arguments and prints what these functions return.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from rich.table import Table

if TYPE_CHECKING:
    from ..core.decompose import Decomposition
    from .report import CompressionSummary

__all__ = ["epoch_line", "run_table", "summary_table", "layer_table", "result_lines", "bench_table", "bench_note",
           "evaluate_table", "profile_table", "skipped_lines"]


def epoch_line(row: dict[str, Any]) -> str:
    """One line per trained epoch (or the evaluation of a run with no training)."""
    if row["epoch"] == 0:
        return f"no training (epochs 0): test {row['test_top1']:.2f}% (top-5 {row['test_top5']:.2f}%)"
    rank = f"  mean rank {row['mean_rank']:.1f}" if "mean_rank" in row else ""
    return (f"epoch {row['epoch']:>3}  lr {row['lr']:.4g}  loss {row['train_loss']:.4f}  "
            f"train {row['train_top1']:.2f}%  test {row['test_top1']:.2f}%  "
            f"{row['epoch_seconds']:.1f}s (TRP {row['trp_seconds']:.2f}s){rank}")


def run_table(run_dir: Path, config: Any, trainer: Any, macs: int, params: int) -> Table:
    """The summary of a finished training run."""
    table = Table(title=f"run {run_dir}")
    for col in ("method", "scheme", "test top-1", "MACs", "params", "train time", "TRP time"):
        table.add_column(col)
    last = trainer.last_row
    table.add_row(
        config.method + (f" → {config.target_criterion}" if config.target_criterion else ""),
        config.scheme if config.method != "baseline" else "-",
        f"{last['test_top1']:.2f}%", f"{macs / 1e6:.2f}M", f"{params:,}", f"{trainer.train_seconds:.1f}s",
        f"{trainer.trp_seconds:.1f}s ({100 * trainer.trp_seconds / max(trainer.train_seconds, 1e-9):.1f}%)",
    )
    return table


def summary_table(summary: CompressionSummary, before: Optional[float], after: Optional[float]) -> Table:
    table = Table(title="decomposition")
    for col in ("", "before", "after", "reduction"):
        table.add_column(col, justify="right")
    table.add_row("conv MACs", f"{summary.conv_macs_before:,}", f"{summary.conv_macs_after:,}",
                  f"{summary.conv_mac_reduction:.2f}x")
    table.add_row("all MACs", f"{summary.macs_before:,}", f"{summary.macs_after:,}", f"{summary.mac_reduction:.2f}x")
    if summary.layer_macs_before is not None and summary.layer_macs_after is not None:
        table.add_row("  in layers trp can split", f"{summary.layer_macs_before:,}", f"{summary.layer_macs_after:,}", "")
        table.add_row("  everything else", f"{summary.macs_before - summary.layer_macs_before:,}",
                      f"{summary.macs_after - summary.layer_macs_after:,}", "")
    table.add_row("params", f"{summary.params_before:,}", f"{summary.params_after:,}", f"{summary.param_ratio:.2f}x")
    if before is not None and after is not None:
        table.add_row("top-1", f"{before:.2f}%", f"{after:.2f}%", f"{after - before:+.2f} pt")
    return table


def layer_table(report: Decomposition) -> Table:
    table = Table(title="layers")
    for col in ("layer", "scheme", "rank", "MACs before", "MACs after", "status"):
        table.add_column(col, justify="right" if col.startswith(("rank", "MACs")) else "left")
    for r in report.layers:
        rank = f"{r.rank}/{r.max_rank}" if r.rank is not None else "-"
        table.add_row(
            r.name, r.scheme, rank,
            f"{r.macs_before:,}" if r.macs_before is not None else "-",
            f"{r.macs_after:,}" if r.macs_after is not None else "-",
            r.status + (f" ({r.reason})" if r.reason else ""),
        )
    return table


def result_lines(result: Any) -> list[Any]:
    """The tables and lines of one decomposition (a :class:`trp.app.workflow.DecomposeResult`)."""
    rec = result.record
    before = rec["dense"]["top1"] if rec["dense"] else None
    after = rec["decomposed"]["top1"] if rec["decomposed"] else None
    out: list[Any] = [layer_table(result.report), summary_table(result.summary, before, after)]
    if rec.get("ranks_from"):
        out.append(f"criterion: {rec['criterion']} (the ranks trained toward, from {rec['ranks_from']})")
    out += [f"note: {note}" for note in result.report.notes]
    fidelity = result.report.fidelity
    if fidelity is not None:
        out.append(("[bold red]WARNING: [/bold red]" if not fidelity.ok else "")
                   + fidelity.describe().replace("fidelity to", "fidelity of the split model to")
                   + ("" if fidelity.ok else "; try a smaller reduction, more --calibrate images, or --finetune"
                      if rec.get("calibrate") else "; try --calibrate N (a data-aware split), a smaller "
                      "reduction, or --finetune"))
    if before is not None and after is not None and after < before / 2 and (fidelity is None or fidelity.ok):
        out.append(f"[bold red]WARNING:[/bold red] the split model lost most of its accuracy ({after:.2f}% against "
                   f"{before:.2f}%): try --calibrate N (a data-aware split), a smaller reduction, or --finetune")
    if rec.get("bn_recalibrated"):
        bn = rec["bn_recalibrated"]
        out.append(f"BatchNorm statistics re-estimated on {bn['batches']} training batches: top-1 {bn['top1']:.2f}% "
                   "(the saved compact model has them)")
    if rec["finetune"]:
        ft = rec["finetune"]
        out.append(f"fine-tuned {ft['epochs']} epoch(s) at lr {ft['lr']:g}: top-1 {ft['top1']:.2f}% ({ft['run_dir']})")
    out.append(f"compact model: {result.model_path}  summary: {result.summary_path}")
    return out


def bench_table(record: dict[str, Any], title: str) -> Table:
    """The measured speedups of a split model against its dense one (a :func:`trp.app.bench.bench_models` record)."""
    table = Table(title=title)
    for col in ("MAC reduction", "runtime", "batch", "dense ms", "split ms", "measured speedup", "IQR", "fastest runs"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for r in record["rows"]:
        table.add_row(f"{record['mac_reduction']:.2f}x", r["runtime"], str(r["batch"]), f"{r['dense_ms']:.3f}",
                      f"{r['compact_ms']:.3f}", f"{r['speedup']:.2f}x", f"{r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}",
                      f"{r['speedup_of_minima']:.2f}x")
    return table


def bench_note(record: dict[str, Any]) -> str:
    """How the bench table was measured."""
    return (f"{record['device']}; {record['rows'][0]['threads'] if record['rows'] else '-'} threads, "
            f"{record['rows'][0]['repeats'] if record['rows'] else '-'} timed runs each, random inputs, "
            "BatchNorm folded in both models; measured speedup: median of per-pair time ratios (IQR: their "
            "quartiles); fastest runs: fastest dense / fastest split run")


def evaluate_table(path: Path, metrics: dict[str, float], macs: int, conv_macs: int, params: int,
                   seconds: float) -> Table:
    """The scores of ``trp evaluate``."""
    table = Table(title=str(path))
    for col in ("top-1", "top-5", "loss", "MACs", "conv MACs", "params", "eval time"):
        table.add_column(col, justify="right")
    table.add_row(f"{metrics['top1']:.2f}%", f"{metrics['top5']:.2f}%", f"{metrics['loss']:.4f}", f"{macs:,}",
                  f"{conv_macs:,}", f"{params:,}", f"{seconds:.2f}s")
    return table


def profile_table(title: str, rows: list[list[str]]) -> Table:
    """The per-layer latency table of ``trp profile``."""
    shown = Table(title=title)
    for col in ("layer", "input", "dense ms", "fastest split rank", "split ms", "layer speedup"):
        shown.add_column(col, justify="left" if col in ("layer", "input") else "right")
    for row in rows:
        shown.add_row(*row)
    return shown


def skipped_lines(skipped: list[tuple[str, str]]) -> str:
    """The corrupt images left out (the first ten listed)."""
    listed = "\n".join(f"  {p} ({reason})" for p, reason in skipped[:10])
    more = f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    return f"skipped {len(skipped)} corrupt image(s) (--skip-corrupt):\n{listed}{more}"
