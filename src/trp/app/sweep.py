"""Criterion sweeps: decompose one model under many rank criteria and measure each result.

Each point of a sweep is the accuracy, MACs, parameters and MAC reductions of the model
decomposed under one criterion; together they trace the accuracy/MAC-reduction trade-off that
:func:`trp.app.plot.plot_tradeoff` draws. Sweeps save to and load from a small JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core.criteria import Criterion, Energy, Ratio, Value
from ..core.decompose import decompose_with_report
from ..core.layers import LayerSelector
from .loaders import evaluate
from ..deploy.io import atomic_write
from ..limits import read_json
from .report import summarize

__all__ = ["SweepPoint", "sweep", "default_criteria", "criterion_spec", "save_sweep", "load_sweep", "point_from_dict"]

PathLike = Union[str, os.PathLike]
SWEEP_KIND = "trp-sweep"
SWEEP_VERSION = 1
_RESERVED = ("kind", "version", "points")


@dataclass(frozen=True)
class SweepPoint:
    """The model decomposed under one criterion: accuracy (%), MACs, params, MAC reductions."""

    criterion: str
    top1: float
    top5: Optional[float]
    macs: int
    conv_macs: int
    params: int
    mac_reduction: float
    conv_mac_reduction: float


def criterion_spec(criterion: Any) -> str:
    """``criterion.spec()`` when it has one (e.g. ``energy:0.9``), else ``repr(criterion)``."""
    spec = getattr(criterion, "spec", None)
    return str(spec()) if callable(spec) else repr(criterion)


def sweep(
    model: nn.Module,
    scheme: str,
    criteria: Sequence[Union[Criterion, Any]],
    loader: DataLoader,
    input_shape: Sequence[int],
    device: Union[torch.device, str],
    on_point: Optional[Callable[[SweepPoint], None]] = None,
    on_error: Optional[Callable[[Any, ValueError], None]] = None,
    layers: LayerSelector = None,
    exclude: Sequence[str] = (),
) -> list[SweepPoint]:
    """Decompose ``model`` with ``scheme`` under each criterion and evaluate it on ``loader``.

    ``model`` should already be on ``device``; it is not modified. Criteria are passed to
    :func:`trp.decompose_with_report` as they are. ``on_point`` sees each point as it is
    measured. A criterion that ``decompose`` rejects with ValueError (say, a MAC reduction the
    model cannot reach) raises, unless ``on_error(criterion, error)`` is given: then that
    point is reported there and left out. Returns the points sorted by conv MAC reduction.
    """
    if not criteria:
        raise ValueError("no criteria to sweep: pass at least one, e.g. trp.app.sweep.default_criteria('energy')")
    device = torch.device(device)
    points: list[SweepPoint] = []
    for criterion in criteria:
        with warnings.catch_warnings():
            # decompose reports the skipped layers itself; only its "left dense" notice is muted.
            warnings.filterwarnings("ignore", message=r"trp\.decompose left \d+ selected layer", category=UserWarning)
            try:
                result = decompose_with_report(model, scheme, criterion, layers, input_shape, exclude=exclude)
            except ValueError as err:  # e.g. a target MAC reduction this model cannot reach
                if on_error is None:
                    raise
                on_error(criterion, err)
                continue
        decomposed = result.model.to(device)
        counts = summarize(model, decomposed, input_shape)
        metrics = evaluate(decomposed, loader, device)
        point = SweepPoint(
            criterion=criterion_spec(criterion), top1=float(metrics["top1"]),
            top5=float(metrics["top5"]) if "top5" in metrics else None,
            macs=counts.macs_after, conv_macs=counts.conv_macs_after, params=counts.params_after,
            mac_reduction=counts.mac_reduction, conv_mac_reduction=counts.conv_mac_reduction,
        )
        points.append(point)
        if on_point is not None:
            on_point(point)
    return sorted(points, key=lambda p: p.conv_mac_reduction)


_GRIDS = {
    # Ordered from light to strong compression, so MAC reductions grow along the list.
    "energy": lambda n: [Energy(round(1.0 - v, 4)) for v in _geomspace(0.001, 0.5, n)],
    "value": lambda n: [Value(round(v, 4)) for v in _geomspace(0.01, 0.5, n)],
    "ratio": lambda n: [Ratio(round(v, 4)) for v in _geomspace(0.8, 0.05, n)],
}


def _geomspace(start: float, stop: float, n: int) -> list[float]:
    if n == 1:
        return [start]
    a, b = math.log(start), math.log(stop)
    return [math.exp(a + (b - a) * i / (n - 1)) for i in range(n)]


def default_criteria(kind: str, n: int = 8) -> list[Criterion]:
    """``n`` criteria of one kind spaced so the MAC reductions spread, from light to strong compression.

    ``energy``: 0.999 down to 0.5 (1 − a geometric grid); ``value``: thresholds 0.01 to 0.5;
    ``ratio``: kept fractions 0.8 down to 0.05 (both geometric).
    """
    if kind not in _GRIDS:
        raise ValueError(f"unknown criterion kind {kind!r} for a sweep grid; choose one of {', '.join(_GRIDS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (the number of criteria), got {n!r}")
    grid = _GRIDS[kind](n)
    unique = list({c.spec(): c for c in grid}.values())  # rounding can merge neighbours
    return unique


MAC_GRID = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)  # the MAC reductions of a whole-model sweep


def sweep_criteria(kind: str, points: int) -> list[Any]:
    """The criteria of ``trp sweep --kind KIND``: whole-model targets over :data:`MAC_GRID` (``macs``: TargetMACs,
    ``global``: Global), else a grid of that criterion. ``speedup`` is the deprecated name of ``macs``."""
    from ..core._util import warn_deprecated
    from ..core.allocation import Global, TargetMACs

    if kind == "speedup":
        warn_deprecated("trp sweep --kind speedup", "--kind macs")
        kind = "macs"
    if kind == "macs":
        return [TargetMACs(x) for x in MAC_GRID]
    if kind == "global":
        return [Global(mac_reduction=x) for x in MAC_GRID]
    return default_criteria(kind, points)


def save_sweep(points: Sequence[SweepPoint], path: PathLike, meta: Optional[dict] = None) -> Path:
    """Write ``{"kind": "trp-sweep", "version": 1, **meta, "points": [...]}`` to ``path`` atomically."""
    meta = dict(meta or {})
    clash = [k for k in _RESERVED if k in meta]
    if clash:
        raise ValueError(f"meta must not contain the reserved key(s) {', '.join(clash)}; rename them")
    doc = {"kind": SWEEP_KIND, "version": SWEEP_VERSION, **meta, "points": [dataclasses.asdict(p) for p in points]}
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return path


# Keys of sweep files written when a MAC reduction was called a speedup.
_OLD_KEYS = {"speedup": "mac_reduction", "conv_speedup": "conv_mac_reduction"}


def point_from_dict(d: dict) -> SweepPoint:
    """A :class:`SweepPoint` from its JSON form (also as written before ``speedup`` became ``mac_reduction``)."""
    names = {f.name for f in dataclasses.fields(SweepPoint)}
    d = {_OLD_KEYS.get(k, k): v for k, v in d.items()}
    return SweepPoint(**{k: v for k, v in d.items() if k in names})


def load_sweep(path: PathLike) -> tuple[dict, list[SweepPoint]]:
    """The metadata and points of a sweep file written by :func:`save_sweep`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep file at {path}: check the path (`trp sweep` writes one)")
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("kind") != SWEEP_KIND:
        raise ValueError(f"{path} is not a trp sweep file (no \"kind\": \"{SWEEP_KIND}\")")
    version = doc.get("version")
    if not isinstance(version, int) or version > SWEEP_VERSION:
        raise ValueError(f"{path} has sweep version {version!r}; this trp reads version {SWEEP_VERSION}: upgrade trp")
    raw = doc.get("points")
    if not isinstance(raw, list):
        raise ValueError(f"{path} has no list of \"points\": the sweep file is corrupt; run the sweep again")
    points = []
    for i, p in enumerate(raw):
        try:
            if not isinstance(p, dict):
                raise TypeError("not a JSON object")
            points.append(point_from_dict(p))
        except TypeError as err:
            raise ValueError(f"{path}: point {i} is malformed ({err}); run the sweep again") from err
    meta = {k: v for k, v in doc.items() if k not in _RESERVED}
    return meta, points
