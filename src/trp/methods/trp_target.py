"""TRP's layer bookkeeping and its whole-model ranks (step 2 of a refresh under a target).

:class:`TargetRanks` is the base of :class:`trp.TRP`: the matrix views of the trained layers, which
rank computes each layer's SVD, and, under a whole-model criterion (``TargetMACs``,
``TargetLatency``, ...), the MAC costs counted once and the ranks decided on rank 0 and
broadcast. The flow of a refresh is described in :mod:`trp.methods.trained_rank`.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core import svd as svd_module
from ..core._util import check_int
from ..core.allocation import LayerSpectrum, prepare_criterion
from ..core.counting import count_macs
from ..core.planning import trace_sizes
from ..core.schemes import Scheme
from ..core.topspectra import LayerMatrix, allocate_leading
from .sharded import broadcast_object, broadcast_ranks, gather_spectra, owners_by_cost

__all__ = ["TargetRanks"]


SVD = tuple[Tensor, Tensor, Tensor]


@dataclass
class _Spectra:
    """Step 1's result for some layers: a batched full SVD, or one large layer's leading triplets."""

    names: list[str]
    u: Tensor
    s: Tensor
    vh: Tensor
    batched: bool = True
    matrix: Optional[Tensor] = None  # a large layer's matrix (for a full SVD when its rank needs it)
    for_rank: Optional[Tensor] = None  # a large layer's truncated spectrum plus its rest (per-layer criteria)


@contextlib.contextmanager
def _own_random_state(param: Tensor) -> Iterator[None]:
    """The global random state restored afterwards: measuring the model must not change training."""
    devices = [param.device.index or 0] if param.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield



class TargetRanks:
    """The layer bookkeeping :class:`trp.TRP` builds on, and its whole-model ranks."""

    model: nn.Module
    scheme: str
    criterion: Any
    layer_names: list[str]
    input_shape: Optional[tuple[int, ...]]
    _group: Any
    _params: dict[str, nn.Parameter]
    _schemes: dict[str, Scheme]
    _costs: dict[str, tuple[int, Any]]
    _fixed_macs: int
    _prepared: bool
    _calibration: Optional[dict[str, float]]
    _calibration_shared: bool
    _large_svds: dict[str, SVD]

    @property
    def whole(self) -> bool:  # defined by TRP
        raise NotImplementedError

    # -- the refresh: spectra -> ranks -> apply -----------------------------------------
    def _groups(self) -> dict[tuple, list[str]]:
        groups: dict[tuple, list[str]] = defaultdict(list)
        for name, param in self._params.items():
            key = (self._schemes[name].key, tuple(param.shape), param.device, param.dtype)
            groups[key].append(name)
        return groups

    def _matrix(self, names: list[str]) -> Tensor:
        """The stacked matrix views of the weights of ``names`` (one group: same scheme and shape)."""
        return self._schemes[names[0]].to_matrix(torch.stack([self._params[n].detach() for n in names]))

    def _view_shape(self, name: str) -> torch.Size:
        return self._schemes[name].to_matrix(self._params[name].detach()[None]).shape

    def _is_large(self, name: str) -> bool:
        """One matrix above ``FULL_SVD_MAX`` singular values: only its leading triplets are computed."""
        shape = self._view_shape(name)
        return len(shape) == 3 and min(shape[-2:]) > svd_module.FULL_SVD_MAX

    def _device(self) -> torch.device:
        return next(iter(self._params.values())).device

    def _rank(self) -> int:
        return 0 if self._group is None else dist.get_rank(self._group)

    def _owners(self, whole: bool) -> dict[str, int]:
        """The rank that computes each layer's SVD: cost-balanced; under a whole-model criterion the
        large layers it counts go to rank 0, which computes their leading triplets as it allocates."""
        if self._group is None:
            return {n: 0 for n in self.layer_names}
        owners = owners_by_cost({n: self._view_shape(n) for n in self.layer_names}, self._group)
        if whole:
            owners.update({n: 0 for n in self._costs if self._is_large(n)})
        return owners

    # -- step 2 under a whole-model criterion ---------------------------------------------
    def _decide(self, spectra: list[_Spectra], large: dict[str, Tensor], owners: dict[str, int],
                criterion: Any = None) -> dict[str, int]:
        """Step 2: the whole-model ranks, decided on rank 0 from every layer's spectrum and broadcast
        (``criterion``: the one of this projection, default the target)."""
        sigma = {n: e.s[i] for e in spectra for i, n in enumerate(e.names)}
        if self._group is not None:  # every spectrum on rank 0 (large layers aside: it computes those)
            shapes = {n: self._view_shape(n) for n in self.layer_names if not (n in self._costs and self._is_large(n))}
            sigma = gather_spectra(sigma, shapes, owners, self._group, self._device())
        self._large_svds: dict[str, SVD] = {}
        ranks: Optional[dict[str, int]] = None
        error: Optional[BaseException] = None
        if self._rank() == 0:
            try:
                with _own_random_state(next(iter(self._params.values()))):
                    ranks = self._allocate_all(sigma, large, self.criterion if criterion is None else criterion)
            except Exception as err:  # the other ranks must hear of it, not wait for ranks forever
                if self._group is None:
                    raise
                error = err
        if self._group is not None:
            ranks = broadcast_ranks(ranks, self.layer_names, self._group, self._device(), repr(self.criterion))
            if error is not None:
                raise error
        assert ranks is not None
        self._share_calibration()
        return ranks

    def _allocate_all(self, sigma: dict[str, Tensor], large: dict[str, Tensor], criterion: Any) -> dict[str, int]:
        if not self._prepared:
            # A measured criterion profiles the model here, with the layers TRP trains.
            prepare_criterion(self.criterion, self.model, self.scheme, list(self.layer_names), self.input_shape)
        self._prepared = True
        if not large:
            return self.allocate(sigma, criterion)
        # Large layers inside the budget: only the leading triplets the ranks need (core.topspectra).
        layers = [LayerMatrix(n, large[n] if n in large else self._matrix([n])[0], *self._costs[n]) for n in self._costs]
        known = {n: (sigma[n], sigma[n], sigma[n]) for n in self._costs if n not in large}  # only S is read
        svds, given = allocate_leading(criterion, layers, self._fixed_macs, known=known)
        self._large_svds = {n: svds[n] for n in large}
        return self._checked_ranks(given, {n: int(min(self._view_shape(n)[-2:])) for n in self.layer_names})

    def _share_calibration(self) -> None:
        """Once: fix a measured criterion's calibration (rank 0's, on every rank), for every later allocation."""
        if self._calibration_shared or not callable(getattr(self.criterion, "calibration", None)):
            return
        state = self.criterion.calibration() if self._rank() == 0 else None
        if self._group is not None:
            state = broadcast_object(state, self._group)
        self._calibration = state
        if state is not None:
            self.criterion.fix_calibration(state)
        self._calibration_shared = True

    # -- whole-model criteria: MAC costs and allocation ----------------------------------
    def _init_target(self, targets: list[tuple[str, nn.Module]], period: Optional[int],
                     input_shape: Optional[Sequence[int]], example_inputs: Optional[Tensor], warmup: int) -> None:
        """Check the arguments of a whole-model criterion and count the MAC cost of every layer at every rank, once."""
        if period is None:
            raise ValueError(f"criterion={self.criterion!r} sets the ranks of the projections: give a period (not None)")
        check_int("warmup", warmup, 0, what="a number of iterations >= 0")
        if input_shape is None and example_inputs is not None:
            input_shape = (1, *example_inputs.shape[1:])
        if input_shape is None and getattr(self.criterion, "needs_input_shape", True):
            raise ValueError(
                f"criterion={self.criterion!r} counts the model's MACs: pass input_shape=(1, C, H, W) "
                "or example_inputs=a batch of inputs"
            )
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        convs_only = bool(getattr(self.criterion, "convs_only", False))
        modules = [m for _, m in targets]
        sizes = trace_sizes(self.model, modules, self.input_shape) if self.input_shape is not None else {}
        for name, module in targets:
            if convs_only and not isinstance(module, nn.Conv2d):
                continue  # outside the budget: keeps its full rank, as trp.decompose does
            sch = self._schemes[name]
            out_hw, in_hw = sizes.get(module) or sch.nominal_sizes(module)
            self._costs[name] = (sch.macs(module, None, out_hw, in_hw),
                                 functools.partial(sch.macs, module, out_hw=out_hw, in_hw=in_hw))
        if self.input_shape is not None:
            total = count_macs(self.model, self.input_shape, convs_only=convs_only)
            self._fixed_macs = total - sum(dense for dense, _ in self._costs.values())

    def _target_spec(self) -> Optional[str]:
        if not self.whole:
            return None
        spec = getattr(self.criterion, "spec", None)
        return spec() if callable(spec) else repr(self.criterion)

    def allocate(self, spectra: dict[str, Tensor], criterion: Any = None) -> dict[str, int]:
        """The whole-model criterion's rank for every layer, from each layer's singular values (``(k,)`` or batched);
        ``criterion`` replaces the target (e.g. a ramp's ``target.partway(f)``)."""
        if not self.whole:
            raise ValueError("this TRP has a per-layer criterion: build it with criterion=trp.TargetMACs(x)")
        layers = [LayerSpectrum(n, spectra[n], dense, macs) for n, (dense, macs) in self._costs.items()]
        given = (self.criterion if criterion is None else criterion).allocate(layers, self._fixed_macs)
        return self._checked_ranks(given, {n: int(spectra[n].shape[-1]) for n in self.layer_names})

    def _checked_ranks(self, given: dict[str, int], max_ranks: dict[str, int]) -> dict[str, int]:
        """The criterion's ranks for every layer, each checked against the layer's maximum rank."""
        ranks = {}
        for name in self.layer_names:
            max_rank = max_ranks[name]
            rank = int(given.get(name, max_rank))  # a layer the criterion leaves out stays full rank
            if not 1 <= rank <= max_rank:
                raise ValueError(f"target {self.criterion!r} gave layer {name!r} rank {rank} (1..{max_rank})")
            ranks[name] = rank
        return ranks
