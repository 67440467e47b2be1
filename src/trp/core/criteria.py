"""Rank criteria: map a descending spectrum of singular values to the rank to keep.

Every criterion is a callable ``criterion(sigma) -> int`` on a 1-D tensor sorted in
descending order, and also offers ``criterion.ranks(sigma)`` for a batch of spectra of
shape ``(..., k)`` returning an integer tensor of shape ``(...)``. The kept rank is
always at least 1 and at most ``k`` (SPEC §1.2).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from ..errors import one_line
from torch import Tensor

from ._util import warn_deprecated
from .allocation import Global, TargetMACs

__all__ = ["Criterion", "Energy", "Value", "Ratio", "FixedRank", "parse_criterion", "register_criterion"]


# The largest rank any criterion may name: more than any layer has, small enough for an int32 index.
MAX_RANK = 2**31 - 1

class Criterion(ABC):
    """Base class: subclasses implement :meth:`_ranks` on a batch of spectra."""

    scale_free = False  # True: ranks depend on ratios of singular values only (spectra are normalised first)

    def __call__(self, sigma: Tensor) -> int:
        """Kept rank for one descending 1-D spectrum."""
        if sigma.ndim != 1:
            raise ValueError(f"expected a 1-D spectrum, got shape {tuple(sigma.shape)}")
        return int(self.ranks(sigma).item())

    def ranks(self, sigma: Tensor) -> Tensor:
        """Kept ranks for a batch of descending spectra of shape ``(..., k)``."""
        if sigma.shape[-1] == 0:
            raise ValueError("empty spectrum: a matrix view with no singular values")
        sigma = sigma.detach()
        if self.scale_free:  # the rank depends on ratios only: normalise before squaring (no overflow)
            top = sigma.abs().amax(-1, keepdim=True)
            sigma = torch.where(top > 0, sigma / torch.where(top > 0, top, torch.ones_like(top)), sigma)
        r = self._ranks(sigma.float())
        return r.clamp(min=1, max=sigma.shape[-1]).to(torch.long)

    @abstractmethod
    def _ranks(self, sigma: Tensor) -> Tensor: ...

    @abstractmethod
    def spec(self) -> str:
        """The criterion as a CLI string, e.g. ``energy:0.9``."""


class Energy(Criterion):
    """Smallest rank ``r`` with ``sum(σ[:r]²) / sum(σ²) >= e``, for ``e`` in (0, 1]."""

    scale_free = True

    def __init__(self, e: float) -> None:
        if not (isinstance(e, (int, float)) and 0.0 < e <= 1.0):
            raise ValueError(f"Energy: e must lie in (0, 1], got {e!r}")
        self.e = float(e)

    def _ranks(self, sigma: Tensor) -> Tensor:
        energy = sigma.square().cumsum(-1)
        total = energy[..., -1:]
        # An all-zero spectrum has no energy to keep: rank 1.
        frac = torch.where(total > 0, energy / total.clamp_min(torch.finfo(energy.dtype).tiny), 1.0)
        # Count prefixes whose energy is still short of e; a tiny slack absorbs rounding.
        return (frac < self.e - 1e-6).sum(-1) + 1

    def spec(self) -> str:
        return f"energy:{self.e:g}"

    def __repr__(self) -> str:
        return f"Energy({self.e:g})"


class Value(Criterion):
    """Rank ``#{σ >= t}`` for an absolute threshold ``t >= 0`` (at least 1)."""

    def __init__(self, t: float) -> None:
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0.0):
            raise ValueError(f"Value: t must be a finite number >= 0, got {t!r}")
        self.t = float(t)

    def _ranks(self, sigma: Tensor) -> Tensor:
        return (sigma >= self.t).sum(-1)

    def spec(self) -> str:
        return f"value:{self.t:g}"

    def __repr__(self) -> str:
        return f"Value({self.t:g})"


class Ratio(Criterion):
    """Keep ``ceil(p · k)`` of the ``k`` singular values, for ``p`` in (0, 1]."""

    def __init__(self, p: float) -> None:
        if not (isinstance(p, (int, float)) and 0.0 < p <= 1.0):
            raise ValueError(f"Ratio: p must lie in (0, 1], got {p!r}")
        self.p = float(p)

    def _ranks(self, sigma: Tensor) -> Tensor:
        k = sigma.shape[-1]
        r = math.ceil(round(self.p * k, 9))
        return torch.full(sigma.shape[:-1], r, dtype=torch.long, device=sigma.device)

    def spec(self) -> str:
        return f"ratio:{self.p:g}"

    def __repr__(self) -> str:
        return f"Ratio({self.p:g})"


