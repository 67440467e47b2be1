"""``trp sweep`` and ``trp table``: many runs compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from ..config import parse_layers, parse_patterns
from .common import EXCLUDE_HELP, LAYERS_HELP, SCHEMES, console, deprecated_option, engine, workflow


@click.command(name="sweep")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--scheme", type=click.Choice(sorted(SCHEMES)), default=None, help="[default: each run's scheme]")
@click.option("--kind", type=click.Choice(["macs", "global", "energy", "value", "ratio", "speedup"]), default="macs",
              show_default=True, help="macs/global: whole-model criteria (TargetMACs, Global) at 1.5x..6x MAC reduction; "
              "else a grid of that criterion (speedup: deprecated name of macs).")
@click.option("--points", type=int, default=8, show_default=True, help="Grid size for energy/value/ratio.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Save a MAC-reduction-vs-top-1 PNG of all runs here.")
@click.option("--title", default="", help="Plot title.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder (CIFAR, ImageNet).")
@click.option("--layers", default=None, help=LAYERS_HELP + " [default: each run's selection]")
@click.option("--exclude", default=None, help=EXCLUDE_HELP + " [default: each run's]")
@click.option("--device", default="auto", show_default=True)
def sweep_cmd(run_dirs: tuple[Path, ...], scheme: Optional[str], kind: str, points: int, plot: Optional[Path],
              title: str, data_dir: Optional[str], layers: Optional[str], exclude: Optional[str], device: str) -> None:
    """Decompose each run under a range of criteria; save sweep-<scheme>-<kind>.json per run (and a plot)."""
    from ..plot import plot_tradeoff
    from ..results import run_label
    from ..sweep import save_sweep, sweep, sweep_criteria

    if kind == "speedup":
        deprecated_option("--kind speedup", "--kind macs")
        kind = "macs"
    curves: dict[str, Any] = {}
    dev = engine.resolve_device(device)
    criteria = sweep_criteria(kind, points)
    for run_dir in run_dirs:
        model, spec, config = workflow.load_source(run_dir, dev)
        sch = scheme or (config.scheme if config else "channel")
        loader = workflow.test_loader(spec, data_dir or (config.data_dir if config else None), config.seed if config else 0)
        label = f"{run_label(engine.load_config(run_dir))} ({sch})"
        console.print(f"sweeping {run_dir}: {label}, {len(criteria)} criteria")
        run_layers = parse_layers(layers) if layers is not None else (config.layers if config else None)
        run_exclude = parse_patterns(exclude) if exclude is not None else (config.exclude if config else [])
        pts = sweep(model, sch, criteria, loader, spec.input_shape, dev, layers=run_layers, exclude=run_exclude,
                    on_point=lambda p: console.print(f"  {p.criterion:>18}  MAC reduction {p.conv_mac_reduction:5.2f}x conv, "
                                                     f"{p.mac_reduction:5.2f}x all  top-1 {p.top1:6.2f}%"),
                    on_error=lambda c, e: console.print(f"  {c.spec():>18}  skipped: {e}"))
        if not pts:
            raise ValueError(f"no criterion of the sweep could be applied to {run_dir}")
        path = save_sweep(pts, run_dir / f"sweep-{sch}-{kind}.json",
                          meta={"source": str(run_dir), "label": label, "scheme": sch, "criterion_kind": kind})
        console.print(f"  saved {path}")
        curves[label] = pts
    if plot:
        plot_tradeoff(curves, plot, title=title)
        console.print(f"plot: {plot}")


@click.command(name="table")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write OUT.md and OUT.csv (a path without suffix).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Also plot every sweep-*.json found in the runs.")
@click.option("--title", default="", help="Plot title.")
def table_cmd(run_dirs: tuple[Path, ...], out: Optional[Path], plot: Optional[Path], title: str) -> None:
    """Collect run directories into one comparison table, with the paper's numbers beside each row."""
    from ..plot import plot_tradeoff
    from ..results import collect, markdown_table, seed_table, sweep_curves, tradeoff_notes, write_table

    rows = collect(run_dirs)
    text = markdown_table(rows)
    notes = tradeoff_notes(rows)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    for note in notes:
        console.print(f"- {note}", markup=False, highlight=False)
    seeds = seed_table(rows)
    if seeds:
        console.print("\nRows trained with several seeds:\n" + seeds, markup=False, highlight=False, soft_wrap=True)
    if out:
        md = write_table(rows, out, text, notes, seeds)
        console.print(f"wrote {md} and {out.with_suffix('.csv')}")
    if plot:
        curves, markers = sweep_curves(run_dirs, rows)
        plot_tradeoff(curves, plot, title=title, markers=markers)
        console.print(f"plot: {plot}")
