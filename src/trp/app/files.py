"""Model and checkpoint files from disk: untrusted, checked before anything is allocated.

:class:`ModelSpec` says how to rebuild a model file's architecture (stored in its ``trp_model``
metadata, every field bounded); :func:`load_model_file` checks the file against a skeleton on the
``meta`` device (recipe, tensor shapes and dtypes, :mod:`trp.deploy.io`) before building the real
model and reading weights; :func:`read_checkpoint` reads a training checkpoint with
``weights_only=True``; :func:`check_finite` names a NaN/Inf tensor. The limits on other untrusted
input are :mod:`trp.limits`.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DatasetInfo
from ..deploy.io import check_file, parse_json_field, read_metadata
from ..deploy.io import load as load_weights
from ..errors import FileError
from ..models import create_model

__all__ = ["ModelSpec", "MAX_CHANNELS", "MAX_CLASSES", "MAX_INPUT_SIDE", "load_model_file", "check_finite",
           "read_checkpoint"]


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model from scratch: registry name, channels, classes, input size."""

    model: str
    in_channels: int
    num_classes: int
    input_size: tuple[int, int]
    data: str = ""

    def build(self) -> nn.Module:
        return create_model(self.model, in_channels=self.in_channels, num_classes=self.num_classes)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.in_channels, *self.input_size)

    def metadata(self) -> dict[str, str]:
        return {"trp_model": json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_info(cls, model: str, info: DatasetInfo) -> "ModelSpec":
        return cls(model, info.in_channels, info.num_classes, tuple(info.input_size), info.name)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> "ModelSpec":
        """The spec stored in a file's metadata, every field checked (the file is untrusted)."""
        if "trp_model" not in meta:
            raise ValueError(
                f"{path} does not say which model it holds (no 'trp_model' metadata): "
                "it was not written by `trp train` / `trp decompose`; load it in Python with trp.load, or give "
                "the model on the command line with --model-factory package.module:callable --input-shape 1,C,H,W"
            )
        d = parse_json_field(meta, "trp_model", path)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: metadata field 'trp_model' must be a mapping, got {type(d).__name__}")
        field = f"{path}: metadata field trp_model"

        def integer(key: str, low: int, high: int, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                shown = repr(value) if len(repr(value)) < 40 else repr(value)[:37] + "..."
                raise ValueError(f"{field}.{key} must be an integer from {low} to {high}, got {shown}; "
                                 "the file is corrupt or crafted")
            return value

        for key in ("model", "in_channels", "num_classes", "input_size"):
            if key not in d:
                raise ValueError(f"{field} lacks {key!r}; the file is corrupt")
        if not isinstance(d["model"], str) or len(d["model"]) > 200:
            raise ValueError(f"{field}.model must be a model name, got {str(d['model'])[:40]!r}")
        data = d.get("data", "")
        if not isinstance(data, str) or len(data) > 200:
            raise ValueError(f"{field}.data must be a data set name, got {str(data)[:40]!r}")
        size = d["input_size"]
        if not isinstance(size, list) or len(size) != 2:
            raise ValueError(f"{field}.input_size must be [height, width], got {str(size)[:40]}")
        return cls(
            d["model"],
            integer("in_channels", 1, MAX_CHANNELS, d["in_channels"]),
            integer("num_classes", 1, MAX_CLASSES, d["num_classes"]),
            (integer("input_size", 1, MAX_INPUT_SIDE, size[0]), integer("input_size", 1, MAX_INPUT_SIDE, size[1])),
            data,
        )


# Sanity bounds on the sizes a model file may declare (checked before anything is built).
MAX_CHANNELS = 1024
MAX_CLASSES = 100_000
MAX_INPUT_SIDE = 4096


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A training checkpoint written by :class:`Trainer` (read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has no checkpoint yet")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} is not a plain trp checkpoint: it holds objects that are refused because loading "
            f"them could run code ({_unpickler_reason(err)}); do not load it, start the run again"
        ) from None
    except Exception as err:
        raise ValueError(f"{path} is corrupt or not a trp checkpoint ({err}); start the run again") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a trp training checkpoint (no 'model' entry)")
    return state


def _unpickler_reason(err: Exception) -> str:
    """The refused item from torch's weights-only error, without its advice to load unsafely."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reasons = [line for line in lines if "weights_only" not in line and "Weights only" not in line
               and "arbitrary code" not in line and "documentation" not in line]
    return reasons[0][:200] if reasons else "unsupported content"


def check_finite(model: nn.Module, what: str) -> None:
    """ValueError naming the first parameter or buffer of ``model`` holding NaN or Inf."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{what}: {name} holds NaN or Inf; the training diverged or the file is corrupt. "
                             "Evaluate a healthy checkpoint (retrain with a lower --lr)")


def load_model_file(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild and load a model saved by ``trp train`` / ``trp decompose``.

    The file is checked against the model on the ``meta`` device first (no memory used),
    so a crafted file fails with ValueError before anything is allocated.
    """
    path = Path(path)
    spec = ModelSpec.from_metadata(read_metadata(path), path)
    with torch.device("meta"):
        skeleton = spec.build()
    try:
        check_file(path, skeleton)
    except ValueError as err:
        raise FileError(f"{err} (the file's trp_model metadata says {spec.model}, {spec.in_channels} input "
                         f"channels, {spec.num_classes} classes)") from None
    model = spec.build().to(device)
    return load_weights(path, model), spec
