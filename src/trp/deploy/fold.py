"""Fold BatchNorm into the layer before it, for inference.

In eval mode a BatchNorm is an affine map per channel, so when it directly follows a conv or
linear (a dense one, or the second layer of a trp split) it can be merged into that layer's
weight and bias. Which layer feeds which BatchNorm is read from a torch.fx trace of the model;
where the whole model cannot be traced, each submodule is traced on its own, with the parts that
still cannot be traced kept opaque. A BatchNorm is folded only when the trace proves it safe (its
input is the output of a conv/linear used nowhere else); every other BatchNorm stays, with the
reason in the report. Beyond torch's own layers, timm's ``BatchNormAct2d`` (BatchNorm, dropout,
activation in one module) folds its BatchNorm and keeps its dropout and activation, and a layer
with a standard form that applies its stored weight (:mod:`trp.core.equivalents`: timm's
``Conv2dSame``, static "same" padding convs, registered classes) is replaced by that form (the
padding, then a plain conv) and takes the BatchNorm like a plain conv.
"""

from __future__ import annotations

import copy
import types
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx, nn

from ..core.equivalents import own_forward, standard_form

__all__ = ["fold_batchnorm", "fold_batchnorm_with_report", "FoldReport"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_FOLDABLE = {nn.BatchNorm1d: (nn.Linear, nn.Conv1d), nn.BatchNorm2d: (nn.Conv2d,)}


@dataclass
class FoldReport:
    """The folded model, which BatchNorm went into which layer, and which stayed and why."""

    model: nn.Module
    folded: list[tuple[str, str]] = field(default_factory=list)  # (batchnorm, layer it went into)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (batchnorm, reason)

    def __repr__(self) -> str:
        return f"FoldReport({len(self.folded)} BatchNorm folded, {len(self.kept)} kept)"


class _Tracer(fx.Tracer):
    def __init__(self, opaque: set[int]) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # Layers and BatchNorms of other libraries (timm's) are nodes too, never traced through.
        return (id(m) in self.opaque or isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Linear, nn.Conv1d, nn.Conv2d))
                or super().is_leaf_module(m, qualname))


def _trace(module: nn.Module, opaque: set[int]) -> fx.Graph:
    return _Tracer(opaque).trace(module)


def _traced_roots(module: nn.Module, prefix: str, opaque: set[int],
                  failures: dict[str, str]) -> list[tuple[str, nn.Module, fx.Graph]]:
    """Largest traceable submodules: ``(name, module, graph)``; untraceable ones join ``opaque``."""
    try:
        return [(prefix, module, _trace(module, opaque))]
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...) on control flow
        first_error = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    roots: list[tuple[str, nn.Module, fx.Graph]] = []
    for name, child in module.named_children():
        if len(list(child.children())) == 0:
            continue  # a leaf (conv, BN, ...) is a node of its parent's trace, not a root
        roots += _traced_roots(child, f"{prefix}{name}.", opaque, failures)
    try:  # again, with the untraceable children as opaque leaves
        return [(prefix, module, _trace(module, opaque))]
    except Exception as err:
        failures[prefix.rstrip(".") or "<model>"] = f"{type(err).__name__}: {err}".splitlines()[0][:200] \
            or first_error
        opaque.add(id(module))
        return roots


def _plain(module: nn.Module, kinds: tuple[type, ...]) -> bool:
    """``module`` is one of ``kinds`` with that kind's own forward (not a wrapper overriding it), or a
    layer whose standard form (:mod:`trp.core.equivalents`: padding, then a plain layer applying
    the stored weight, e.g. timm ``Conv2dSame``) is: scaling its output channels is exact."""
    std = standard_form(module) if isinstance(module, kinds) else None
    if std is not None:
        return isinstance(std.core, kinds) and std.applies_stored_weight(module)
    return any(isinstance(module, k) and type(module).forward is k.forward and not own_forward(module) for k in kinds)


def _bn_act(bn: nn.Module) -> bool:
    """timm's ``BatchNormAct2d``: ``act(drop(batch_norm(x)))``, foldable as a BatchNorm2d."""
    cls = type(bn)
    return (cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm.")
            and isinstance(getattr(bn, "drop", None), nn.Module) and isinstance(getattr(bn, "act", None), nn.Module))


def _foldable_kind(bn: nn.Module) -> Optional[type]:
    """The plain BatchNorm class ``bn`` computes as, or None when trp cannot fold it."""
    if type(bn) in _BN:
        return type(bn)
    return nn.BatchNorm2d if _bn_act(bn) else None


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    w = layer.weight
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double() + bn.bias.double()
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    new_w = (w.double() * scale.reshape(-1, *([1] * (w.ndim - 1)))).to(w.dtype)
    new_b = (bias * scale + shift).to(w.dtype)
    layer.weight = nn.Parameter(new_w, requires_grad=False)
    layer.bias = nn.Parameter(new_b, requires_grad=False)


