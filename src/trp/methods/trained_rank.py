"""The TRP training companion: periodic low-rank projection plus nuclear-norm sub-gradient.

Use it inside any training loop (SPEC §1.3)::

    pruner = trp.TRP(model, criterion=trp.Energy(0.9), period=20, nuclear_weight=3e-4)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        pruner.regularize()      # grad += λ·U_r V_rᵀ       (step A, nuclear term)
        optimizer.step()
        pruner.step()            # every `period` steps: W ← U_r S_r V_rᵀ  (step B)
    compact = pruner.decompose(trp.Value(0.05))

``criterion`` takes what :func:`trp.decompose` takes: a per-layer criterion (``Energy(0.9)``, the
default; ``Value``, ``Ratio``, ``FixedRank``) or a whole-model one (``TargetMACs(3)``,
``TargetLatency(2)``, ``Global``, ``LayerRanks``), which then needs ``input_shape`` (or
``example_inputs``) for its MAC counts. The settings and their defaults live in
:class:`trp.TRPConfig` (``TRP.from_config(model, cfg)``). The old ``energy=e`` and ``target=t``
arguments still work for a release, with a DeprecationWarning: ``energy=e`` is
``criterion=Energy(e)``, ``target=t`` is ``criterion=t`` (with ``warmup_criterion=Energy(e)``).

Every refresh (a projection, or a refresh of the sub-gradient alone) is one flow:

1. spectra: target weights with the same matrix shape get one batched SVD; under
   ``torch.distributed`` each rank computes its share of them (:mod:`trp.methods.sharded`); a
   layer above ``trp.core.svd.FULL_SVD_MAX`` singular values gets only the leading triplets its
   rank needs (:mod:`trp.core.topspectra`), in float32 for float32 weights;
2. ranks from the criterion: per layer, or for the whole model at once; a whole-model choice is
   made once, on rank 0, and broadcast, so every rank projects at the same ranks even where the
   criterion would measure differently on each (a latency table);
3. one apply step: each weight becomes ``U_r S_r V_rᵀ`` (on a projection) and ``U_r V_rᵀ`` is
   kept as its sub-gradient, which ``regularize`` then adds at every step until the next
   refresh (one ``add_`` per layer); under ``torch.distributed`` the owners broadcast the
   results, so all ranks hold bit-identical weights.

With ``period=None`` no projection happens (nuclear-norm-only training) and the sub-gradient
``U Vᵀ`` over the nonzero singular values is refreshed every ``subgradient_period`` steps.
With a ``GradScaler``, call ``scaler.unscale_(optimizer)`` before ``regularize()``, as for
gradient clipping.

Data parallel: ``TRP(ddp_model)`` trains the module inside the ``DistributedDataParallel``
(or ``DataParallel``, ``torch.compile``) wrapper, so layer names and a decomposed model carry
no ``module.`` prefix. Call ``regularize()`` after ``loss.backward()``: by then DDP has
averaged the gradients over the ranks, and the sub-gradient, the same on every rank, is added
once on each, so the gradients stay identical across ranks and equal a single process's on the
global batch. ``shard=False`` turns the sharing off (needed when only some ranks run TRP; each
rank then decides alone).

Toward a target: with a whole-model criterion, each projection takes its ranks from that
criterion (e.g. the most spectral energy per MAC within the budget, :mod:`trp.core.allocation`);
the sub-gradient acts on the same ranks, and :meth:`TRP.decompose` splits with the same
criterion, so the trained model lands on the target. ``warmup=K`` keeps ``warmup_criterion``
(``Energy(0.9)``) projections for the first ``K`` iterations; ``project(final=True)`` uses the
target even then. ``ramp=R`` (a target with ``partway``, such as ``TargetMACs``) then lets the
reduction grow over the next ``R`` iterations instead of imposing it at once: a projection at
progress ``p = (iteration - K) / R`` uses ``target.partway(1 - (1 - p)³)``, most of the cut early
(the cubic schedule of gradual pruning, Zhu & Gupta 2017), and the whole target from ``K + R`` on.

A measured target (:class:`trp.TargetLatency`) profiles the layers TRP trains and is calibrated
once, at its first allocation (the start of target training, after ``warmup``): its time model
and internal target are then fixed on the criterion (:meth:`~trp.TargetLatency.fix_calibration`),
kept in the state dict, and used by every later projection and by the final split, which
measures nothing more. So the ranks trained toward are the ranks split at: after a final
projection ``decompose()`` keeps exactly ``TRP.ranks`` (a projected layer's spectrum ends at its
rank, and a plan that fitted the budget still fits). Measured on the fake machines of the tests
(20 steps, period 2): the split lands at 1.54x for x=1.5 and 1.93x for x=2 (as a calibration
at the end would), against 1.93x for x=1.5 with the uncalibrated table; on a third machine
(a large per-call cost) at 1.40x for x=1.5, where calibrating again at the end lands at 1.53x,
but at ranks the training never projected to ({9, 9, 7} instead of the trained {7, 7, 16}),
after twice the measurements. Calibrating at the end therefore breaks the promise that
training toward a target makes; a ``warmup`` lets the one calibration see trained spectra.

The last epochs without projection: :meth:`TRP.factorize` ends the projections (after a final one)
and trains each layer from then on as its rank-r factors ``A·B`` (:mod:`trp.methods.factored`), so
the weights stay exactly at the trained ranks and change smoothly; :meth:`TRP.merge` multiplies the
factors back into plain weights of those ranks, which :meth:`TRP.decompose` splits losslessly.

Steps 1 and 3 are :class:`trp.methods.trp_steps.ProjectionSteps`; the layer bookkeeping and the
whole-model ranks (step 2 under a target) are its base class :class:`trp.methods.trp_target.TargetRanks`;
the collective operations live in :mod:`trp.methods.sharded` and the settings in
:mod:`trp.methods.trp_config`.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core._util import check_int, check_number, is_whole_model
from ..core.allocation import LayerRanks
from ..core.criteria import Energy, Value, current_spelling
from ..core.decompose import RankCriterion, decompose
from ..core.inputs import ExampleInputs
from ..core.layers import LayerSelector, skipped_inline
from ..core.safety import split_targets
from ..core.schemes import Scheme, get_scheme, scheme_for
from ..core.targets import projects_raw_weight
from ..core.wrappers import unwrap
from .factored import factorize, merge
from .sharded import ShardSetting, resolve_group, share_results
from .trp_config import DEFAULTS, TRPConfig, resolve_criteria
from .trp_steps import ProjectionSteps
from .trp_target import _Spectra

__all__ = ["TRP"]


class TRP(ProjectionSteps):
    """Trained Rank Pruning for the selected layers of ``model`` (see module docstring).

    ``criterion`` (default ``Energy(0.9)``) chooses the ranks of the projections, per layer or for
    the whole model; ``period`` (None: no projection), ``nuclear_weight`` (λ), ``layers`` /
    ``exclude`` (the selection of :func:`trp.decompose`), ``subgradient_period``, ``shard`` (see
    :func:`trp.methods.sharded.resolve_group`), ``input_shape`` / ``example_inputs`` (a whole-model
    criterion's MAC counts), ``warmup`` and ``warmup_criterion`` (the projections before a
    whole-model criterion takes over). The defaults are :class:`trp.TRPConfig`'s;
    :meth:`from_config` builds a TRP from one. ``ramp`` (keyword) grows a target's reduction over
    that many iterations after the warm-up. ``energy=`` and ``target=`` are deprecated.
    """

    def __init__(
        self,
        model: nn.Module,
        scheme: str = DEFAULTS.scheme,
        criterion: Optional[RankCriterion] = None,
        period: Optional[int] = DEFAULTS.period,
        nuclear_weight: float = DEFAULTS.nuclear_weight,
        layers: LayerSelector = DEFAULTS.layers,
        subgradient_period: Optional[int] = DEFAULTS.subgradient_period,
        shard: ShardSetting = DEFAULTS.shard,
        target: Optional[Any] = None,
        input_shape: Optional[Sequence[int]] = DEFAULTS.input_shape,
        example_inputs: Optional[Tensor] = None,
        warmup: int = DEFAULTS.warmup,
        exclude: Sequence[str] = DEFAULTS.exclude,
        *,
        energy: Optional[float] = None,
        warmup_criterion: Optional[RankCriterion] = None,
        ramp: int = DEFAULTS.ramp,
    ) -> None:
        criterion, warm = resolve_criteria(criterion, energy, target, warmup_criterion)
        get_scheme(scheme)
        check_int("period", period, 1, none_means="for no projection")
        check_number("nuclear_weight", nuclear_weight, 0.0, high_open=True, what="a finite number >= 0")
        sub_period = subgradient_period if subgradient_period is not None else (period or DEFAULTS.period)
        check_int("subgradient_period", sub_period, 1)
        if period is None and nuclear_weight == 0:
            raise ValueError("period=None and nuclear_weight=0 would do nothing: set one of them")

        self._group = resolve_group(model, shard)
        model = unwrap(model)
        self.model = model
        self.scheme = scheme
        self.criterion = criterion
        self.warmup_criterion = warm
        self.period = period
        self.nuclear_weight = float(nuclear_weight)
        self.subgradient_period = sub_period
        # Layer names are the plain model's (no wrapper prefix); the parameters are shared.
        # The same selection as decompose's, so every layer trained low rank is split afterwards.
        targets, skipped = split_targets(model, layers, exclude, scheme)
        # Weight-standardized convs apply a function of their weight: projecting it does not
        # make what they apply low rank.
        skipped += [(n, "weight standardization: a low-rank stored weight does not give a low-rank "
                     "applied weight") for n, m in targets if not projects_raw_weight(m)]
        targets = [(n, m) for n, m in targets if projects_raw_weight(m)]
        if not targets:
            raise ValueError(
                "TRP found no layer to train low-rank: the selection matched no factorizable "
                "Conv2d/Linear layer. Pass layers=[names] or a predicate."
            )
        if skipped:
            warnings.warn(
                "TRP leaves these selected layers alone: " + skipped_inline(skipped),
                stacklevel=2,
            )
        self.layer_names = [n for n, _ in targets]
        self._params: dict[str, nn.Parameter] = {n: m.weight for n, m in targets}
        self._schemes: dict[str, Scheme] = {n: scheme_for(m, scheme) for n, m in targets}
        self._subgrad: dict[str, Tensor] = {}
        self.ranks: dict[str, int] = {}
        self.iteration = 0
        self.factored = False  # the layers train as their rank-r factors (factorize), no projection
        self._trained_factored = False  # factored since the last projection: split at self.ranks
        self.seconds = 0.0  # wall time spent inside regularize/step/project
        self.warmup = warmup
        self.ramp = check_int("ramp", ramp, 0, what="a number of iterations >= 0")
        self.input_shape: Optional[tuple[int, ...]] = None
        self.allocated: dict[str, int] = {}  # the whole-model criterion's ranks at the last refresh
        self._costs: dict[str, tuple[int, Any]] = {}
        self._fixed_macs = 0
        self._prepared = False  # the criterion's prepare() ran (on the rank that decides)
        self._calibration: Optional[dict[str, float]] = None  # a measured criterion's fixed time model
        self._calibration_shared = False
        if self.whole:
            self._init_target(targets, period, input_shape, example_inputs, warmup)
        elif warmup or ramp:
            raise ValueError(f"{'warmup' if warmup else 'ramp'} counts iterations before the target applies in "
                             "full: it needs a whole-model criterion (criterion=trp.TargetMACs(x), ...)")
        if ramp and not callable(getattr(self.criterion, "partway", None)):
            raise ValueError(f"ramp grows the target's reduction step by step: {self.criterion!r} has no "
                             "partway(fraction) method; use trp.TargetMACs(x), or ramp=0")

    @classmethod
    def from_config(cls, model: nn.Module, config: TRPConfig, **overrides: Any) -> "TRP":
        """A TRP with the settings of ``config`` (``overrides`` replace fields, e.g. ``example_inputs=x``)."""
        example_inputs = overrides.pop("example_inputs", None)
        if overrides:
            config = config.replace(**overrides)
        return cls(model, config.scheme, config.resolved_criterion(), config.period, config.nuclear_weight,
                   config.layers, config.subgradient_period, config.shard, None, config.input_shape,
                   example_inputs, config.warmup, config.exclude, warmup_criterion=Energy(config.energy),
                   ramp=config.ramp)

    @property
    def whole(self) -> bool:
        """Whether the criterion chooses every layer's rank at once (a target such as ``TargetMACs``)."""
        return is_whole_model(self.criterion)

    @property
    def target(self) -> Optional[Any]:
        """The whole-model criterion trained toward, or None (a per-layer criterion)."""
        return self.criterion if self.whole else None

    def target_now(self, final: bool = False) -> Any:
        """The whole-model criterion of a projection at the current iteration: the target, or during
        the ramp ``target.partway(1 - (1 - p)³)`` (``final``: the target itself)."""
        done = self.iteration - self.warmup
        if final or not self.ramp or done >= self.ramp:
            return self.criterion
        p = max(done, 0) / self.ramp
        return self.criterion.partway(1.0 - (1.0 - p) ** 3)

    # -- the two calls of the training loop ---------------------------------------------
    def regularize(self) -> None:
        """Add ``nuclear_weight · U Vᵀ`` to each target weight's gradient (after backward)."""
        if self.nuclear_weight == 0 or self.factored:
            return
        start = time.perf_counter()
        if not self._subgrad:
            self._refresh(project=False)
        for name, param in self._params.items():
            if param.grad is not None:
                param.grad.add_(self._subgrad[name].to(param.grad.dtype), alpha=self.nuclear_weight)
        self.seconds += time.perf_counter() - start

    def step(self) -> None:
        """Count one iteration; project every ``period`` iterations (after optimizer.step)."""
        start = time.perf_counter()
        self.iteration += 1
        if self.factored:  # the factors keep the ranks: nothing to project
            pass
        elif self.period is not None and self.iteration % self.period == 0:
            self._refresh(project=True)
        elif self.period is None and self.iteration % self.subgradient_period == 0:
            self._refresh(project=False)
        self.seconds += time.perf_counter() - start

    def project(self, final: bool = False) -> None:
        """Replace each target weight by its truncation now, at the criterion's ranks.

        With a whole-model criterion, its ranks apply once the warm-up is over, or with
        ``final=True`` (the projection that ends training, so that the model is exactly at the
        target's ranks, the ranks :meth:`decompose` then splits at). Factored layers (:meth:`factorize`)
        are at their ranks already: nothing is done.
        """
        if self.factored:
            return
        start = time.perf_counter()
        self._refresh(project=True, final=final)
        self.seconds += time.perf_counter() - start

    def factorize(self, project: bool = True) -> None:
        """From now on train each target layer as its rank-r factors ``W = A·B``: no projection, no nuclear term.

        With ``project`` a final projection comes first (a target's ranks, as :meth:`project` with
        ``final=True``); without it the layers are factored at :attr:`ranks` as they stand (a resumed
        run, whose factors are then loaded from its state). The weights are replaced by the factors as
        parameters: give the optimizer the model's new parameters (``trp train`` does).
        """
        if self.factored:
            raise ValueError("TRP.factorize: the layers are factored already")
        if project:
            self.project(final=True)
        missing = [n for n in self.layer_names if n not in self.ranks]
        if missing:
            raise ValueError(f"TRP.factorize: no rank yet for {', '.join(missing[:4])}: project first "
                             "(factorize() with project=True, the default)")
        factorize(self.model, {n: (self._schemes[n], self.ranks[n]) for n in self.layer_names})
        self.factored = self._trained_factored = True

    def merge(self) -> None:
        """Multiply factored layers back into plain weights of their ranks (the inverse of :meth:`factorize`)."""
        if not self.factored:
            return
        merge(self.model)
        self._params = {n: self.model.get_submodule(n).weight for n in self.layer_names}
        self.factored = False

    def decompose(
        self,
        criterion: Optional[RankCriterion] = None,
        input_shape: Optional[tuple[int, ...]] = None,
        *,
        example_inputs: Optional[ExampleInputs] = None,
        calibration: Optional[Any] = None,
        **calibration_options: Any,
    ) -> nn.Module:
        """Split the trained target layers (default criterion: the target, else ``Value(0.05)``, SPEC §1.3;
        after factored training (:meth:`factorize`), the trained ranks).

        The result is the plain model (any DDP / torch.compile wrapper removed). ``calibration``
        (and ``calibration_samples`` / ``calibration_weighting``) are passed to :func:`trp.decompose`.
        """
        if criterion is None and self._trained_factored:
            # the factors trained after the last projection: the trained ranks, not a new allocation of the
            # spectra they moved to
            criterion = LayerRanks(dict(self.ranks))
        elif criterion is None:
            criterion = self.criterion if self.whole else Value(0.05)
        return decompose(
            self.model,
            scheme=self.scheme,
            criterion=criterion,
            layers=self.layer_names,
            input_shape=input_shape if input_shape is not None or example_inputs is not None else self.input_shape,
            example_inputs=example_inputs,
            calibration=calibration,
            **calibration_options,
        )

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Iteration count, ranks, cached sub-gradients and a measured target's calibration (``weights_only`` loadable)."""
        state: dict[str, Any] = {
            "iteration": self.iteration,
            "target": self._target_spec(),
            "ranks": dict(self.ranks),
            "subgradients": {n: g.detach().clone() for n, g in self._subgrad.items()},
            "factored": self.factored,
            "split_at_ranks": self._trained_factored,
        }
        if self._calibration is not None:
            state["calibration"] = dict(self._calibration)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (also the state of TRP before ``criterion=``).

        A state saved with factored layers (:meth:`factorize`) factors this model's layers at its
        ranks: load the model's state dict after this.
        """
        if self.factored and not state.get("factored"):
            raise ValueError("TRP state was saved before its layers were factored, but this TRP's layers are factored: "
                             "load it into a TRP built on the unfactored model")
        saved = state.get("target")
        if isinstance(saved, str):  # a state saved before issue 21 spells macs:X as speedup:X
            saved = current_spelling(saved)
        if "target" in state and saved != self._target_spec():
            raise ValueError(
                f"TRP state was trained toward target {saved!r}, but this TRP has target "
                f"{self._target_spec()!r}: build TRP with the same target to resume"
            )
        subgrads = state.get("subgradients", {})
        unknown = set(subgrads) - set(self._params)
        if unknown:
            raise ValueError(f"TRP state names layers this model lacks: {sorted(unknown)}")
        self.iteration = int(state["iteration"])
        self.ranks = {str(k): int(v) for k, v in state.get("ranks", {}).items()}
        self._subgrad = {
            n: g.to(device=self._params[n].device, dtype=self._params[n].dtype) for n, g in subgrads.items()
        }
        calibration = state.get("calibration")
        if calibration is not None and callable(getattr(self.criterion, "fix_calibration", None)):
            self._calibration = {str(k): float(v) for k, v in calibration.items()}
            self.criterion.fix_calibration(self._calibration)
            self._calibration_shared = True
        if state.get("factored") and not self.factored:
            self.factorize(project=False)
        self._trained_factored = bool(state.get("split_at_ranks", False))

    @torch.no_grad()
    def _refresh(self, project: bool, final: bool = False) -> None:
        """Project (or only refresh the sub-gradient): spectra, then ranks, then one apply step."""
        if project:
            self._trained_factored = False
        whole = self.whole and (final or self.iteration >= self.warmup)
        first = next(iter(self._params.values()))
        # Inside an autocast region the reconstruction matmuls would run in bf16/fp16, and the
        # projected weight would not be exactly low rank.
        with torch.autocast(device_type=first.device.type, enabled=False):
            # the per-layer criterion in use (None: the whole-model criterion decides)
            per_layer = None if whole else (self.warmup_criterion if self.whole else self.criterion)
            owners = self._owners(whole)
            mine = {n for n, owner in owners.items() if owner == self._rank()}
            spectra, large = self._spectra(mine, project, per_layer)
            ranks = None
            if whole:
                ranks = self._decide(spectra, large, owners, self.target_now(final))
                self.allocated = dict(ranks)
                spectra += [_Spectra([n], *svd, batched=False, matrix=self._matrix([n])[0])
                            for n, svd in self._large_svds.items()]
            self._apply(spectra, ranks, project, per_layer)
            if self._group is not None:
                share_results(self._params, self._subgrad, self.ranks, owners, project, self._group)
