"""Checks that a split is exact: parents reading a layer's weight, and a run of the split model.

Two layers in place of one are only exact when the code around a layer *calls* it. Some
parents read a child's ``.weight`` directly (torchvision Swin's ``F.linear(x, self.qkv.weight)``,
Hugging Face T5's ``self.wo.weight.dtype``); after a split that code would crash or compute
something else. :func:`direct_weight_readers` finds them by reading the parents' source
(every method but the constructor and weight initializers) for ``self.<child>.weight``/``.bias``.
:func:`split_targets` is the one selection every method uses (``decompose`` splits these layers,
``TRP`` trains them low rank, LoRITa over-parameterizes them): the selected layers less those read
directly, so no method trains a layer low rank that ``decompose`` will then leave dense.

:func:`check_split` runs a decomposed model on example inputs and compares it with the dense
one: each split layer, fed the input it received in the dense model, must match the dense
layer with the truncated weight; the whole split model must run, give outputs of the same
structure and shapes, and be finite where the dense output is. ``decompose`` runs the whole
model in eval mode under ``torch.no_grad()`` and under ``torch.inference_mode()`` (PyTorch's
fused fast paths, e.g. ``nn.TransformerEncoderLayer``'s, read weights only there) and in the
mode it came in; a layer found read directly in any of them stays dense.
"""

from __future__ import annotations

import inspect
import re
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .layers import LayerSelector, select_layers
from .targets import dense_forward

__all__ = ["split_targets", "direct_weight_readers", "run_model", "record_layer_inputs", "check_layer", "check_outputs"]

_READ = re.compile(r"self\.((?:\w+\.)*\w+)\.(weight|bias)\b")


@lru_cache(maxsize=None)
def _reads_of(cls: type) -> tuple[tuple[str, str], ...]:
    """``(child path, attribute)`` pairs that methods of ``cls`` read as ``self.<path>.<attr>``."""
    found: set[tuple[str, str]] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.startswith("torch.nn.modules.module"):
            continue
        for attr, fn in vars(klass).items():
            if not inspect.isfunction(fn) or "init" in attr.lower() or attr.startswith("reset"):
                continue
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            found.update(_READ.findall(source))
    return tuple(sorted(found))


def _converted(module: nn.Module, places: dict[int, int]) -> bool:
    """``module`` is, or will be before any split, a :class:`~trp.core.attention.SplitMultiheadAttention`:
    :func:`~trp.core.attention.convert_attention` replaces every ``nn.MultiheadAttention`` used at one place."""
    from .attention import SplitMultiheadAttention

    return isinstance(module, SplitMultiheadAttention) or (
        isinstance(module, nn.MultiheadAttention) and places.get(id(module), 0) == 1)


def _fast_path_only(parent: nn.Module, places: dict[int, int]) -> bool:
    """``nn.TransformerEncoderLayer`` reads its linears' weights only on its fast path, which is
    off once its attention is a :class:`~trp.core.attention.SplitMultiheadAttention`."""
    return isinstance(parent, nn.TransformerEncoderLayer) and _converted(parent.self_attn, places)


def direct_weight_readers(model: nn.Module) -> dict[str, str]:
    """``{layer name: reason}`` for the layers whose ``weight``/``bias`` a parent reads directly.

    ``nn.MultiheadAttention`` (which reads ``out_proj.weight``) does not count when it is used at one
    place: ``decompose`` converts it into a module that calls its projections before splitting.
    """
    places: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        places[id(m)] = places.get(id(m), 0) + 1
    found: dict[str, str] = {}
    for name, parent in model.named_modules():
        reads = _reads_of(type(parent))
        if not reads or _fast_path_only(parent, places) or _converted(parent, places):
            continue
        for path, attr in reads:
            child = f"{name}.{path}" if name else path
            if child not in found:
                found[child] = (f"{type(parent).__name__} ({name or 'the model'}) reads self.{path}.{attr} "
                                "directly, which a split layer does not have")
    return found


def split_targets(
    model: nn.Module, layers: LayerSelector = None, exclude: Sequence[str] = (), scheme: str = "channel"
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """The layers trp may split: ``(name, module)`` targets and ``(name, reason)`` for those skipped.

    :func:`~trp.core.layers.select_layers`, less the layers whose weight a parent reads directly
    (:func:`direct_weight_readers`). ``decompose`` splits these, ``TRP`` trains these low rank.
    """
    targets, skipped = select_layers(model, layers, exclude, scheme)
    readers = direct_weight_readers(model)
    skipped += [(n, readers[n]) for n, _ in targets if n in readers]
    return [(n, m) for n, m in targets if n not in readers], skipped


def run_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model`` on ``example_inputs``: a tensor, a tuple/list of positional inputs, or a dict of keywords."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _eval_no_grad(model: nn.Module, fn: Callable[[], Any]) -> Any:
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return fn()
    finally:
        for m, mode in modes:
            m.training = mode


def record_layer_inputs(model: nn.Module, layers: dict[str, nn.Module], example_inputs: Any) -> tuple[Any, dict[str, Tensor]]:
    """The dense model's output on ``example_inputs`` and the first input each named layer received."""
    seen: dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in seen and args and isinstance(args[0], Tensor):
                seen[name] = args[0].detach().clone()
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        output = _eval_no_grad(model, lambda: run_model(model, example_inputs))
    finally:
        for h in handles:
            h.remove()
    return output, seen


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def check_layer(name: str, dense: nn.Module, split: nn.Module, x: Tensor, weight: Tensor,
                bias: Optional[Tensor] = None) -> Optional[str]:
    """Why ``split(x)`` differs from ``dense`` applied with ``weight`` (the truncated one), or None.

    ``bias``: the split's bias when it differs from the dense layer's (a calibrated split moves the
    mean of what it discards into the bias)."""
    with torch.no_grad():
        expected = dense_forward(dense, x, weight.to(dense.weight.dtype), bias)
        try:
            got = _eval_no_grad(split, lambda: split(x))
        except Exception as err:  # noqa: BLE001 - reported with the layer's name
            return f"layer {name!r}: the split layer fails on the input the dense layer received: {err}"
    if got.shape != expected.shape:
        return f"layer {name!r}: the split layer gives shape {tuple(got.shape)}, the dense layer {tuple(expected.shape)}"
    err = (got.double() - expected.double()).norm() / (expected.double().norm() + 1e-12)
    if not torch.isfinite(err) or err > _tolerance(expected.dtype):
        return f"layer {name!r}: the split layer differs from the truncated dense layer by {float(err):.2e} (relative)"
    return None


def check_outputs(dense_output: Any, split_output: Any) -> Optional[str]:
    """Why the split model's output does not match the dense output's structure, shapes, finiteness."""
    d_leaves, d_spec = pytree.tree_flatten(dense_output)
    s_leaves, s_spec = pytree.tree_flatten(split_output)
    if d_spec != s_spec:
        return f"the split model's output has another structure ({s_spec}) than the dense model's ({d_spec})"
    for i, (d, s) in enumerate(zip(d_leaves, s_leaves)):
        if isinstance(d, Tensor) != isinstance(s, Tensor):
            return f"output {i}: a tensor in one model and not in the other"
        if not isinstance(d, Tensor):
            continue
        if d.shape != s.shape:
            return f"output {i}: shape {tuple(s.shape)} after the split, {tuple(d.shape)} before"
        if d.is_floating_point() and bool(torch.isfinite(d).all()) and not bool(torch.isfinite(s).all()):
            return f"output {i}: the split model gives non-finite values where the dense model does not"
    return None
