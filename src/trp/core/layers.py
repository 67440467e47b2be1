"""Which layers of a model are low-rank targets.

Candidates are the one-weight linear layers of :mod:`trp.core.targets` (Linear, Conv1d,
Conv2d, Hugging Face Conv1D), in definition order; layers inside an already factorized
:class:`~trp.core.schemes.LowRank` are never candidates. ``layers`` chooses among them:

- ``None`` or ``"default"``: every candidate except the network's first conv (the stem) and
  its last linear layer (the classifier); 1×1 and grouped convs included.
- ``"paper"``: the reference code's selection (SPEC §1.3): every ``Conv2d`` except the first
  and except 1×1 convs, every ``Linear`` except the last. The paper's configs use it.
- ``"all"``: every candidate.
- a list of module names and/or glob patterns (``fnmatch``: ``layer1.*``, ``*.attn.*``).
- a predicate ``(name, module) -> bool``.

``exclude`` (glob patterns) then removes layers. A chosen layer that cannot be split exactly is
reported as skipped with the reason: a module used at two places (the same object under two
names), a layer whose weight is tied to another module's, and what
:func:`trp.core.targets.split_reason` refuses (depthwise convs, unknown subclasses with their
own ``forward``, ...).
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from typing import Callable, Iterable, Optional, Sequence, Union

from torch import nn

from .schemes import LowRank
from .targets import is_candidate, layer_kind, split_reason

__all__ = ["LayerSelector", "NAMED_SELECTIONS", "select_layers", "set_module", "summarize_skipped", "skipped_inline"]

LayerSelector = Optional[Union[str, Sequence[str], Callable[[str, nn.Module], bool]]]

NAMED_SELECTIONS = ("default", "paper", "all")

_GLOB = set("*?[")


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Candidate modules in definition order, excluding those inside LowRank.

    A model holding a wrapper that refuses splitting (see the module docstring) raises ValueError.
    """
    inside: set[str] = set()
    found = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        refuse = getattr(module, "refuse_split", None)
        if callable(refuse):
            raise ValueError(f"layer {name!r}: {refuse()}")
        if isinstance(module, LowRank):
            inside.add(name)
            continue
        if is_candidate(module):
            found.append((name, module))
    return found


def _is_conv(module: nn.Module) -> bool:
    return layer_kind(module) in ("conv1d", "conv2d")


