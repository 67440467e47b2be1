"""LoRITa: low-rank induced training by composing linear layers (SPEC §2).

During training each selected layer is over-parameterized as a product of ``N`` linear
maps with nothing in between (:func:`overparameterize`): a Linear ``W`` becomes
``W_N ⋯ W_1``, a ``kh×kw`` conv becomes the conv followed by ``N−1`` 1×1 convs. The model
computes the same kind of function, but ordinary weight decay on the factors penalizes
the product's rank, so the trained weights are close to low rank. After training,
:func:`collapse` multiplies the factors back into one plain layer each (the original
architecture), ready for singular value truncation with :func:`trp.decompose`.

Weight decay: LoRITa uses nothing but ordinary weight decay on all parameters (the
paper: SGD, lr 0.01, weight decay 1e-3, ``N = 2`` or ``3``); no rank is chosen in
advance and no SVD is taken during training.

Checkpoints of an over-parameterized model have deterministic keys such as
``layer1.0.conv1.factors.0.weight``; load them into
``overparameterize(fresh_model, factor, layers)`` built with the same arguments.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.layers import LayerSelector, set_module
from ..core.safety import split_targets

__all__ = [
    "Composed",
    "overparameterize",
    "collapse",
    "effective_weight",
    "effective_bias",
    "is_overparameterized",
]


class Composed(nn.Module):
    """A Linear or Conv2d over-parameterized as ``N`` linear factors applied in a row.

    ``factors[0]`` has the original layer's input and geometry; the others are
    ``out → out`` Linear or 1×1 conv maps, and only the last one has a bias.
    ``layer_type`` and ``config`` describe the original layer, which :func:`collapse`
    rebuilds.
    """

    def __init__(self, factors: list[nn.Module], layer_type: type, config: dict[str, Any]) -> None:
        super().__init__()
        if len(factors) < 2:
            raise ValueError(f"a Composed layer needs at least 2 factors, got {len(factors)}")
        self.factors = nn.ModuleList(factors)
        self.layer_type = layer_type
        self.config = dict(config)

    def refuse_split(self) -> str:
        """Why layer selection must not split this layer as it is (see :mod:`trp.core.layers`)."""
        return ("over-parameterized (LoRITa factors): multiply the factors back with "
                "trp.lorita.collapse(model) before decomposing or TRP training")

    @property
    def factor(self) -> int:
        """Number of factors ``N``."""
        return len(self.factors)

    def forward(self, x: Tensor) -> Tensor:
        for f in self.factors:
            x = f(x)
        return x

    def extra_repr(self) -> str:
        return f"{self.layer_type.__name__}, factor={self.factor}"


def _check_factor(factor: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ValueError(
            f"factor must be an int >= 2 (the number of linear factors each layer becomes), "
            f"got {factor!r}"
        )


def _linear_config(module: nn.Linear) -> dict[str, Any]:
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
    }


def _conv_config(module: nn.Conv2d) -> dict[str, Any]:
    return {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": tuple(module.kernel_size),
        "stride": tuple(module.stride),
        "padding": module.padding if isinstance(module.padding, str) else tuple(module.padding),
        "dilation": tuple(module.dilation),
        "padding_mode": module.padding_mode,
        "bias": module.bias is not None,
    }


def _compose_linear(module: nn.Linear, factor: int) -> Composed:
    w = module.weight
    kw = {"device": w.device, "dtype": w.dtype}
    n_in, n_out = module.in_features, module.out_features
    has_bias = module.bias is not None
    factors = [nn.Linear(n_in, n_out, bias=False, **kw)]
    factors += [
        nn.Linear(n_out, n_out, bias=has_bias and i == factor - 1, **kw) for i in range(1, factor)
    ]
    with torch.no_grad():
        factors[0].weight.copy_(w)
        for f in factors[1:]:
            nn.init.orthogonal_(f.weight)
        if has_bias:
            factors[-1].bias.copy_(module.bias)
    return Composed(factors, type(module), _linear_config(module))


def _compose_conv(module: nn.Conv2d, factor: int) -> Composed:
    w = module.weight
    kw = {"device": w.device, "dtype": w.dtype}
    cfg = _conv_config(module)
    n = module.out_channels
    has_bias = module.bias is not None
    first = nn.Conv2d(
        module.in_channels, n, cfg["kernel_size"], stride=cfg["stride"], padding=cfg["padding"],
        dilation=cfg["dilation"], padding_mode=cfg["padding_mode"], bias=False, **kw,
    )
    factors: list[nn.Module] = [first]
    factors += [nn.Conv2d(n, n, 1, bias=has_bias and i == factor - 1, **kw) for i in range(1, factor)]
    with torch.no_grad():
        first.weight.copy_(w)
        for f in factors[1:]:
            nn.init.orthogonal_(f.weight)
        if has_bias:
            factors[-1].bias.copy_(module.bias)
    return Composed(factors, type(module), cfg)


def _composed_layers(model: nn.Module) -> list[tuple[str, Composed]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Composed)]


def is_overparameterized(model: nn.Module) -> bool:
    """Whether ``model`` contains any :class:`Composed` layer."""
    return any(isinstance(m, Composed) for m in model.modules())


def overparameterize(
    model: nn.Module, factor: int = 2, layers: LayerSelector = None, exclude: Sequence[str] = ()
) -> nn.Module:
    """A copy of ``model`` with each selected layer replaced by a product of ``factor`` layers.

    A Linear ``in→out`` becomes ``in→out`` then ``factor−1`` Linear ``out→out`` (bias on the
    last); a Conv2d becomes the conv ``C→N`` with all its geometry, then ``factor−1`` 1×1
    convs ``N→N`` (bias on the last). ``layers`` is None (the default selection of
    :mod:`trp.core.layers`), a list of module names, or a predicate ``(name, module) -> bool``;
    grouped convs are left dense with a warning.

    Initialization: the first factor keeps the layer's current weights, each extra square
    factor is a random orthogonal matrix (``torch.nn.init.orthogonal_``, global RNG) and
    the bias moves to the last factor, so the product starts with exactly the original
    singular values (the same scale as the original layer). The input model is not modified.
    """
    _check_factor(factor)
    if is_overparameterized(model):
        first = _composed_layers(model)[0][0] or "the model itself"
        raise ValueError(
            f"the model is already over-parameterized (e.g. {first!r} is a Composed layer); "
            "collapse it first with trp.lorita.collapse, or over-parameterize the original model"
        )
    new = copy.deepcopy(model)
    targets, skipped = split_targets(new, layers, exclude)
    # Only plain layers have a Composed form (grouped convs, Conv1d, subclasses stay as they are).
    plain = [(n, m) for n, m in targets
             if type(m) is nn.Linear or (type(m) is nn.Conv2d and m.groups == 1)]
    skipped += [(n, f"LoRITa composes only plain Linear and ungrouped Conv2d layers, not this "
                 f"{type(m).__name__}" + (f" (groups={m.groups})" if getattr(m, "groups", 1) != 1 else ""))
                for n, m in targets if (n, m) not in plain]
    targets = plain
    if not targets:
        what = "the default selection (every layer but the first conv and the last linear)" \
            if layers is None else "`layers`"
        raise ValueError(
            f"nothing to over-parameterize: {what} matched no Conv2d/Linear layer that can be "
            "composed" + (f" ({len(skipped)} skipped: {skipped[0][1]})" if skipped else "")
            + ". Pass layers=[names] or a predicate to choose layers explicitly."
        )
    for name, module in targets:
        if isinstance(module, nn.Conv2d):
            composed = _compose_conv(module, factor)
        else:
            composed = _compose_linear(module, factor)
        composed.train(module.training)
        if name == "":
            new = composed
        else:
            set_module(new, name, composed)
    if skipped:
        warnings.warn(
            f"trp.lorita.overparameterize left {len(skipped)} selected layer(s) as they were: "
            + "; ".join(f"{n} ({r})" for n, r in skipped),
            stacklevel=2,
        )
    return new


def _product64(module: Composed) -> Tensor:
    """The effective weight in float64 (differentiable)."""
    first = module.factors[0].weight.double()
    rest = [f.weight.double().flatten(1) for f in module.factors[1:]]  # (out, out) each
    a = rest[0]
    for w in rest[1:]:
        a = w @ a
    if first.ndim == 4:  # conv: W[n, c, :, :] = Σ_m A[n, m] W1[m, c, :, :]
        return torch.einsum("nm,mchw->nchw", a, first)
    return a @ first


def effective_weight(module: Composed) -> Tensor:
    """The single weight equal to the product of ``module``'s factors, in their dtype.

    The product is taken in float64. The result is differentiable; wrap the call in
    ``torch.no_grad()`` when no gradient is needed.
    """
    if not isinstance(module, Composed):
        raise ValueError(
            f"effective_weight needs a trp.lorita.Composed layer, got {type(module).__name__}"
        )
    return _product64(module).to(module.factors[0].weight.dtype)


def effective_bias(module: Composed) -> Optional[Tensor]:
    """The bias of the collapsed layer (the last factor's), or None."""
    if not isinstance(module, Composed):
        raise ValueError(
            f"effective_bias needs a trp.lorita.Composed layer, got {type(module).__name__}"
        )
    return module.factors[-1].bias


def _rebuild(module: Composed) -> nn.Module:
    w = module.factors[0].weight
    try:
        layer = module.layer_type(**module.config, device=w.device, dtype=w.dtype)
    except TypeError:  # a subclass with its own constructor: rebuild the base type
        base = nn.Conv2d if issubclass(module.layer_type, nn.Conv2d) else nn.Linear
        layer = base(**module.config, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(_product64(module).to(w.dtype))
        bias = effective_bias(module)
        if layer.bias is not None:
            layer.bias.copy_(bias)
    layer.train(module.training)
    return layer


def collapse(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`Composed` multiplied back into one plain layer.

    The result has the architecture (module types, ``state_dict`` keys and shapes) of the
    model before :func:`overparameterize` and computes the same function; products are
    taken in float64 and cast back to the weights' dtype. The input model is not modified.
    """
    composed = _composed_layers(model)
    if not composed:
        raise ValueError(
            f"nothing to collapse: the {type(model).__name__} has no Composed layer; was it "
            "over-parameterized with trp.lorita.overparameterize?"
        )
    if composed[0][0] == "":
        return _rebuild(composed[0][1])  # type: ignore[arg-type]
    new = copy.deepcopy(model)
    for name, module in _composed_layers(new):
        set_module(new, name, _rebuild(module))
    return new
