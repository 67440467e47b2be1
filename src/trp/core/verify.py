"""Checking a split before :func:`trp.decompose` returns it (see :mod:`trp.core.decompose`).

Each split layer is compared with its dense layer on its recorded input, then the whole split
model is run in every mode it may be used in (eval under ``torch.no_grad()`` and
``torch.inference_mode()``, and train mode when it came in so); a layer whose weight code around it
reads directly is left dense. Also: the random inputs a declared ``input_shape`` is verified on,
and giving the split model its own copy of parameters it still shares with the input model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .layers import set_module
from .safety import check_layer, check_outputs, run_model
from .schemes import LowRank, SplitLayerAccess

if TYPE_CHECKING:
    from .report import Decomposition, LayerReport

__all__ = ["VERIFY_MAX_ELEMENTS"]


# The split is verified on a real forward pass (random inputs): at most this many input elements. A larger
# declared input_shape (a file may declare 4096×4096) is checked at a smaller spatial size, keeping the
# aspect ratio, so verification never costs more than an ImageNet image (3×224×224) does.
VERIFY_MAX_ELEMENTS = 3 * 224 * 224


def _verification_shape(input_shape: Sequence[int]) -> tuple[tuple[int, ...], bool]:
    """``input_shape`` within :data:`VERIFY_MAX_ELEMENTS` (batch 1, spatial dimensions scaled down) and
    whether it was reduced."""
    shape = tuple(int(d) for d in input_shape)
    if math.prod(shape) <= VERIFY_MAX_ELEMENTS:
        return shape, False
    shape = (1, *shape[1:])
    if len(shape) >= 3 and math.prod(shape) > VERIFY_MAX_ELEMENTS:
        lead, spatial = shape[:2], shape[2:]
        scale = (VERIFY_MAX_ELEMENTS / math.prod(shape)) ** (1 / len(spatial))
        shape = (*lead, *(max(1, min(d, int(d * scale))) for d in spatial))
    return shape, True


def _verification_inputs(model: nn.Module, input_shape: Optional[Sequence[int]], example_inputs: Any) -> Any:
    if example_inputs is not None:
        return example_inputs
    if input_shape is None:
        return None
    shape, _ = _verification_shape(input_shape)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def _check(
    new: nn.Module,
    split: dict[str, tuple[nn.Module, Tensor, "LayerReport"]],
    layer_inputs: dict[str, Tensor],
    dense_output: Any,
    example_inputs: Any,
    train_runs: bool = False,
) -> Any:
    """Check the split model (see the module docstring); leave dense the layers a parent reads.

    The whole split model runs in eval mode under ``torch.no_grad()`` and under
    ``torch.inference_mode()`` (where PyTorch's fused fast paths read weights directly), and in
    train mode when it came in train mode (``train_runs``: the dense model runs so); BatchNorm
    statistics are restored after, and every module is left in the mode it came in.
    """
    for name, (dense, weight, _, *bias) in split.items():
        if name not in layer_inputs:
            continue  # not reached by the example inputs
        problem = check_layer(name, dense, new.get_submodule(name), layer_inputs[name], weight,
                              bias[0] if bias else None)
        if problem:
            raise RuntimeError(f"trp.decompose: {problem}. No model is returned; leave the layer dense "
                               f"with exclude=[{name!r}] and report the model's layer type.")
    by_id = {id(new.get_submodule(n)): n for n in split}
    came_in_training = new.training and train_runs
    output = None
    while True:
        modes = [(m, m.training) for m in new.modules()]
        buffers = _snapshot_buffers(new)
        label = ""
        try:
            # Every mode the model may be used in: PyTorch's fused fast paths (eval, no autograd)
            # read weights that the regular path only reaches by calling the layers.
            for label, evaluate, context in _check_modes(new, came_in_training):
                if evaluate:
                    new.eval()
                with context():
                    result = run_model(new, example_inputs)
                if evaluate and output is None:
                    output = result
        except SplitLayerAccess as err:
            name = by_id.get(id(err.module))
            if name is None:
                raise
            dense, _, entry, *_ = split.pop(name)
            set_module(new, name, dense)
            entry.status, entry.macs_after = "skipped", entry.macs_before
            entry.reason = (f"code around the layer reads its .{err.attribute} directly (found running the "
                            f"example inputs in {label}); left dense")
            output = None
            continue
        except Exception as err:
            raise RuntimeError(
                f"trp.decompose: the split model fails on the example inputs in {label} "
                f"({type(err).__name__}: {err}) "
                f"although each split layer matches its dense layer; split layers: {sorted(split)[:5]}... "
                "Pass exclude=[patterns] to leave the layers around the failure dense."
            ) from err
        finally:
            for m, mode in modes:
                m.training = mode
            with torch.no_grad():
                for buf, saved in buffers:  # a train-mode run updates BatchNorm statistics
                    buf.copy_(saved)
            _drop_inference_tensors(new)
        break
    problem = check_outputs(dense_output, output)
    if problem:
        raise RuntimeError(f"trp.decompose: {problem}; no model is returned (split layers: {sorted(split)[:5]}...)")
    return output


def _unshare(model: nn.Module, storages: set[int]) -> None:
    """Give ``model`` its own copy of every parameter whose memory is in ``storages`` (the input model's),
    keeping parameters tied where they were tied."""
    clones: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for module in model.modules():
            for key, p in list(module._parameters.items()):
                if p is None or nn.parameter.is_lazy(p) or not p.numel() \
                        or p.untyped_storage().data_ptr() not in storages:
                    continue
                if id(p) not in clones:
                    clones[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                module._parameters[key] = clones[id(p)]


def _fast_path_attention(new: nn.Module, converted, report: "Decomposition") -> set[str]:
    """Attention modules to keep converted because their ``nn.TransformerEncoderLayer`` has a split layer.

    The encoder layer's fused fast path (eval mode, no autograd) reads ``linear1.weight`` and
    ``linear2.weight`` directly; with its attention a :class:`SplitMultiheadAttention` (no packed
    ``in_proj`` weight) PyTorch takes the regular path, which calls every layer. Stated in the report.
    """
    keep: set[str] = set()
    for name, layer in new.named_modules():
        if not isinstance(layer, nn.TransformerEncoderLayer):
            continue
        attn = f"{name}.self_attn" if name else "self_attn"
        if attn not in converted.originals:
            continue
        split = [n for n, m in layer.named_children() if isinstance(m, LowRank)]
        if split:
            keep.add(attn)
            report.notes.append(
                f"{name or 'the model'} (nn.TransformerEncoderLayer): fused inference fast path disabled "
                f"({', '.join(split)} split; its self_attn kept as trp's SplitMultiheadAttention, which "
                "computes the same function without the packed weights the fast path reads)")
    return keep


def _snapshot_buffers(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    return [(b, b.detach().clone()) for b in model.buffers()]


def _runs_in_train_mode(model: nn.Module, example_inputs: Any) -> bool:
    """Whether the dense model runs on the inputs in train mode (not, e.g., BatchNorm on one value)."""
    buffers = _snapshot_buffers(model)
    try:
        run_model(model, example_inputs)
        return True
    except Exception:  # noqa: BLE001 - then the split model is not run in train mode either
        return False
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)


def _drop_inference_tensors(model: nn.Module) -> None:
    """Replace tensors a module cached during the ``torch.inference_mode()`` run by ordinary copies
    (an inference tensor cannot be saved for backward in a later training step)."""
    for m in model.modules():
        for key, buf in list(m._buffers.items()):
            if buf is not None and buf.is_inference():
                m._buffers[key] = buf.clone()
        for key, value in list(vars(m).items()):
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter) and value.is_inference():
                m.__dict__[key] = value.clone()


def _check_modes(model: nn.Module, came_in_training: bool):
    """``(label, set-up)`` of each mode the split model is run in before it is returned."""
    import contextlib

    modes = []
    if came_in_training:
        modes.append(("train mode (the mode it came in)", False, contextlib.nullcontext))
    modes.append(("eval mode under torch.no_grad()", True, torch.no_grad))
    modes.append(("eval mode under torch.inference_mode()", True, torch.inference_mode))
    return modes