def _default(candidates: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    convs = [n for n, m in candidates if _is_conv(m)]
    linears = [n for n, m in candidates if not _is_conv(m)]
    drop = {convs[0] if convs else None, linears[-1] if linears else None}
    return [(n, m) for n, m in candidates if n not in drop]


def _paper(candidates: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    convs = [n for n, m in candidates if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in candidates if isinstance(m, nn.Linear)]
    first_conv = convs[0] if convs else ""
    last_linear = linears[-1] if linears else ""
    chosen = []
    for n, m in candidates:
        if isinstance(m, nn.Conv2d):
            if n != first_conv and tuple(m.kernel_size) != (1, 1):
                chosen.append((n, m))
        elif isinstance(m, nn.Linear) and n != last_linear:
            chosen.append((n, m))
    return chosen


def _matching(pattern: str, candidates: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in candidates if fnmatch.fnmatchcase(n, pattern)]


def _by_names(model: nn.Module, names: Iterable[str], candidates: list[tuple[str, nn.Module]]):
    modules = dict(model.named_modules())
    chosen: dict[str, nn.Module] = {}
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"layers must hold module names or glob patterns, got {name!r}")
        if _GLOB & set(name):
            hits = _matching(name, candidates)
            if not hits:
                raise ValueError(
                    f"layer pattern {name!r} matches no splittable layer; names look like "
                    f"{[n for n, _ in candidates[:3]]}"
                )
            chosen.update(hits)
            continue
        if name not in modules:
            raise ValueError(
                f"layer {name!r} not found in the model; names look like {[n for n, _ in candidates[:3]]}"
            )
        module = modules[name]
        if not is_candidate(module):
            raise ValueError(
                f"layer {name!r} is a {type(module).__name__}; only Linear, Conv1d, Conv2d (and "
                "Hugging Face Conv1D) layers can be factorized"
            )
        chosen[name] = module
    return list(chosen.items())


def _sharing(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Module names per module object and per parameter object (duplicates kept)."""
    by_module: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        by_module[id(module)].append(name)
    by_param: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            entry = f"{name}.{pname}" if name else pname
            if entry not in by_param[id(param)]:
                by_param[id(param)].append(entry)
    return by_module, by_param


def _shared_reason(name: str, module: nn.Module, by_module, by_param) -> Optional[str]:
    places = by_module.get(id(module), [])
    if len(places) > 1:
        return (f"the same module object is used at {len(places)} places ({', '.join(places)}); "
                "splitting it at one would untie them")
    weight = getattr(module, "weight", None)
    if weight is not None:
        own = f"{name}.weight" if name else "weight"
        others = [p for p in by_param.get(id(weight), []) if p != own and not p.startswith(f"{name}.")]
        owners = {p.rpartition(".")[0] for p in by_param.get(id(weight), [])}
        if others and len(owners) > 1:
            return f"its weight is tied to {others[0]}; splitting it would untie them"
    return None


def select_layers(
    model: nn.Module,
    layers: LayerSelector = None,
    exclude: Sequence[str] = (),
    scheme: str = "channel",
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """Selected ``(name, module)`` targets, and ``(name, reason)`` for selected layers skipped.

    ``layers``/``exclude`` as in the module docstring; ``scheme`` is the conv scheme the
    layers will be split with (grouped convs and Conv1d only split under ``channel``).
    """
    candidates = _candidates(model)
    if layers is None or layers == "default":
        chosen = _default(candidates)
    elif layers == "paper":
        chosen = _paper(candidates)
    elif layers == "all":
        chosen = list(candidates)
    elif isinstance(layers, str):
        raise ValueError(
            f"layers={layers!r}: a string names a selection ({', '.join(NAMED_SELECTIONS)}); pass a list for "
            "module names or glob patterns, e.g. layers=[" + repr(layers) + "]"
        )
    elif callable(layers):
        chosen = [(n, m) for n, m in candidates if layers(n, m)]
    else:
        chosen = _by_names(model, layers, candidates)
    if isinstance(exclude, str):
        exclude = [exclude]
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in candidates):
            raise ValueError(f"exclude pattern {pattern!r} matches no splittable layer of the model")
        chosen = [(n, m) for n, m in chosen if not fnmatch.fnmatchcase(n, pattern)]
    by_module, by_param = _sharing(model)
    targets, skipped = [], []
    for name, module in chosen:
        reason = _shared_reason(name, module, by_module, by_param) or split_reason(module, scheme)
        if reason is None:
            targets.append((name, module))
        else:
            skipped.append((name, reason))
    return targets, skipped


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _reason_kind(reason: str) -> str:
    """What a skip reason says, less the details that differ from layer to layer (names, sizes)."""
    import re

    text = reason
    while True:
        shorter = re.sub(r"\([^()]*\)", "", text)
        if shorter == text:
            break
        text = shorter
    text = re.sub(r"'[^']*'|\S*\.\S*", "_", text)  # quoted names and dotted paths
    text = re.sub(r"\d+", "N", text)
    return " ".join(text.split())


def _grouped(skipped: Sequence[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    groups: dict[str, list[tuple[str, str]]] = {}
    for name, reason in skipped:
        groups.setdefault(_reason_kind(reason), []).append((name, reason))
    return list(groups.values())


def skipped_inline(skipped: Sequence[tuple[str, str]], shown: int = 3) -> str:
    """One clause per kind of reason: the first layer with its reason, then how many more and their names."""
    parts = []
    for items in _grouped(skipped):
        (first, reason), rest = items[0], items[1:]
        more = ""
        if rest:
            names = ", ".join(n for n, _ in rest[:shown]) + (", ..." if len(rest) > shown else "")
            more = f" and {len(rest)} more for the same reason ({names})"
        parts.append(f"{first} ({reason}){more}")
    return "; ".join(parts)


def summarize_skipped(skipped: Sequence[tuple[str, str]], shown: int = 3) -> list[str]:
    """One line per kind of reason: how many layers, the first ``shown`` names, and one reason in full."""
    lines = []
    for items in _grouped(skipped):
        names = ", ".join(n for n, _ in items[:shown]) + (f", ... ({len(items) - shown} more)" if len(items) > shown else "")
        lines.append(f"{len(items)} × {names}: {items[0][1]}")
    return lines