def _why_not(bn_node: fx.Node, bn: nn.Module, modules: dict[str, nn.Module], calls: dict[str, int],
             attrs: set[str], aliases: dict[int, int]) -> Optional[str]:
    """None when ``bn_node`` can be folded into the layer producing its input, else why not."""
    if not bn.track_running_stats or bn.running_mean is None:
        return "it has no running statistics (track_running_stats=False): it normalizes with batch statistics"
    if calls[bn_node.target] != 1:
        return "the BatchNorm module is called more than once"
    if len(bn_node.args) != 1 or bn_node.kwargs or not isinstance(bn_node.args[0], fx.Node):
        return "it is not called on a single tensor"
    prev = bn_node.args[0]
    if prev.op != "call_module":
        return f"its input is not the output of a module (it comes from {prev.op} {prev.target})"
    layer = modules[prev.target]
    kinds = _FOLDABLE.get(_foldable_kind(bn), ())
    if not _plain(layer, kinds):
        return f"the layer before it ({prev.target}, {type(layer).__name__}) is not a {'/'.join(k.__name__ for k in kinds)}"
    if len(prev.users) != 1:
        return f"the output of {prev.target} is also used elsewhere, not only by the BatchNorm"
    if calls[prev.target] != 1:
        return f"{prev.target} is called more than once"
    if any(a == prev.target or a.startswith(prev.target + ".") for a in attrs):
        return f"the parameters of {prev.target} are read elsewhere in the forward"
    if aliases.get(id(layer), 1) > 1 or aliases.get(id(bn), 1) > 1:
        return f"{prev.target} or the BatchNorm is shared under several names in the model"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return f"{prev.target} has {out} output channels but the BatchNorm {bn.num_features}"
    return None


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError(
            "this model has its BatchNorm folded into the layers before it and is inference-only: "
            "train the unfolded model, then call trp.fold_batchnorm on it again"
        )
    return nn.Module.train(self, False)


def fold_batchnorm_with_report(model: nn.Module) -> FoldReport:
    """Like :func:`fold_batchnorm`, also returning which BatchNorm was folded and which stayed (why)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    new = copy.deepcopy(model).eval()
    norms = {name: m for name, m in new.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    report = FoldReport(new)
    aliases: dict[int, int] = {}
    for _, m in new.named_modules(remove_duplicate=False):
        aliases[id(m)] = aliases.get(id(m), 0) + 1
    failures: dict[str, str] = {}
    roots = _traced_roots(new, "", set(), failures)
    seen: set[str] = set()
    plan: list[tuple[str, str]] = []
    for prefix, root, graph in roots:
        modules = {f"{prefix}{n}": m for n, m in root.named_modules()}
        calls: dict[str, int] = {}
        attrs: set[str] = set()
        for node in graph.nodes:
            if node.op == "call_module":
                node.target = f"{prefix}{node.target}"
                calls[node.target] = calls.get(node.target, 0) + 1
            elif node.op == "get_attr":
                attrs.add(f"{prefix}{node.target}")
        for node in graph.nodes:
            if node.op != "call_module" or node.target not in norms or node.target in seen:
                continue
            seen.add(node.target)
            bn = norms[node.target]
            if _foldable_kind(bn) is None:
                report.kept.append((node.target, f"{type(bn).__name__} is not BatchNorm1d/2d (or timm's BatchNormAct2d)"))
                continue
            reason = _why_not(node, bn, modules, calls, attrs, aliases)
            if reason is None:
                plan.append((node.target, node.args[0].target))
            else:
                report.kept.append((node.target, reason))
    for name in norms:
        if name not in seen:
            parent = name.rpartition(".")[0] or "<model>"
            err = failures.get(parent, next(iter(failures.values()), "not called in the forward"))
            report.kept.append((name, f"torch.fx could not trace the module that uses it ({parent}: {err})"))
    for bn_name, layer_name in plan:
        layer = new.get_submodule(layer_name)
        std = standard_form(layer)
        if std is not None:  # the layer becomes its standard form: padding, then the plain layer
            _set(new, layer_name, std.module())
            layer = std.core
        _fold_into(layer, norms[bn_name])
        parent, _, attr = bn_name.rpartition(".")
        bn = norms[bn_name]
        rest = nn.Sequential(bn.drop, bn.act) if _bn_act(bn) else nn.Identity()
        setattr(new.get_submodule(parent) if parent else new, attr, rest)
        report.folded.append((bn_name, layer_name))
    new.eval()
    for p in new.parameters():
        p.requires_grad_(False)
    new.train = types.MethodType(_eval_only_train, new)  # type: ignore[method-assign]
    return report


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-only copy of ``model`` with each BatchNorm folded into the conv/linear before it.

    Folds into dense Conv1d/Conv2d/Linear layers and into the second layer of a trp split
    (:class:`trp.LowRank`). A BatchNorm that cannot be proven safe to fold stays, with a
    warning naming it and the reason. The copy uses the running statistics (eval mode) whatever
    mode ``model`` is in, and calling ``.train()`` on it raises. ``model`` is not modified.
    """
    report = fold_batchnorm_with_report(model)
    if report.kept:
        warnings.warn(
            f"trp.fold_batchnorm left {len(report.kept)} BatchNorm(s) unfolded: "
            + "; ".join(f"{n} ({r})" for n, r in report.kept[:5])
            + (" ..." if len(report.kept) > 5 else ""),
            stacklevel=2,
        )
    return report.model
