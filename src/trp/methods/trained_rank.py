"""The TRP training companion: periodic low-rank projection plus nuclear-norm sub-gradient.

Use it inside any training loop (SPEC §1.3)::

    pruner = trp.TRP(model, scheme="channel", energy=0.9, period=20, nuclear_weight=3e-4)
    for x, y in loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        pruner.regularize()      # grad += λ·U_r V_rᵀ       (step A, nuclear term)
        optimizer.step()
        pruner.step()            # every `period` steps: W ← U_r S_r V_rᵀ  (step B)
    compact = pruner.decompose(trp.Value(0.05))

Cost: target weights with the same matrix shape are projected with one batched SVD,
and the projection's factors give the sub-gradient ``U_r V_rᵀ`` that ``regularize``
then adds at every step until the next projection (one ``add_`` per layer). A projection of
a large layer (above ``trp.core.svd.FULL_SVD_MAX`` singular values) computes only the leading
triplets it keeps (:mod:`trp.core.topspectra`), in float32 for float32 weights. With
``period=None`` no projection happens (nuclear-norm-only training) and the
sub-gradient ``U Vᵀ`` over the nonzero singular values is refreshed every
``subgradient_period`` steps. With a ``GradScaler``, call ``scaler.unscale_(optimizer)``
before ``regularize()``, as for gradient clipping.

Data parallel: ``TRP(ddp_model)`` trains the module inside the ``DistributedDataParallel``
(or ``DataParallel``, ``torch.compile``) wrapper, so layer names and a decomposed model carry
no ``module.`` prefix. Call ``regularize()`` after ``loss.backward()``: by then DDP has
averaged the gradients over the ranks, and the sub-gradient, computed from the same weights
on every rank, is added once on each, so the gradients stay identical across ranks and equal
a single process's on the global batch. Under ``torch.distributed`` each rank computes the
SVDs of its share of the layers and broadcasts them (see :mod:`trp.methods.sharded`): all
ranks end every projection with bit-identical weights; ``shard=False`` turns this off (needed
when only some ranks run TRP).

Toward a target: ``TRP(model, ..., target=trp.TargetSpeedup(3), input_shape=(1, 3, 32, 32))``
takes each projection's ranks from that whole-model criterion (the most spectral energy per
MAC within the budget, :mod:`trp.core.allocation`) instead of a fixed energy; the
sub-gradient acts on the same ranks, and :meth:`TRP.decompose` splits with the same
criterion, so the trained model lands on the target. ``warmup=K`` keeps energy-driven
projections for the first ``K`` iterations.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections import defaultdict
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.allocation import LayerSpectrum, WholeModelCriterion, pooled_spectrum
from ..core.counting import count_macs
from ..core.criteria import Energy, Value
from ..core.decompose import RankCriterion, decompose, trace_sizes
from ..core.layers import LayerSelector
from ..core.safety import split_targets
from ..core.schemes import Scheme, get_scheme, scheme_for
from ..core.inputs import ExampleInputs
from ..core import svd as svd_module
from ..core.svd import checked_svd
from ..core.topspectra import LayerMatrix, allocate_leading, leading_svd
from ..core.wrappers import unwrap
from .sharded import ShardSetting, assign_owners, broadcast_results, resolve_group
from ..core.targets import projects_raw_weight

__all__ = ["TRP"]


class TRP:
    """Trained Rank Pruning for the selected layers of ``model`` (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        scheme: str = "channel",
        energy: float = 0.9,
        period: Optional[int] = 20,
        nuclear_weight: float = 3e-4,
        layers: LayerSelector = None,
        subgradient_period: Optional[int] = None,
        shard: ShardSetting = None,
        target: Optional[WholeModelCriterion] = None,
        input_shape: Optional[Sequence[int]] = None,
        example_inputs: Optional[Tensor] = None,
        warmup: int = 0,
        exclude: Sequence[str] = (),
    ) -> None:
        get_scheme(scheme)
        if not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
            raise ValueError(f"energy must lie in (0, 1], got {energy!r}")
        if period is not None and (isinstance(period, bool) or not isinstance(period, int) or period < 1):
            raise ValueError(f"period must be a positive integer (or None for no projection), got {period!r}")
        if not (isinstance(nuclear_weight, (int, float)) and math.isfinite(nuclear_weight) and nuclear_weight >= 0):
            raise ValueError(f"nuclear_weight must be a finite number >= 0, got {nuclear_weight!r}")
        sub_period = subgradient_period if subgradient_period is not None else (period or 20)
        if isinstance(sub_period, bool) or not isinstance(sub_period, int) or sub_period < 1:
            raise ValueError(f"subgradient_period must be a positive integer, got {subgradient_period!r}")
        if period is None and nuclear_weight == 0:
            raise ValueError("period=None and nuclear_weight=0 would do nothing: set one of them")

        self._group = resolve_group(model, shard)
        model = unwrap(model)
        self.model = model
        self.scheme = scheme
        self.criterion = Energy(energy)
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
                "TRP leaves these selected layers alone: "
                + "; ".join(f"{n} ({r})" for n, r in skipped),
                stacklevel=2,
            )
        self.layer_names = [n for n, _ in targets]
        self._params: dict[str, nn.Parameter] = {n: m.weight for n, m in targets}
        self._schemes: dict[str, Scheme] = {n: scheme_for(m, scheme) for n, m in targets}
        self._subgrad: dict[str, Tensor] = {}
        self.ranks: dict[str, int] = {}
        self.iteration = 0
        self.seconds = 0.0  # wall time spent inside regularize/step/project
        self.target = target
        self.warmup = warmup
        self.input_shape: Optional[tuple[int, ...]] = None
        self.allocated: dict[str, int] = {}  # the target's ranks at the last refresh
        if target is not None:
            self._init_target(targets, period, input_shape, example_inputs, warmup)
        elif warmup:
            raise ValueError("warmup counts the iterations before the target takes over: it needs target=...")

    # -- the two calls of the training loop ---------------------------------------------
    def regularize(self) -> None:
        """Add ``nuclear_weight · U Vᵀ`` to each target weight's gradient (after backward)."""
        if self.nuclear_weight == 0:
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
        if self.period is not None and self.iteration % self.period == 0:
            self._refresh(project=True)
        elif self.period is None and self.iteration % self.subgradient_period == 0:
            self._refresh(project=False)
        self.seconds += time.perf_counter() - start

    def project(self, final: bool = False) -> None:
        """Replace each target weight by its truncation now: at the energy rank, or at the target's ranks.

        With a ``target``, its ranks apply once the warm-up is over, or with ``final=True`` (the
        projection that ends training, so that the model is exactly at the target's ranks).
        """
        start = time.perf_counter()
        if final and self.target is not None:
            self._refresh_target(project=True)
        else:
            self._refresh(project=True)
        self.seconds += time.perf_counter() - start

    def decompose(
        self,
        criterion: Optional[RankCriterion] = None,
        input_shape: Optional[tuple[int, ...]] = None,
        *,
        example_inputs: Optional[ExampleInputs] = None,
        calibration: Optional[Any] = None,
        **calibration_options: Any,
    ) -> nn.Module:
        """Split the trained target layers (default criterion: the ``target``, else ``Value(0.05)``, SPEC §1.3).

        The result is the plain model (any DDP / torch.compile wrapper removed). ``calibration``
        (and ``calibration_samples`` / ``calibration_weighting``) are passed to :func:`trp.decompose`.
        """
        if criterion is None:
            criterion = self.target if self.target is not None else Value(0.05)
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
        """Iteration count and cached sub-gradients (loadable with ``weights_only=True``)."""
        return {
            "iteration": self.iteration,
            "target": self._target_spec(),
            "ranks": dict(self.ranks),
            "subgradients": {n: g.detach().clone() for n, g in self._subgrad.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        saved = state.get("target")
        if "target" in state and saved != self._target_spec():
            raise ValueError(
                f"TRP state was trained toward target {saved!r}, but this TRP has target "
                f"{self._target_spec()!r}: build TRP with the same target to resume"
            )
        self.iteration = int(state["iteration"])
        self.ranks = {str(k): int(v) for k, v in state.get("ranks", {}).items()}
        subgrads = state.get("subgradients", {})
        unknown = set(subgrads) - set(self._params)
        if unknown:
            raise ValueError(f"TRP state names layers this model lacks: {sorted(unknown)}")
        self._subgrad = {
            n: g.to(device=self._params[n].device, dtype=self._params[n].dtype) for n, g in subgrads.items()
        }

    # -- the batched SVD work ----------------------------------------------------------
    def _groups(self) -> dict[tuple, list[str]]:
        groups: dict[tuple, list[str]] = defaultdict(list)
        for name, param in self._params.items():
            key = (self._schemes[name].key, tuple(param.shape), param.device, param.dtype)
            groups[key].append(name)
        return groups

    @torch.no_grad()
    def _refresh(self, project: bool) -> None:
        if self.target is not None and self.iteration >= self.warmup:
            self._refresh_target(project)
            return
        if self._group is not None:
            return self._refresh_sharded(project)
        for names in self._groups().values():
            # Inside an autocast region the reconstruction matmuls below would run in
            # bf16/fp16, and the projected weight would not be exactly low rank.
            with torch.autocast(device_type=self._params[names[0]].device.type, enabled=False):
                self._refresh_group(names, project)

    def _refresh_sharded(self, project: bool) -> None:
        """Each rank refreshes its share of the layers; the owners broadcast the results."""
        import torch.distributed as dist

        world, me = dist.get_world_size(self._group), dist.get_rank(self._group)
        costs = []
        for name in self.layer_names:  # SVD cost ~ batch · rows · cols · min(rows, cols)
            shape = self._schemes[name].to_matrix(self._params[name].detach()[None]).shape
            costs.append(float(math.prod(shape) * min(shape[-2:])))
        owners = dict(zip(self.layer_names, assign_owners(costs, world)))
        for names in self._groups().values():
            mine = [n for n in names if owners[n] == me]
            if mine:
                with torch.autocast(device_type=self._params[mine[0]].device.type, enabled=False):
                    self._refresh_group(mine, project)
        results: dict[str, list[Tensor]] = {}
        for name, param in self._params.items():
            if owners[name] != me:
                self._subgrad[name] = torch.empty_like(param)
            results[name] = [self._subgrad[name]]
            if project:
                kept = torch.tensor([self.ranks.get(name, 0) if owners[name] == me else 0],
                                    dtype=torch.int64, device=param.device)
                results[name] += [param.data, kept]
        broadcast_results(results, owners, self._group)
        if project:
            for name in self.layer_names:
                self.ranks[name] = int(results[name][2].item())

    def _refresh_group(self, names: list[str], project: bool) -> None:
        scheme = self._schemes[names[0]]
        shape = self._params[names[0]].shape
        weights = torch.stack([self._params[n].detach() for n in names])
        matrix = scheme.to_matrix(weights)
        if project and matrix.ndim == 3 and min(matrix.shape[-2:]) > svd_module.FULL_SVD_MAX:
            for i, name in enumerate(names):  # large layers: one at a time, only the kept triplets
                self._project_large(name, matrix[i])
            return
        u, s, vh = checked_svd(matrix, f"TRP layers {names}")
        if project:
            if s.ndim > 2:
                # One matrix per filter (decouple): one rank per layer, from the energy
                # pooled over its filters, so the split layer really is rank r.
                ranks = self.criterion.ranks(pooled_spectrum(s, keep=1)).reshape(-1, *([1] * (s.ndim - 2))).expand(s.shape[:-1])
            else:
                ranks = self.criterion.ranks(s)
            keep = torch.arange(s.shape[-1], device=s.device) < ranks[..., None]
        else:
            ranks = None
            tol = s[..., :1] * max(matrix.shape[-2:]) * torch.finfo(s.dtype).eps
            keep = s > tol
        keep = keep.to(s.dtype)
        subgrad = scheme.from_matrix((u * keep[..., None, :]) @ vh, shape)
        if project:
            low = scheme.from_matrix((u * (s * keep)[..., None, :]) @ vh, shape)
            kept = ranks.reshape(len(names), -1).max(dim=1).values.tolist()
        for i, name in enumerate(names):
            param = self._params[name]
            self._subgrad[name] = subgrad[i].to(param.dtype)
            if project:
                param.copy_(low[i].to(param.dtype))
                self.ranks[name] = int(kept[i])

    def _project_large(self, name: str, matrix: Tensor) -> None:
        """Project one large layer at its energy rank from its leading singular triplets only.

        The search starts at the layer's previous rank; a layer that last kept more than a third
        of its spectrum gets the full SVD at once (the leading part would not be cheaper).
        """
        previous = self.ranks.get(name)
        what = f"TRP layer {name!r}"
        if previous is not None and previous > min(matrix.shape) // 3:
            (u, s, vh), for_rank = checked_svd(matrix, what), None
        else:
            (u, s, vh), for_rank = leading_svd(self.criterion, matrix, what, start=previous)
        rank = int(self.criterion(s if for_rank is None else for_rank))
        self._set_projection(name, u, s, vh, rank, project=True)

    def _set_projection(self, name: str, u: Tensor, s: Tensor, vh: Tensor, rank: int, project: bool) -> None:
        """Store ``U_r V_rᵀ`` as the layer's sub-gradient and, with ``project``, set its weight to ``U_r S_r V_rᵀ``."""
        param, scheme = self._params[name], self._schemes[name]
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        self._subgrad[name] = scheme.from_matrix((u @ vh)[None], param.shape)[0].to(param.dtype)
        if project:
            param.copy_(scheme.from_matrix(((u * s) @ vh)[None], param.shape)[0].to(param.dtype))
            self.ranks[name] = rank

    # -- toward a whole-model target (target=...) -----------------------------------------
    def _init_target(self, targets: list[tuple[str, nn.Module]], period: Optional[int],
                     input_shape: Optional[Sequence[int]], example_inputs: Optional[Tensor], warmup: int) -> None:
        """Check the target arguments and count the MAC cost of every layer at every rank, once."""
        if not callable(getattr(self.target, "allocate", None)):
            raise TypeError(
                f"target must be a whole-model criterion such as trp.TargetSpeedup(3) (with an "
                f"allocate(layers, fixed_macs) method), got {self.target!r}"
            )
        if period is None:
            raise ValueError("target=... sets the ranks of the projections: give a period (not None)")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a number of iterations >= 0, got {warmup!r}")
        if input_shape is None and example_inputs is not None:
            input_shape = (1, *example_inputs.shape[1:])
        if input_shape is None:
            raise ValueError(
                f"target={self.target!r} counts the model's MACs: pass input_shape=(1, C, H, W) "
                "or example_inputs=a batch of inputs"
            )
        self.input_shape = tuple(int(d) for d in input_shape)
        convs_only = bool(getattr(self.target, "convs_only", False))
        sizes = trace_sizes(self.model, [m for _, m in targets], self.input_shape)
        self._costs: dict[str, tuple[int, Any]] = {}
        for name, module in targets:
            if convs_only and not isinstance(module, nn.Conv2d):
                continue  # outside the budget: keeps its full rank, as trp.decompose does
            sch = self._schemes[name]
            out_hw, in_hw = sizes[module]
            self._costs[name] = (sch.macs(module, None, out_hw, in_hw),
                                 functools.partial(sch.macs, module, out_hw=out_hw, in_hw=in_hw))
        total = count_macs(self.model, self.input_shape, convs_only=convs_only)
        self._fixed_macs = total - sum(dense for dense, _ in self._costs.values())

    def _target_spec(self) -> Optional[str]:
        if self.target is None:
            return None
        spec = getattr(self.target, "spec", None)
        return spec() if callable(spec) else repr(self.target)

    def allocate(self, spectra: dict[str, Tensor]) -> dict[str, int]:
        """The target's rank for every layer, from each layer's singular values (``(k,)`` or batched)."""
        if self.target is None:
            raise ValueError("this TRP has no target: build it with target=trp.TargetSpeedup(x)")
        layers = [LayerSpectrum(n, spectra[n], dense, macs) for n, (dense, macs) in self._costs.items()]
        given = self.target.allocate(layers, self._fixed_macs)
        return self._checked_ranks(given, {n: int(spectra[n].shape[-1]) for n in self.layer_names})

    def _checked_ranks(self, given: dict[str, int], max_ranks: dict[str, int]) -> dict[str, int]:
        """The target's ranks for every layer, each checked against the layer's maximum rank."""
        ranks = {}
        for name in self.layer_names:
            max_rank = max_ranks[name]
            rank = int(given.get(name, max_rank))  # a layer the criterion leaves out stays full rank
            if not 1 <= rank <= max_rank:
                raise ValueError(f"target {self.target!r} gave layer {name!r} rank {rank} (1..{max_rank})")
            ranks[name] = rank
        return ranks

    @torch.no_grad()
    def _refresh_target(self, project: bool) -> None:
        """Project (or only refresh the sub-gradient) at the ranks the target allocates to all layers at once."""
        groups = self._groups()
        first = next(iter(self._params.values()))
        with torch.autocast(device_type=first.device.type, enabled=False):
            # Large single-matrix layers inside the budget: only the leading triplets the target's
            # ranks need (core.topspectra); the others: one batched full SVD per group.
            large, small = {}, {}
            for key, names in groups.items():
                matrix = self._schemes[names[0]].to_matrix(torch.stack([self._params[n].detach() for n in names]))
                if matrix.ndim == 3 and min(matrix.shape[-2:]) > svd_module.FULL_SVD_MAX:
                    large.update({n: matrix[i] for i, n in enumerate(names) if n in self._costs})
                    names = [n for n in names if n not in self._costs]
                    if not names:
                        continue
                    matrix = self._schemes[names[0]].to_matrix(torch.stack([self._params[n].detach() for n in names]))
                small[tuple(names)] = checked_svd(matrix, f"TRP layers {names}")
            if large:
                full = {n: (u[i], s[i], vh[i]) for names, (u, s, vh) in small.items()
                        for i, n in enumerate(names) if n in self._costs}
                layers = [LayerMatrix(n, large[n] if n in large else self._schemes[n].to_matrix(self._params[n].detach()),
                                      *self._costs[n]) for n in self._costs]
                svds, given = allocate_leading(self.target, layers, self._fixed_macs, known=full)
                ranks = self._checked_ranks(given, {n: int(min(self._schemes[n].to_matrix(self._params[n].detach()).shape[-2:]))
                                                    for n in self.layer_names})
                for n in large:
                    u, s, vh = svds[n]
                    if ranks[n] > s.shape[-1]:  # kept whole (dense): the sub-gradient needs every triplet
                        u, s, vh = checked_svd(large[n], f"TRP layer {n!r}")
                    self._set_projection(n, u, s, vh, ranks[n], project)
            else:
                spectra = {n: s[i] for names, (_, s, _) in small.items() for i, n in enumerate(names)}
                ranks = self.allocate(spectra)
            self.allocated = ranks
            for names, (u, s, vh) in small.items():
                scheme, shape = self._schemes[names[0]], self._params[names[0]].shape
                r = torch.tensor([ranks[n] for n in names], device=s.device)
                r = r.reshape(-1, *([1] * (s.ndim - 2))).expand(s.shape[:-1])
                keep = (torch.arange(s.shape[-1], device=s.device) < r[..., None]).to(s.dtype)
                subgrad = scheme.from_matrix((u * keep[..., None, :]) @ vh, shape)
                low = scheme.from_matrix((u * (s * keep)[..., None, :]) @ vh, shape) if project else None
                for i, name in enumerate(names):
                    param = self._params[name]
                    self._subgrad[name] = subgrad[i].to(param.dtype)
                    if project:
                        param.copy_(low[i].to(param.dtype))
                        self.ranks[name] = ranks[name]
