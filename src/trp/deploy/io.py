"""Save and load (decomposed) models: safetensors weights plus the decomposition recipe.

A file holds the model's ``state_dict`` as safetensors and, in the safetensors
metadata, the recipe ``{layer name: {"scheme", "rank"}}`` of every factorized layer.
Loading replays the recipe on a freshly built original model, then loads the weights.
Nothing is pickled. A DistributedDataParallel, DataParallel or ``torch.compile`` wrapper is
removed on both sides: names are the plain model's, never ``module.``-prefixed.
"""

from __future__ import annotations

import json
from collections import OrderedDict
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.decompose import apply_recipe, recipe_of
from ..core.wrappers import unwrap, wrapper_prefix

__all__ = ["save", "load", "read_metadata", "atomic_write"]

PathLike = Union[str, os.PathLike]
FORMAT = "trp"
FORMAT_VERSION = "1"


class atomic_write:
    """Context manager yielding a temporary path that replaces ``path`` only on success."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def save(model: nn.Module, path: PathLike, metadata: Optional[dict[str, str]] = None) -> None:
    """Write ``model``'s weights and decomposition recipe to ``path`` (atomically).

    ``metadata`` adds string entries (e.g. how to rebuild the original model). A wrapped
    model (DDP, DataParallel, ``torch.compile``) is saved as the plain model inside.
    """
    model = unwrap(model)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, recipe=json.dumps(recipe_of(model)))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_metadata(path: PathLike) -> dict[str, str]:
    """The metadata stored in a file written by :func:`save` (``recipe`` included)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: check the path (trp.save writes one file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt, "
            "or not written by trp.save: save the model again"
        ) from err
    return dict(meta)


def load(path: PathLike, model: nn.Module) -> nn.Module:
    """Rebuild the saved structure on ``model`` (the original, freshly built) and load weights.

    ``model`` is modified in place and returned; for a wrapped model (DDP, DataParallel,
    ``torch.compile``) that is the plain model inside, which the caller wraps again.
    """
    model = unwrap(model)
    meta = read_metadata(path)
    try:
        recipe = json.loads(meta.get("recipe", "{}"))
        if not isinstance(recipe, dict):
            raise TypeError("recipe is not a mapping")
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path}: the stored decomposition recipe is corrupt ({err})") from err
    _check_prefix(path, model)
    apply_recipe(model, recipe)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        state = load_file(str(path), device=str(device))
    except Exception as err:
        raise ValueError(f"{path}: cannot read the weights ({err}); the file is corrupt") from err
    try:
        # Modules that version their state (e.g. torchvision's MNASNet) read it from the
        # metadata, which safetensors does not store: the fresh model's own is the right one.
        state = OrderedDict(state)
        state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path} does not fit this model ({str(err).splitlines()[0]} ...): build the same "
            "architecture, input channels and classes the checkpoint was saved from"
        ) from err
    return model


def _check_prefix(path: PathLike, model: nn.Module) -> None:
    """A file whose names all carry a wrapper prefix the model lacks: say so, not "wrong architecture"."""
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
    prefix = wrapper_prefix(names)
    own = wrapper_prefix(model.state_dict().keys())
    if prefix is None or prefix == own:
        return
    raise ValueError(
        f"{path}: every name in the checkpoint starts with {prefix!r} (it was saved from a "
        "DistributedDataParallel/DataParallel or torch.compile wrapper), which this plain model's names lack; "
        f"strip the prefix {prefix!r} from the names (or save the model with trp.save, which removes wrappers)"
    )
