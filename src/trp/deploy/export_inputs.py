"""The model as the ONNX exporters see it, and the inputs :func:`trp.export_onnx` checks it on.

Example inputs of any form (a tensor, a tuple, a dict of keyword inputs) become positional
tensors; nested outputs (a ModelOutput, dicts, tuples) become a flat tuple (:class:`_Flat`).
The checks of an export also run the model on other inputs (:func:`_other_input`) and a larger
batch (:func:`_grow_batch`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["ExampleInputs"]

ExampleInputs = Union[Tensor, Sequence[Tensor], Mapping[str, Tensor]]


def _normalize_inputs(example_inputs: ExampleInputs) -> tuple[tuple[Tensor, ...], dict[str, Tensor], list[str]]:
    """(positional, keyword, names) of the example inputs; checks they are tensors with a batch dim."""
    if isinstance(example_inputs, Tensor):
        args, kwargs, names = (example_inputs,), {}, ["input"]
    elif isinstance(example_inputs, Mapping):
        args, kwargs, names = (), dict(example_inputs), [str(k) for k in example_inputs]
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
        names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    else:
        raise TypeError(
            f"example_inputs must be a tensor, a tuple of tensors or a dict of tensors, "
            f"got {type(example_inputs).__name__}"
        )
    values = list(args) + list(kwargs.values())
    if not values:
        raise ValueError("example_inputs is empty: give at least one tensor, e.g. torch.randn(1, 3, 32, 32)")
    for name, t in zip(names, values):
        if not isinstance(t, Tensor):
            raise TypeError(f"example input {name!r} must be a tensor, got {type(t).__name__}")
        if t.ndim == 0:
            raise ValueError(f"example input {name!r} is a scalar: inputs need a leading batch dimension")
    return args, kwargs, names


def _flat_outputs(out: Any, where: str = "output") -> list[Tensor]:
    """The tensors of a model's output (a tensor, tuples/lists/dicts of them, a ModelOutput), in order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):  # transformers' ModelOutput is a Mapping of its non-None fields
        return [t for k, v in out.items() for t in _flat_outputs(v, f"{where}[{k!r}]")]
    if isinstance(out, (tuple, list)):
        return [t for i, v in enumerate(out) for t in _flat_outputs(v, f"{where}[{i}]")]
    if hasattr(out, "to_tuple"):
        return _flat_outputs(out.to_tuple(), where)
    hint = (" Hugging Face models return their key/value cache unless told not to: pass "
            "forward_kwargs={'use_cache': False}" if "Cache" in type(out).__name__ else "")
    raise TypeError(f"the model's {where} is a {type(out).__name__}: an ONNX file returns tensors "
                    f"(or tuples/dicts of them).{hint}")


class _Flat(nn.Module):
    """``model`` as torch.onnx sees it: tensors in (positional, in ``names`` order), a tuple of tensors out.

    Keyword inputs (token ids, masks...) become positional ones, constant ``forward_kwargs`` are
    passed on every call, and nested outputs (ModelOutput, dicts, tuples) are flattened.
    """

    def __init__(self, model: nn.Module, n_args: int, keywords: list[str], forward_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.n_args = n_args
        self.keywords = keywords
        self.forward_kwargs = forward_kwargs

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        kwargs = dict(zip(self.keywords, inputs[self.n_args:]))
        return tuple(_flat_outputs(self.model(*inputs[: self.n_args], **kwargs, **self.forward_kwargs)))


def _other_input(t: Any, gen: torch.Generator) -> Any:
    """A different input of the same kind: noise added to floats, integers (token ids) rolled."""
    if not isinstance(t, Tensor) or t.numel() == 0:
        return t
    if t.is_floating_point():
        scale = float(t.detach().float().std()) if t.numel() > 1 else 0.0
        noise = torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype)
        return t + noise * (scale if scale > 0 else 1.0)
    if t.dtype != torch.bool and t.ndim >= 1 and t.shape[-1] > 1:
        return torch.roll(t, 1, dims=-1)
    return t


def _input_sensitivity(reference_model: Any, args: tuple, kwargs: dict, reference: list) -> float:
    """The largest relative change of a floating output when the inputs change (nan: not measurable)."""
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            other = _flat_outputs(reference_model(*(_other_input(a, gen) for a in args),
                                                  **{k: _other_input(v, gen) for k, v in kwargs.items()}))
    except Exception:  # noqa: BLE001 - another input may be invalid for this model: not measured
        return float("nan")
    worst = float("nan")
    for a, b in zip(reference, other):
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.is_floating_point() and a.shape == b.shape:
            scale = float(a.double().norm())
            change = float((b.double() - a.double()).norm()) / scale if scale > 0 else float(b.double().norm() > 0)
            worst = change if worst != worst else max(worst, change)
    return worst


def _grow_batch(t: Tensor) -> Tensor:
    """The same tensor with its first sample appended: one more along the batch dimension."""
    return torch.cat([t, t[:1]], dim=0)
