"""What a model is fed when trp probes it: an input shape or example inputs.

Everywhere trp runs a model to count MACs or trace layer sizes it takes either

- ``input_shape``: a shorthand, a tensor of float zeros of that shape (batch dimension
  included), or
- ``example_inputs``: a tensor (one positional argument), a tuple or list of tensors
  (positional arguments), or a dict of tensors (keyword arguments, e.g. a Hugging Face
  model's ``{"input_ids": ..., "attention_mask": ...}``).

Tensors are moved to the model's device; floating-point ones take the model's floating
dtype (token ids and masks keep theirs). An ``input_shape`` becomes a tensor on the ``meta``
device (no memory): passes that need only shapes (MAC counting, layer sizes) run on ``meta``
(:func:`trp.core.counting.probe_forward`), and a pass that needs values gets real zeros on the
model's device when it runs (:meth:`ModelInputs.__call__`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["ExampleInputs", "ModelInputs", "model_inputs", "inputs_given", "at_batch"]

ExampleInputs = Union[Tensor, Sequence[Tensor], Mapping[str, Tensor]]


@dataclass(frozen=True)
class ModelInputs:
    """Positional and keyword arguments of one forward call."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        """Every tensor argument, positional first."""
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, Tensor)]

    @property
    def batch_size(self) -> int:
        """The first dimension of the first tensor argument (1 for a 0-d tensor)."""
        first = self.tensors()[0]
        return int(first.shape[0]) if first.ndim > 0 else 1

    @property
    def on_meta(self) -> bool:
        """Whether these are shape-only placeholders (from an ``input_shape``) on the ``meta`` device."""
        return any(t.is_meta for t in self.tensors())

    def materialized(self, model: nn.Module) -> "ModelInputs":
        """These inputs with ``meta`` placeholders replaced by zeros on ``model``'s device (unless it is on meta)."""
        device, dtype = _placement(model)
        if not self.on_meta or device.type == "meta":
            return self

        def real(v: Any) -> Any:
            return torch.zeros(v.shape, dtype=v.dtype, device=device) if isinstance(v, Tensor) and v.is_meta else v

        return ModelInputs(tuple(real(a) for a in self.args), {k: real(v) for k, v in self.kwargs.items()})

    def simplest(self) -> Any:
        """These inputs in the plainest form a caller writes: one tensor, a tuple of positional arguments, a dict of
        keyword arguments, or these ``ModelInputs`` when both kinds are given (the inverse of
        :func:`trp.deploy.latency.as_inputs`)."""
        if not self.kwargs:
            return self.args[0] if len(self.args) == 1 else self.args
        return dict(self.kwargs) if not self.args else self

    def __call__(self, model: nn.Module) -> Any:
        """``model``'s output on these inputs (shape placeholders become zeros on its device)."""
        inputs = self.materialized(model)
        return model(*inputs.args, **inputs.kwargs)


def at_batch(inputs: ModelInputs, batch_size: int) -> ModelInputs:
    """``inputs`` with every batched tensor (first dimension = the batch) repeated or cut to ``batch_size`` rows.

    Rows are taken in turn (0, 1, ..., 0, 1, ...); tensors without the batch dimension stay as they are.
    """
    n = inputs.batch_size
    if n == batch_size:
        return inputs
    index = torch.arange(batch_size) % n

    def resize(v: Any) -> Any:
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n:
            return v[index.to(v.device)]
        return v

    return ModelInputs(tuple(resize(a) for a in inputs.args), {k: resize(v) for k, v in inputs.kwargs.items()})


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return device, dtype


def _place(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if not isinstance(value, Tensor):
        return value
    if value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device=device)


def inputs_given(input_shape: Optional[Sequence[int]], example_inputs: Optional[ExampleInputs]) -> bool:
    """Whether either way of giving inputs was used (both at once is an error)."""
    if input_shape is not None and example_inputs is not None:
        raise ValueError("give either input_shape or example_inputs, not both")
    return input_shape is not None or example_inputs is not None


def model_inputs(
    model: nn.Module,
    input_shape: Optional[Sequence[int]] = None,
    example_inputs: Optional[ExampleInputs] = None,
) -> ModelInputs:
    """The forward arguments for ``model`` from ``input_shape`` or ``example_inputs`` (exactly one).

    A :class:`ModelInputs` given as ``input_shape`` is returned as it is (already resolved).
    """
    if isinstance(input_shape, ModelInputs):
        return input_shape
    if not inputs_given(input_shape, example_inputs):
        raise ValueError(
            "this needs a forward pass: pass input_shape=(1, C, H, W) or example_inputs "
            "(a tensor, a tuple of tensors, or a dict such as {'input_ids': ids})"
        )
    device, dtype = _placement(model)
    if input_shape is not None:
        if isinstance(input_shape, Tensor) or not isinstance(input_shape, Sequence) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape
        ):
            raise ValueError(
                f"input_shape must be a sequence of positive integers such as (1, 3, 32, 32), got {input_shape!r}; "
                "pass tensors as example_inputs"
            )
        # a shape-only placeholder: no memory until a pass needs values (see ModelInputs.__call__)
        return ModelInputs((torch.zeros(tuple(input_shape), device="meta", dtype=dtype),))
    if isinstance(example_inputs, Tensor):
        inputs = ModelInputs((_place(example_inputs, device, dtype),))
    elif isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"example_inputs dict keys must be argument names (str), got {bad[0]!r}")
        inputs = ModelInputs((), {k: _place(v, device, dtype) for k, v in example_inputs.items()})
    elif isinstance(example_inputs, (tuple, list)):
        inputs = ModelInputs(tuple(_place(v, device, dtype) for v in example_inputs))
    else:
        raise TypeError(
            "example_inputs must be a tensor, a tuple/list of tensors or a dict of tensors, "
            f"got {type(example_inputs).__name__}"
        )
    if not inputs.tensors():
        raise ValueError("example_inputs holds no tensor: give at least one input tensor")
    return inputs


def first_samples(inputs: ModelInputs, n: int) -> ModelInputs:
    """The first ``n`` samples of a batch (tensors whose first dimension is the batch)."""
    b = inputs.batch_size

    def cut(v: Any) -> Any:
        return v[:n] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == b else v

    return ModelInputs(tuple(cut(v) for v in inputs.args), {k: cut(v) for k, v in inputs.kwargs.items()})

