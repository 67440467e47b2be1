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
then adds at every step until the next projection (one ``add_`` per layer). With
``period=None`` no projection happens (nuclear-norm-only training) and the
sub-gradient ``U Vᵀ`` over the nonzero singular values is refreshed every
``subgradient_period`` steps. With a ``GradScaler``, call ``scaler.unscale_(optimizer)``
before ``regularize()``, as for gradient clipping.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.allocation import pooled_spectrum
from ..core.criteria import Energy, Value
from ..core.decompose import RankCriterion, decompose
from ..core.inputs import ExampleInputs
from ..core.layers import LayerSelector, select_layers
from ..core.schemes import Scheme, get_scheme, scheme_for
from ..core.svd import checked_svd
from ..core.wrappers import unwrap
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

        self.model = model  # as given: a DDP / torch.compile wrapper stays for training
        self.scheme = scheme
        self.criterion = Energy(energy)
        self.period = period
        self.nuclear_weight = float(nuclear_weight)
        self.subgradient_period = sub_period
        # Layer names are the plain model's (no wrapper prefix); the parameters are shared.
        targets, skipped = select_layers(unwrap(model), layers, exclude, scheme)
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

    def project(self) -> None:
        """Replace each target weight by its energy-rank truncation now."""
        start = time.perf_counter()
        self._refresh(project=True)
        self.seconds += time.perf_counter() - start

    def decompose(
        self,
        criterion: Optional[RankCriterion] = None,
        input_shape: Optional[tuple[int, ...]] = None,
        *,
        example_inputs: Optional[ExampleInputs] = None,
    ) -> nn.Module:
        """Split the trained target layers (default criterion ``Value(0.05)``, SPEC §1.3).

        The result is the plain model (any DDP / torch.compile wrapper removed).
        """
        return decompose(
            self.model,
            scheme=self.scheme,
            criterion=Value(0.05) if criterion is None else criterion,
            layers=self.layer_names,
            input_shape=input_shape,
            example_inputs=example_inputs,
        )

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Iteration count and cached sub-gradients (loadable with ``weights_only=True``)."""
        return {
            "iteration": self.iteration,
            "ranks": dict(self.ranks),
            "subgradients": {n: g.detach().clone() for n, g in self._subgrad.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
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
        for names in self._groups().values():
            # Inside an autocast region the reconstruction matmuls below would run in
            # bf16/fp16, and the projected weight would not be exactly low rank.
            with torch.autocast(device_type=self._params[names[0]].device.type, enabled=False):
                self._refresh_group(names, project)

    def _refresh_group(self, names: list[str], project: bool) -> None:
        scheme = self._schemes[names[0]]
        shape = self._params[names[0]].shape
        weights = torch.stack([self._params[n].detach() for n in names])
        matrix = scheme.to_matrix(weights)
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
