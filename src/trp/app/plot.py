"""Accuracy / MAC reduction trade-off plots (PNG), drawn without pyplot's global state."""

from __future__ import annotations

import os
from itertools import cycle
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..deploy.io import atomic_write

__all__ = ["plot_tradeoff"]

PathLike = Union[str, os.PathLike]
_X_LABELS = {"conv_mac_reduction": "MAC reduction, convs (×)", "mac_reduction": "MAC reduction, all layers (×)"}
_MARKERS = ("*", "D", "P", "X", "s", "^", "v", "h")


def plot_tradeoff(
    curves: Mapping[str, Sequence[Any]],
    path: PathLike,
    title: str = "",
    x: str = "conv_mac_reduction",
    reference: Optional[float] = None,
    markers: Optional[Mapping[str, tuple[float, float]]] = None,
) -> Path:
    """Draw top-1 accuracy against MAC reduction and save it as a PNG at ``path`` (atomically).

    ``curves`` maps a legend label to points with ``top1`` and an ``x`` attribute
    (:class:`trp.app.sweep.SweepPoint` or :class:`trp.app.results.ResultRow`; points lacking
    either are left out). ``reference`` draws a dashed line at that accuracy (the dense
    model); ``markers`` adds single labelled points ``(MAC reduction, top1)``, e.g. paper numbers.
    """
    from matplotlib.figure import Figure

    if x not in _X_LABELS:
        raise ValueError(f"x must be one of {', '.join(_X_LABELS)}, got {x!r}")
    markers = dict(markers or {})
    if not any(curves.values()) and not markers:
        raise ValueError("nothing to plot: every curve is empty and no markers were given")

    fig = Figure(figsize=(9.0, 4.8), dpi=150)
    ax = fig.add_subplot()
    for label, points in curves.items():
        xy = sorted(
            (float(getattr(p, x)), float(p.top1)) for p in points
            if getattr(p, x, None) is not None and getattr(p, "top1", None) is not None
        )
        if xy:
            ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", markersize=4, linewidth=1.5, label=label)
    if reference is not None:
        ax.axhline(reference, color="0.3", linestyle="--", linewidth=1.0, label=f"dense ({reference:.2f}%)")
    for (label, (mx, my)), shape in zip(markers.items(), cycle(_MARKERS)):
        ax.plot([mx], [my], linestyle="none", marker=shape, markersize=10, markeredgecolor="black", label=label)
    ax.set_xlabel(_X_LABELS[x])
    ax.set_ylabel("top-1 accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: curves stay visible
    fig.tight_layout()

    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path
