"""Standard forms of layers trp does not know: a registry, checked numerically before use.

A subclass of ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` with a ``forward`` of its own (static or
dynamic "same" padding, weight standardization, ...) computes something trp cannot read off
its weight. Its *standard form* is a plain layer (a Linear/Conv1d/Conv2d with the base class's
forward), optionally after parameter-free modules such as ``nn.ZeroPad2d``, that computes the
same thing. Once trp has one, every part of trp sees the standard form:

- selection (:func:`trp.core.safety.split_targets`, so ``decompose`` and ``TRP``): the layer
  is split like its plain layer, the padding kept in front of the first thin layer;
- MAC counting: the plain layer's kernel and channels (the per-layer count is taken on the
  layer's real output, so padding is included);
- BatchNorm folding (:mod:`trp.deploy.fold`): a layer whose standard form applies its stored
  weight is replaced by that form and the BatchNorm folded into the plain layer;
- ONNX export: split layers are plain convs after a pad.

Where the standard form comes from, first match wins:

1. :func:`register_layer` ``(cls, to_standard=fn)``: ``fn(layer)`` returns the standard form of an
   instance, e.g. ``nn.Sequential(nn.ZeroPad2d(layer.static_padding.padding), plain_conv)``. Give
   the plain layer the instance's own ``weight``/``bias`` parameters (``plain.weight =
   layer.weight``) so TRP training and folding act on the stored weight.
2. Built in, by class: timm ``Conv2dSame`` (TF-"SAME" padding computed from the input size, then
   the conv) and ``StdConv2d``/``StdConv2dSame``/``ScaledStdConv2d``/``ScaledStdConv2dSame``
   (weight standardization: the plain conv holds the standardized weight, a copy, so TRP leaves
   these layers alone and folding does not fold into them).
3. Built in, by behaviour: a ``Conv2d`` subclass with a ``forward`` of its own is probed on two
   random inputs (odd and even sizes) against zero padding by a fixed amount per side, then the
   base conv (static "same" padding, e.g. ``Conv2dStaticSamePadding``), and against TF-"SAME"
   padding computed from the input size (dynamic "same" padding).

Every standard form is checked numerically before trp relies on it: on a random input when it is
first built, and by ``decompose`` on the input the layer received from the example inputs; a
registered form that disagrees is a ValueError naming the class.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Standard", "register_layer", "registered_layers", "plain_layer", "standard_form", "check_standard",
           "own_forward", "pad_same", "SamePad"]

_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def pad_same(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> Tensor:
    """Zero-pad the last two dimensions so a strided conv covers the input TF-"SAME" style."""
    pads: list[int] = []
    for size, k, s, d in reversed(list(zip(x.shape[-2:], kernel, stride, dilation))):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class SamePad(nn.Module):
    """TF-"SAME" zero padding computed from the input size (what timm ``Conv2dSame`` does)."""

    def __init__(self, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> None:
        super().__init__()
        self.kernel, self.stride, self.dilation = tuple(kernel), tuple(stride), tuple(dilation)

    def forward(self, x: Tensor) -> Tensor:
        return pad_same(x, self.kernel, self.stride, self.dilation)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, dilation={self.dilation}"



#: class -> to_standard, registered by users
_REGISTRY: dict[type, Callable[[nn.Module], nn.Module]] = {}
#: per instance: the standard-form rule found (None: none found)
_FOUND: "weakref.WeakKeyDictionary[nn.Module, Optional[tuple[str, Callable[[nn.Module], nn.Module]]]]" = \
    weakref.WeakKeyDictionary()

_TIMM_SAME = {"Conv2dSame"}
_TIMM_STD = {"StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"}


@dataclass(frozen=True)
class Standard:
    """The standard form of one layer: parameter-free ``pre`` modules, then a plain ``core`` layer."""

    pre: tuple[nn.Module, ...]
    core: nn.Module
    source: str  # where it comes from, for messages

    def module(self) -> nn.Module:
        """The standard form as one module (the core alone when nothing comes before it)."""
        return nn.Sequential(*self.pre, self.core) if self.pre else self.core

    def pre_module(self) -> Optional[nn.Module]:
        """The modules before the core as one module, or None."""
        if not self.pre:
            return None
        return self.pre[0] if len(self.pre) == 1 else nn.Sequential(*self.pre)

    def applies_stored_weight(self, layer: nn.Module) -> bool:
        """Whether the core applies ``layer.weight`` itself (not a function of it)."""
        return self.core.weight is layer.weight


def own_forward(module: nn.Module) -> bool:
    """Whether a Linear/Conv subclass overrides the computation of its base class."""
    cls = type(module)
    for base in _BASES:
        if isinstance(module, base):
            if cls.forward is not base.forward:
                return True
            return base is not nn.Linear and cls._conv_forward is not base._conv_forward  # type: ignore[attr-defined]
    return False


def register_layer(cls: type, to_standard: Callable[[nn.Module], nn.Module]) -> None:
    """Tell trp what instances of ``cls`` compute: ``to_standard(layer)`` gives standard modules.

    ``cls`` is a subclass of ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` with a forward of its own;
    ``to_standard(layer)`` returns a plain Linear/Conv1d/Conv2d, or an ``nn.Sequential`` of
    parameter-free modules (padding) ending in one, computing what ``layer`` computes. Registering a
    class again replaces its function. Example (static "same" padding)::

        trp.register_layer(MyPaddedConv, to_standard=lambda m: nn.Sequential(
            nn.ZeroPad2d(m.pads), trp.plain_layer(m, padding=0)))
    """
    if not isinstance(cls, type) or not issubclass(cls, _BASES):
        raise TypeError(f"trp.register_layer: {cls!r} must be a subclass of nn.Linear, nn.Conv1d or nn.Conv2d")
    if cls in _BASES:
        raise TypeError(f"trp.register_layer: {cls.__name__} is already a standard layer")
    if not callable(to_standard):
        raise TypeError(f"trp.register_layer: to_standard must be a function layer -> modules, got {to_standard!r}")
    _REGISTRY[cls] = to_standard
    _FOUND.clear()


def registered_layers() -> dict[type, Callable[[nn.Module], nn.Module]]:
    """The classes registered with :func:`register_layer` and their functions (a copy)."""
    return dict(_REGISTRY)


def plain_layer(layer: nn.Module, **changes) -> nn.Module:
    """A plain Linear/Conv1d/Conv2d with ``layer``'s geometry sharing its ``weight``/``bias`` parameters.

    ``changes`` override constructor arguments (e.g. ``padding=0``).
    """
    if isinstance(layer, nn.Linear):
        base, args = nn.Linear, dict(in_features=layer.in_features, out_features=layer.out_features)
    else:
        base = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Conv1d
        args = dict(in_channels=layer.in_channels, out_channels=layer.out_channels, kernel_size=layer.kernel_size,
                    stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                    padding_mode=layer.padding_mode)
    args.update(changes)
    plain = base(**args, bias=layer.bias is not None, device="meta")
    plain.weight = layer.weight
    if layer.bias is not None:
        plain.bias = layer.bias
    plain.train(layer.training)
    return plain


def _timm(module: nn.Module, names: set[str]) -> bool:
    cls = type(module)
    return cls.__module__.startswith("timm.") and cls.__name__ in names


def _timm_same(layer: nn.Module) -> nn.Module:
    return nn.Sequential(SamePad(tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.dilation)),
                         plain_layer(layer))


def _timm_std(layer: nn.Module) -> nn.Module:
    weight = layer.weight
    gain = (layer.gain * layer.scale).view(-1) if hasattr(layer, "gain") else None
    flat = weight.reshape(1, weight.shape[0], -1)
    standardized = F.batch_norm(flat, None, None, weight=gain, training=True, momentum=0.0,
                                eps=layer.eps).reshape_as(weight)
    plain = plain_layer(layer)
    plain.weight = nn.Parameter(standardized.detach().clone(), requires_grad=False)
    if getattr(layer, "same_pad", False):
        return nn.Sequential(SamePad(tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.dilation)), plain)
    return plain


def _probe_input(layer: nn.Module, extra: int = 0) -> Optional[Tensor]:
    """A random input ``layer`` accepts (``extra`` added to each spatial size), or None."""
    weight = layer.weight
    gen = torch.Generator(device="cpu").manual_seed(1234 + extra)
    if isinstance(layer, nn.Linear):
        shape: tuple[int, ...] = (2, layer.in_features)
    else:
        sizes = [(k - 1) * d + 2 * s + 5 + extra for k, s, d in zip(layer.kernel_size, layer.stride, layer.dilation)]
        shape = (1, layer.in_channels, *sizes)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=weight.device, dtype=weight.dtype)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / (b.double().norm() + 1e-30))


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _conv_after_pad(layer: nn.Module, x: Tensor, pads: list[int]) -> Tensor:
    return nn.Conv2d._conv_forward(layer, F.pad(x, pads), layer.weight, layer.bias)  # type: ignore[arg-type]


def _axis_pads(size: int, out: int, k: int, s: int, d: int, p: int) -> list[tuple[int, int]]:
    """``(before, after)`` zero paddings of one axis giving ``out`` outputs (near-even splits)."""
    found = []
    for total in range(0, (k - 1) * d + s + 1):
        if (size + total + 2 * p - d * (k - 1) - 1) // s + 1 == out:
            found += [(total // 2, total - total // 2), (total - total // 2, total // 2)]
    return list(dict.fromkeys(found))


def _detect_padding(layer: nn.Module) -> Optional[tuple[str, Callable[[nn.Module], nn.Module]]]:
    """Probe a Conv2d subclass: zero padding by fixed amounts (or TF-"SAME") then the base conv?"""
    if not isinstance(layer, nn.Conv2d) or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return None
    probes = [_probe_input(layer, 0), _probe_input(layer, 1)]
    try:
        with torch.no_grad():
            outs = [layer(x) for x in probes]
    except Exception:  # noqa: BLE001 - a forward that needs other inputs: not recognised
        return None
    if any(not isinstance(y, Tensor) or y.ndim != 4 or float(y.double().norm()) == 0 for y in outs):
        return None
    tol = _tolerance(layer.weight.dtype)
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = layer.kernel_size, layer.stride, layer.dilation, layer.padding
    x, y = probes[0], outs[0]
    with torch.no_grad():
        for (top, bottom), (left, right) in itertools.product(
                _axis_pads(x.shape[-2], y.shape[-2], kh, sh, dh, ph), _axis_pads(x.shape[-1], y.shape[-1], kw, sw, dw, pw)):
            pads = [left, right, top, bottom]
            if all(_conv_after_pad(layer, xi, pads).shape == yi.shape and _rel(_conv_after_pad(layer, xi, pads), yi) < tol
                   for xi, yi in zip(probes, outs)):
                if not any(pads):
                    return (f"built-in: the plain conv (found by probing {type(layer).__name__})", plain_layer)
                return (f"built-in: zero padding {tuple(pads)} then the conv (found by probing {type(layer).__name__})",
                        lambda m, pads=tuple(pads): nn.Sequential(nn.ZeroPad2d(pads), plain_layer(m)))
        same = [nn.Conv2d._conv_forward(layer, pad_same(xi, (kh, kw), (sh, sw), (dh, dw)), layer.weight, layer.bias)
                for xi in probes]
        if all(s.shape == yi.shape and _rel(s, yi) < tol for s, yi in zip(same, outs)):
            return (f"built-in: TF-'SAME' padding from the input size then the conv (found by probing "
                    f"{type(layer).__name__})",
                    lambda m: nn.Sequential(SamePad(tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)),
                                            plain_layer(m)))
    return None


def _parse(layer: nn.Module, form: nn.Module, source: str) -> Standard:
    """Split what a to_standard function returned into pre modules and the plain core."""
    cls = type(layer).__name__
    parts = list(form) if isinstance(form, nn.Sequential) else [form]
    core = parts[-1] if parts else None
    if core is None or not isinstance(core, _BASES) or own_forward(core):
        raise ValueError(f"trp: the standard form of {cls} ({source}) must end in a plain nn.Linear, nn.Conv1d "
                         f"or nn.Conv2d, got {type(core).__name__}")
    for m in parts[:-1]:
        if any(True for _ in m.parameters()):
            raise ValueError(f"trp: the standard form of {cls} ({source}): only parameter-free modules (padding) may "
                             f"come before the layer, got {type(m).__name__} with parameters")
    core.train(layer.training)
    return Standard(tuple(parts[:-1]), core, source)


def _rule(layer: nn.Module) -> Optional[tuple[str, Callable[[nn.Module], nn.Module]]]:
    for klass in type(layer).__mro__:
        if klass in _REGISTRY:
            return (f"trp.register_layer({klass.__name__}, ...)", _REGISTRY[klass])
        if klass in _BASES:
            break
    if _timm(layer, _TIMM_SAME):
        return ("built-in: timm Conv2dSame", _timm_same)
    if _timm(layer, _TIMM_STD):
        return (f"built-in: timm {type(layer).__name__}", _timm_std)
    if own_forward(layer):
        return _detect_padding(layer)
    return None


def standard_form(layer: nn.Module) -> Optional[Standard]:
    """The standard form of ``layer``, or None when it is already standard or trp knows none.

    A registered form is checked once on a random input; a mismatch raises ValueError naming the class.
    """
    if not isinstance(layer, _BASES) or not (own_forward(layer) or type(layer) in _REGISTRY
                                            or _timm(layer, _TIMM_SAME | _TIMM_STD)):
        return None
    if layer not in _FOUND:
        rule = _rule(layer)
        _FOUND[layer] = rule
        if rule is not None and rule[0].startswith("trp.register_layer"):
            x = _probe_input(layer)
            try:
                with torch.no_grad():
                    expected = layer(x)
            except Exception:  # noqa: BLE001 - needs another input: decompose checks on the real one
                expected = None
            if isinstance(expected, Tensor):
                check_standard(layer, x, expected=expected, standard=_parse(layer, rule[1](layer), rule[0]))
    rule = _FOUND[layer]
    if rule is None:
        return None
    return _parse(layer, rule[1](layer), rule[0])


def check_standard(layer: nn.Module, x: Tensor, name: Optional[str] = None, *, expected: Optional[Tensor] = None,
                   standard: Optional[Standard] = None) -> None:
    """Raise ValueError (one line, naming the class) when ``layer``'s standard form differs from it on ``x``."""
    standard = standard or standard_form(layer)
    if standard is None:
        return
    with torch.no_grad():
        if expected is None:
            expected = layer(x)
        try:
            got = standard.module()(x)
        except Exception as err:  # noqa: BLE001 - reported with the class
            got, problem = None, f"fails on {'the layer' + repr(name) if name else 'a'} input ({type(err).__name__}: {err})"
        else:
            problem = None
            if got.shape != expected.shape:
                problem = f"gives shape {tuple(got.shape)} where the layer gives {tuple(expected.shape)}"
            elif _rel(got, expected) > _tolerance(expected.dtype):
                problem = f"differs from the layer's forward by {_rel(got, expected):.1e} (relative)"
    if problem:
        where = f" (layer {name!r}, on the input it received)" if name else ""
        raise ValueError(f"trp: the standard form of {type(layer).__name__} from {standard.source} {problem}{where}; "
                         f"fix the to_standard function, or leave the layer dense with exclude=[...]")
