"""Small shared helpers: strict number checks, an eval-mode context, seeded example inputs, and
what counts as a whole-model rank criterion.

The number checks refuse what Python would quietly accept: ``True`` for an integer, ``2.5``
for an integer, NaN and the infinities for a bounded number. Each raises ``ValueError``
naming the argument, what it must be, and the value given. Importing this module does not
import torch (the settings of :mod:`trp.methods.trp_config` are read by the command line's
``--help``).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

__all__ = ["check_int", "check_number", "check_fraction", "eval_mode", "seeded_inputs", "is_whole_model"]


def is_whole_model(criterion: Any) -> bool:
    """Whether ``criterion`` chooses every layer's rank at once: it has ``allocate`` (a
    :class:`trp.core.allocation.WholeModelCriterion`, or any object with the same methods; the
    optional ones, ``prepare``, ``leading_bound``, ``leading_needed`` and ``needs_input_shape``,
    default to doing nothing, no bound, all of the spectrum, and True)."""
    return callable(getattr(criterion, "allocate", None))


def check_int(name: str, value: Any, low: Optional[int] = None, *, none_means: Optional[str] = None,
              what: Optional[str] = None) -> Optional[int]:
    """``value`` when it is an integer (not a bool) ``>= low``; None is accepted when ``none_means`` says what it means."""
    if value is None and none_means is not None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        if what is None:
            what = "a positive integer" if low == 1 else ("an integer" if low is None else f"an integer >= {low}")
        extra = f" (or None {none_means})" if none_means is not None else ""
        raise ValueError(f"{name} must be {what}{extra}, got {value!r}")
    return value


def check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False, what: Optional[str] = None) -> float:
    """``float(value)`` when it is a real number (not a bool) in the interval given; NaN is refused."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if what is None:
            left = "(" if low_open else "["
            right = ")" if high_open else "]"
            what = f"a number in {left}{low:g}, {high:g}{right}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    """A number in (0, 1], such as an energy fraction."""
    return check_number(name, value, 0.0, 1.0, low_open=True, what="a number that lies in (0, 1]")


@contextlib.contextmanager
def eval_mode(*models: "nn.Module") -> Iterator[None]:
    """Every module of ``models`` in eval mode for the block; each module's own mode is restored afterwards."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def seeded_inputs(model: nn.Module, shape: Sequence[int], seed: int = 0, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Standard normal inputs of ``shape`` from a generator seeded with ``seed``, on the model's device.

    Drawn on the CPU (the same numbers on every device) without touching the global random
    state; ``dtype`` defaults to float32.
    """
    import torch

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(int(d) for d in shape), generator=gen).to(device=device, dtype=dtype or torch.float32)


#: the deprecated names that have warned in this process (each warns once; tests may clear it)
WARNED: set[str] = set()


def warn_deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """A DeprecationWarning, once per process, that ``old`` is deprecated in favour of ``new``.

    The MAC-based names say "MAC reduction" since issue 21: "speedup" is kept for measured time.
    """
    if old in WARNED:
        return
    WARNED.add(old)
    import warnings

    warnings.warn(f"{old} is deprecated: use {new} (the same MAC reduction; 'speedup' now means measured time only)",
                  DeprecationWarning, stacklevel=stacklevel)
