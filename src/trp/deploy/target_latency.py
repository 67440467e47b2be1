"""``TargetLatency(x)``: ranks chosen from measured layer latencies so the model runs ``x`` times faster.

The whole-model counterpart of :class:`trp.TargetMACs` for time instead of MACs. From a
:class:`~trp.deploy.profile.LatencyTable` (measured by :func:`trp.profile_layers`, or here
when none is given) each layer has options: dense, or split at a measured rank whose split
is measured faster than the dense layer and has fewer MACs. Starting from every layer's
fastest option, options are upgraded best spectral energy per millisecond first (along
each layer's upper convex hull of energy against time) while the predicted model time stays
within ``T_model / x``; a layer whose split is never faster stays dense. Per-layer times do
not add up to the model's (a layer timed alone misses the runtime's fusions and pays for its
own input and output; on ResNet-18 in ONNX Runtime the layers alone sum to 1.5x the whole
model), so the model's time is read as affine in the summed layer times: ``rest + scale *
sum``. Without measurement that line is guessed from the table; by default (``calibrate``)
it is fitted through the dense model and the fastest plan, both measured, and the internal
target is then adjusted a few times until the measured speedup lands within ``tolerance``
of ``x``.

Training toward it (:class:`trp.TRP`) calibrates once, at the first allocation, and then fixes
that calibration (:meth:`TargetLatency.fix_calibration`: the fitted line and the internal target):
every later allocation, the final split's included, plans with it and measures nothing, so the
ranks trained toward are the ranks split at.

``latency:X[:RUNTIME[:BATCH]]`` is registered as a ``--criterion`` string.

Why this module is a little over 450 lines: :class:`TargetLatency` is one criterion whose plan,
measurement and calibration share the profiled table and the fitted time model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..core._util import check_int, check_number, seeded_inputs
from ..core.allocation import LayerSpectrum, WholeModelCriterion, check_round_to, layer_worth, pooled_spectrum
from ..core.criteria import register_criterion
from ..core.decompose import apply_recipe
from ..core.inputs import ModelInputs, at_batch
from ..core.schemes import LowRank
from .fold import fold_batchnorm
from .latency import MAX_BATCH, RUNTIMES, STATISTICS, Inputs, Timer, compare_latency
from .profile import LatencyTable, profile_layers

__all__ = ["TargetLatency", "Calibration"]

_log = logging.getLogger("trp.target_latency")


@dataclass
class Calibration:
    """One calibration step: the internal target used, and the speedup then measured (the first, 1x, is the dense model)."""

    target: float
    measured: float
    ranks: dict[str, int]


@dataclass
class _Option:
    rank: Optional[int]  # None: dense
    time: float  # seconds, the runtime's call overhead removed
    energy: float


def _inference_form(model: nn.Module) -> nn.Module:
    """``model`` with BatchNorm folded, as it is deployed and timed (unfoldable BatchNorms stay, silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fold_batchnorm(model)


def _same_structure(model: nn.Module, scheme: str, ranks: dict[str, int]) -> nn.Module:
    """A copy of ``model`` with the layers in ``ranks`` split (random factors: timing only, no SVD)."""
    compact = apply_recipe(copy.deepcopy(model), {name: {"scheme": scheme, "rank": r} for name, r in ranks.items()})
    with torch.no_grad():
        for m in compact.modules():
            if isinstance(m, LowRank):
                for p in m.parameters():
                    p.normal_(0.0, 0.05)
    return compact


def _nondecreasing(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators): timing noise removed."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    out: list[float] = []
    for total, count in blocks:
        out += [total / count] * int(count)
    return out


def _hull(options: list[_Option]) -> list[_Option]:
    """The options on the upper convex hull of energy against time, fastest first."""
    options = sorted(options, key=lambda o: (o.time, -o.energy))
    kept: list[_Option] = []
    for o in options:  # drop options dominated by a faster one with as much energy
        if kept and o.energy <= kept[-1].energy:
            continue
        kept.append(o)
    hull: list[_Option] = []
    for o in kept:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or under the segment a->o: remove it
            if (b.energy - a.energy) * (o.time - a.time) <= (o.energy - a.energy) * (b.time - a.time):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


class TargetLatency(WholeModelCriterion):
    """Ranks whose split model is measured ``x`` times faster than the dense one, keeping the most energy.

    ``table`` is a :class:`~trp.deploy.profile.LatencyTable` of the model (else the model is
    profiled in ``runtime`` at ``batch_size`` when :func:`trp.decompose` runs, cached on disk).
    ``calibrate`` is the number of measure-and-adjust rounds (0: trust the table);
    ``round_to=k`` restricts ranks to multiples of ``k`` (None: the profile's rank grid).
    ``monotone`` (default) reads each layer's split times as non-decreasing in the rank (a
    least-squares fit), which removes timing noise. ``statistic`` reads timed runs by their
    ``"median"`` (per-pair ratios for the whole model), or by the fastest run (``"min"``) on a
    machine busy with other work. An unreachable ``x`` raises ValueError stating the best
    reachable speedup. ``progress(total, description)`` (trp's progress mechanism: it returns
    ``advance(n=1)``) sees each layer profiled and each calibration round; both are also logged at
    INFO level (loggers ``trp.profile`` and ``trp.target_latency``).
    """

    needs_input_shape = True

    def __init__(
        self,
        x: float,
        table: Optional[LatencyTable] = None,
        runtime: str = "onnxruntime",
        batch_size: int = 1,
        threads: Optional[int] = None,
        round_to: Optional[int] = None,
        calibrate: int = 5,
        tolerance: float = 0.05,
        repeats: int = 20,
        warmup: int = 3,
        timer: Optional[Timer] = None,
        monotone: bool = True,
        statistic: str = "median",
        progress: Optional[Callable[[int, str], Callable[..., Any]]] = None,
    ) -> None:
        check_number("TargetLatency: x", x, 1.0, low_open=True, high_open=True, what="a number > 1 (a measured speedup)")
        if runtime not in RUNTIMES:
            raise ValueError(f"TargetLatency: unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"TargetLatency: batch_size must be an integer from 1 to {MAX_BATCH}, got {batch_size!r}")
        if (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance)
                or not 0 < tolerance < 1):
            raise ValueError(f"TargetLatency: tolerance must be a number in (0, 1) (a relative error of the "
                             f"measured speedup, e.g. 0.05), got {tolerance!r}")
        if table is not None and (table.runtime, table.batch_size) != (runtime, batch_size):
            raise ValueError(
                f"TargetLatency: the table was measured in {table.runtime} at batch {table.batch_size}, but "
                f"runtime={runtime!r}, batch_size={batch_size} were asked: give the table's setting or profile again"
            )
        check_int("TargetLatency: calibrate", calibrate, 0, what="an integer >= 0")
        self.x = float(x)
        self.table = table
        self._given_table = table is not None
        self.runtime = runtime
        self.batch_size = batch_size
        self.threads = threads
        self.round_to = None if round_to is None else check_round_to(round_to)
        self.calibrate = calibrate
        self.tolerance = tolerance
        self.repeats = repeats
        self.warmup = warmup
        self.timer = timer
        self.monotone = monotone
        if statistic not in STATISTICS:
            raise ValueError(f"TargetLatency: unknown statistic {statistic!r}: choose one of {', '.join(STATISTICS)}")
        self.statistic = statistic
        self.progress = progress
        self.history: list[Calibration] = []
        self._model: Optional[tuple[nn.Module, str, Any]] = None
        self._timed: Optional[Inputs] = None  # what the model is timed on (prepare)
        self._folded: Optional[nn.Module] = None
        self._affine: Optional[tuple[float, float]] = None  # (scale, rest): see _time_model
        self._last: Optional[dict[str, float]] = None  # the time model and internal target last planned with
        self._fixed: Optional[dict[str, float]] = None  # set by fix_calibration: plan with it, measure nothing

    # -- the model being decomposed ---------------------------------------------------
    def _timing_inputs(self, model: nn.Module, input_shape: Optional[Sequence[int]],
                       example_inputs: Optional[ModelInputs]) -> Inputs:
        """What the model is timed on, at ``batch_size``: the example inputs repeated (or cut) along the batch, else
        seeded random values of ``input_shape`` (a tensor, a tuple, or a dict of keyword tensors, as given)."""
        if example_inputs is None:
            if input_shape is None:
                raise ValueError(f"{self!r} measures the model: pass input_shape=(1, C, H, W) or example_inputs "
                                 "to trp.decompose")
            return seeded_inputs(model, (self.batch_size, *input_shape[1:]))
        return at_batch(example_inputs, self.batch_size).simplest()

    def prepare(self, model: nn.Module, scheme: str, layers: Any, input_shape: Optional[Sequence[int]],
                example_inputs: Optional[ModelInputs] = None) -> None:
        self._timed = self._timing_inputs(model, input_shape, example_inputs)
        self._model = (model, scheme, layers)
        if self._given_table and self.table is not None and self.table.scheme != scheme:
            raise ValueError(f"TargetLatency: the table times the {self.table.scheme} split, but the {scheme} scheme "
                             "was asked: profile the model with that scheme")
        self._folded = _inference_form(model)
        # profiled for each model it is used on (from the disk cache when known)
        if not self._given_table and not (self._fixed is not None and self.table is not None):
            self.table = profile_layers(self._folded, self._timed, scheme, self.runtime,
                                        layers=layers,
                                        threads=self.threads, repeats=self.repeats, warmup=self.warmup,
                                        timer=self.timer, statistic=self.statistic, progress=self.progress)

    # -- allocation ---------------------------------------------------------------------
    def _options(self, layer: LayerSpectrum, table: LatencyTable) -> list[_Option]:
        if layer.name not in table.layers:
            raise ValueError(f"TargetLatency: the latency table has no layer {layer.name!r}: profile this model "
                             "with the same layer selection (trp.profile_layers(..., layers=...))")
        lat = table.layers[layer.name]
        if self.monotone:
            lat = dataclasses.replace(lat, split=_nondecreasing([t for _, t in sorted(zip(lat.ranks, lat.split))]),
                                      ranks=sorted(lat.ranks))
        if layer.scale is None:  # shares of the layer's energy
            energy = pooled_spectrum(layer.sigma).square()
            total = float(energy.sum())
            cum = (energy.cumsum(0) / total).tolist() if total > 0 else [1.0] * len(energy)
            full = 1.0
        else:  # calibrated: errors comparable across layers (trp.core.calibration)
            worth = layer_worth(layer)
            total = float(worth.sum())
            cum = worth.cumsum(0).tolist() if total > 0 else [1.0] * len(worth)
            full = total if total > 0 else 1.0
        dense = lat.dense - lat.overhead
        options = [_Option(None, dense, full)]
        if self.round_to is None:
            ranks = [(r, t) for r, t in zip(lat.ranks, lat.split)]
        else:
            k, top = self.round_to, max(lat.ranks)
            ranks = [(r, lat.split_time(r)) for r in range(k, top + 1, k)]
        for rank, t in ranks:
            if rank <= layer.max_rank and layer.macs(rank) < layer.dense_macs and t - lat.overhead < dense:
                options.append(_Option(rank, t - lat.overhead, cum[rank - 1]))
        return _hull(options)

    def _time_model(self, layers: Sequence[LayerSpectrum]) -> tuple[float, float]:
        """``(scale, rest)`` of the affine model ``T_model = rest + scale * sum(layer times)``.

        Fitted on two measured anchors when calibrating (:meth:`allocate`); from the table alone
        otherwise: layers timed alone often take longer than inside the model (a fused runtime
        graph), so when their sum exceeds the model's time they are scaled down to it.
        """
        if self._affine is not None:
            return self._affine
        table = self.table
        assert table is not None
        dense_sum = sum(table.layers[layer.name].dense - table.layers[layer.name].overhead for layer in layers)
        if dense_sum <= 0:
            return 1.0, table.model
        if dense_sum <= table.model:
            return 1.0, table.model - dense_sum
        return table.model / dense_sum, 0.0

    def plan(self, layers: Sequence[LayerSpectrum], x: Optional[float]) -> tuple[dict[str, int], float]:
        """Ranks (dense layers left out) predicted to run within ``T_model / x``, and the predicted speedup.

        ``x=None`` gives the fastest plan.
        """
        table = self.table
        if table is None:
            raise ValueError("TargetLatency needs a latency table: pass table=trp.profile_layers(...), or use it "
                             "through trp.decompose(..., input_shape=...) so that it profiles the model")
        hulls = [self._options(layer, table) for layer in layers]
        scale, rest = self._time_model(layers)
        chosen = [0] * len(hulls)
        used = sum(h[0].time for h in hulls)

        def speedup(layer_time: float) -> float:
            return table.model / max(rest + scale * layer_time, 1e-12 * table.model)

        if x is None:
            return self._ranks(layers, hulls, chosen), speedup(used)
        allowed = (table.model / x - rest) / scale
        if used > allowed * (1 + 1e-9):
            raise self._unreachable(speedup(used), "predicted from the latency table")
        segments = []
        for li, h in enumerate(hulls):
            for j in range(1, len(h)):
                dt, de = h[j].time - h[j - 1].time, h[j].energy - h[j - 1].energy
                segments.append((-de / max(dt, 1e-15), j, li))
        segments.sort()
        closed: set[int] = set()
        for _, j, li in segments:
            if li in closed:
                continue
            step = hulls[li][j].time - hulls[li][chosen[li]].time
            if used + step <= allowed:
                chosen[li], used = j, used + step
            else:
                closed.add(li)
        return self._ranks(layers, hulls, chosen), speedup(used)

    @staticmethod
    def _ranks(layers: Sequence[LayerSpectrum], hulls: list[list[_Option]], chosen: list[int]) -> dict[str, int]:
        return {layer.name: h[c].rank for layer, h, c in zip(layers, hulls, chosen) if h[c].rank is not None}

    def _layer_time(self, layers: Sequence[LayerSpectrum], ranks: dict[str, int]) -> float:
        """The table's summed layer seconds (overhead removed) of a plan, as :meth:`plan` adds them up."""
        assert self.table is not None
        total = 0.0
        for layer in layers:
            if layer.name not in ranks:
                lat = self.table.layers[layer.name]
                total += lat.dense - lat.overhead
            else:
                total += next(o.time for o in self._options(layer, self.table) if o.rank == ranks[layer.name])
        return total

    # -- a calibration fixed for training (trp.TRP) ---------------------------------------
    def calibration(self) -> Optional[dict[str, float]]:
        """What the last :meth:`allocate` planned with: ``{"target", "scale", "rest"}`` (the internal
        target, NaN for the fastest plan, and the time model ``rest + scale * sum``); None before any."""
        return None if self._last is None else dict(self._last)

    def fix_calibration(self, state: Optional[dict[str, float]]) -> None:
        """Plan every later :meth:`allocate` with ``state`` (from :meth:`calibration`), measuring nothing;
        None: calibrate again at each allocation. :class:`trp.TRP` fixes it after its first allocation."""
        self._fixed = None if state is None else {k: float(state[k]) for k in ("target", "scale", "rest")}

    def _remember(self, target: Optional[float]) -> None:
        assert self._affine is not None
        self._last = {"target": math.nan if target is None else float(target),
                      "scale": float(self._affine[0]), "rest": float(self._affine[1])}

    def allocate(self, layers: Sequence[LayerSpectrum], fixed_macs: int) -> dict[str, int]:
        if self._fixed is not None:
            self._affine = (self._fixed["scale"], self._fixed["rest"])
            target = None if math.isnan(self._fixed["target"]) else self._fixed["target"]
            self._last = dict(self._fixed)
            return self.plan(layers, target)[0]
        self.history = []
        self._affine = None
        if self._model is None or self.calibrate == 0:
            fastest = self._reachable(layers)
            if fastest < self.x:
                raise self._unreachable(fastest, "predicted from the latency table")
            self._affine = self._time_model(layers)
            self._remember(self.x)
            return self.plan(layers, self.x)[0]
        model, scheme, _ = self._model
        inputs = self._timed

        rounds = self.calibrate + 1
        advance = self.progress(rounds, "calibrating (measured speedup)") if self.progress is not None else None

        def measure(ranks: dict[str, int], target: float) -> Calibration:
            compact = _inference_form(_same_structure(model, scheme, ranks))
            speedup = compare_latency(self._folded, compact, inputs, self.runtime, self.threads, self.repeats,
                                      self.warmup, self.timer).speedup_by(self.statistic)
            step = Calibration(target, speedup, dict(ranks))
            self.history.append(step)
            _log.info("calibration round %d of at most %d: measured %.2fx (target %.2fx)", len(self.history) - 1,
                      rounds, speedup, self.x)
            if advance is not None:
                advance(1)
            return step

        # Two anchors: the dense model (1x, no measurement needed) and the fastest plan, measured. Per-layer
        # times do not add up to the model's (a layer timed alone is not fused with its neighbours), so the
        # model's time is fitted as affine in the summed layer times through these two points.
        self.history.append(Calibration(1.0, 1.0, {}))
        fast_ranks, _ = self.plan(layers, None)
        top = measure(fast_ranks, math.nan)
        if top.measured < self.x * (1.0 - self.tolerance):
            raise self._unreachable(top.measured, "measured with every layer at its fastest measured split")
        assert self.table is not None
        t_dense, t_fast = self.table.model, self.table.model / top.measured
        s_dense = self._layer_time(layers, {})
        s_fast = self._layer_time(layers, fast_ranks)
        if s_dense - s_fast > 0 and t_dense > t_fast:
            scale = (t_dense - t_fast) / (s_dense - s_fast)
            self._affine = (scale, t_dense - scale * s_dense)
        top.target = self.plan(layers, None)[1]  # = top.measured under the fitted model
        if self._affine is None:
            self._affine = self._time_model(layers)
        if abs(top.measured / self.x - 1.0) <= self.tolerance:
            self._remember(None)
            return top.ranks
        fastest = top.target
        target = min(self.x, fastest)
        for _ in range(self.calibrate):
            step = measure(self.plan(layers, target)[0], target)
            if abs(step.measured / self.x - 1.0) <= self.tolerance:
                break
            target = self._next_target(fastest)
            if any(abs(c.target / target - 1.0) < 1e-3 for c in self.history):
                break  # no new plan to try
        best = self._best()
        self._remember(None if best is top else best.target)
        return best.ranks

    def _next_target(self, fastest: float) -> float:
        """The next internal target: between the closest measured points around ``x``, else scaled by ``x / measured``
        (by at most 30%).

        The measured speedups are first read as non-decreasing in the target (a least-squares fit), so a
        noisy measurement cannot make the search step back onto a target already tried.
        """
        points = sorted(self.history, key=lambda c: c.target)
        smooth = _nondecreasing([c.measured for c in points])
        below = [(c.target, m) for c, m in zip(points, smooth) if m < self.x]
        above = [(c.target, m) for c, m in zip(points, smooth) if m >= self.x]
        if below and above:
            (t_lo, m_lo), (t_hi, m_hi) = below[-1], above[0]
            if m_hi > m_lo:
                w = math.log(self.x / m_lo) / math.log(m_hi / m_lo)
                target = math.exp(math.log(t_lo) + w * math.log(t_hi / t_lo))
                if not any(abs(c.target / target - 1.0) < 1e-3 for c in self.history):
                    return target
        last = self._best() if len(self.history) > 1 else self.history[-1]
        # one noisy measurement must not throw the target far: at most a 30% step per round
        factor = min(max(self.x / last.measured, 1 / 1.3), 1.3)
        return min(max(last.target * factor, 1.0 + 1e-6), fastest)

    def _best(self) -> Calibration:
        return min(self.history, key=lambda c: abs(math.log(c.measured / self.x)))

    def _unreachable(self, best: float, how: str) -> ValueError:
        assert self.table is not None
        return ValueError(
            f"TargetLatency({self.x:g}) cannot be reached in {self.table.runtime} at batch {self.table.batch_size}: "
            f"the best reachable speedup is about {best:.2f}x ({how}); lower the target or select more layers"
        )

    def _reachable(self, layers: Sequence[LayerSpectrum]) -> float:
        """The largest target the latency table allows (every layer at its fastest option)."""
        return self.plan(layers, None)[1]

    @property
    def measured(self) -> Optional[float]:
        """The measured speedup of the ranks last returned (after calibration), or None."""
        if not self.history:
            return None
        return min(self.history, key=lambda c: abs(math.log(c.measured / self.x))).measured

    def spec(self) -> str:
        text = f"latency:{self.x:g}"
        if self.runtime != "onnxruntime" or self.batch_size != 1:
            text += f":{self.runtime}"
        if self.batch_size != 1:
            text += f":{self.batch_size}"
        return text

    def __repr__(self) -> str:
        return f"TargetLatency({self.x:g}, runtime={self.runtime!r}, batch_size={self.batch_size})"


def _parse(value: str) -> TargetLatency:
    parts = value.split(":")
    if len(parts) > 3:
        raise ValueError(f"latency criterion takes latency:X[:RUNTIME[:BATCH]], got latency:{value}")
    try:
        x = float(parts[0])
    except ValueError:
        raise ValueError(f"criterion 'latency:{value}': X must be a number > 1 (a measured speedup), "
                         f"got {parts[0]!r}") from None
    runtime = parts[1] if len(parts) > 1 and parts[1] else "onnxruntime"
    try:
        batch = int(parts[2]) if len(parts) > 2 else 1
    except ValueError:
        raise ValueError(f"criterion 'latency:{value}': BATCH must be an integer from 1 to {MAX_BATCH}, "
                         f"got {parts[2]!r}") from None
    try:
        return TargetLatency(x, runtime=runtime, batch_size=batch)
    except ValueError as err:
        raise ValueError(f"criterion 'latency:{value}': {err}") from None


register_criterion("latency", _parse, "latency:X[:RUNTIME[:BATCH]]")