class FixedRank(Criterion):
    """Keep ``min(k, len(σ))`` singular values, for an integer ``k >= 1``."""

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_RANK:
            raise ValueError(f"FixedRank: k must be an integer from 1 to {MAX_RANK:,} (no layer has a larger rank), "
                             f"got {k if len(str(k)) < 30 else str(k)[:27] + '...'}")
        self.k = k

    def _ranks(self, sigma: Tensor) -> Tensor:
        return torch.full(sigma.shape[:-1], self.k, dtype=torch.long, device=sigma.device)

    def spec(self) -> str:
        return f"rank:{self.k}"

    def __repr__(self) -> str:
        return f"FixedRank({self.k})"


def _mac_target(v: str, cls_name: str):
    number, _, scope = v.partition(":")
    if scope not in ("", "convs"):
        raise ValueError(f"the scope after the MAC reduction must be 'convs', got {scope!r}")
    if cls_name == "TargetMACs":
        return TargetMACs(float(number), convs_only=scope == "convs")
    return Global(mac_reduction=float(number), convs_only=scope == "convs")


#: deprecated criterion kinds (MAC reductions once called speedups) and their new spelling
OLD_KINDS = {"speedup": "macs", "global-speedup": "global-macs"}


def current_spelling(text: str) -> str:
    """``text`` with a deprecated kind respelled (``speedup:3`` -> ``macs:3``), silently: for specs read back from
    files written before the rename (checkpoints, summaries)."""
    kind, sep, value = text.partition(":")
    new = OLD_KINDS.get(kind.strip().lower())
    return f"{new}:{value}" if sep and new is not None else text


def canonical_criterion(text: str) -> str:
    """``text`` with a deprecated kind respelled (``speedup:3`` -> ``macs:3``, ``global-speedup:3`` ->
    ``global-macs:3``), warning once; any other string unchanged."""
    kind, sep, value = text.partition(":")
    new = OLD_KINDS.get(kind.strip().lower())
    if not sep or new is None:
        return text
    warn_deprecated(f"the criterion {kind.strip().lower()}:X", f"{new}:X", stacklevel=4)
    return f"{new}:{value}"


def _global(v: str):
    return Global(drop=float(v))


_PARSERS = {
    "energy": lambda v: Energy(float(v)),
    "value": lambda v: Value(float(v)),
    "ratio": lambda v: Ratio(float(v)),
    "rank": lambda v: FixedRank(int(v)),
    "macs": lambda v: _mac_target(v, "TargetMACs"),
    "global": _global,
    "global-macs": lambda v: _mac_target(v, "Global"),
}


_EXTRA_HELP: dict[str, str] = {}


def register_criterion(kind: str, parser: Callable[[str], Any], usage: str) -> None:
    """Make ``kind:VALUE`` strings parse with ``parser(VALUE)`` (e.g. ``latency`` from :mod:`trp.deploy`).

    ``usage`` is the form shown in error messages, e.g. ``latency:X``. Kinds built in here
    cannot be replaced.
    """
    kind = kind.strip().lower()
    if kind in _PARSERS and kind not in _EXTRA_HELP:
        raise ValueError(f"criterion kind {kind!r} is built in and cannot be registered again")
    _PARSERS[kind] = parser
    _EXTRA_HELP[kind] = usage


def parse_criterion(text: str):
    """Parse a criterion string.

    Per layer: ``energy:0.9``, ``value:0.05``, ``ratio:0.5``, ``rank:8``. Whole model
    (:mod:`trp.core.allocation`): ``macs:3`` (:class:`TargetMACs`, a MAC reduction of 3;
    ``macs:3:convs`` counts conv MACs only), ``global:0.5`` (:class:`Global` dropping half of the pooled
    normalized singular values) and ``global-macs:3``. The former spellings ``speedup:X`` and
    ``global-speedup:X`` are read the same, with a DeprecationWarning (once).
    """
    text = canonical_criterion(text)
    kind, sep, value = text.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in _PARSERS:
        raise ValueError(
            f"criterion {text!r} not understood: use energy:E, value:T, ratio:P, rank:K, "
            "macs:X (a MAC reduction), global:P, global-macs:X" + "".join(f", {u}" for u in _EXTRA_HELP.values())
            + " (e.g. value:0.05)"
        )
    try:
        return _PARSERS[kind](value.strip())
    except (OverflowError, ArithmeticError) as err:
        raise ValueError(f"criterion {text!r}: a number is out of range ({err})") from None
    except ValueError as err:
        if kind == "rank" and "invalid literal" in str(err):
            raise ValueError(f"criterion {text!r}: rank needs an integer, e.g. rank:8") from None
        if "could not convert" in str(err):
            raise ValueError(f"criterion {text!r}: {value!r} is not a number") from None
        if "invalid literal" in str(err) or "criterion" not in str(err):
            raise ValueError(f"criterion {text!r}: {one_line(err)}") from None
        raise
