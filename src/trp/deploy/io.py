"""Save and load (decomposed) models: safetensors weights plus the decomposition recipe.

A file holds the model's ``state_dict`` as safetensors and, in the safetensors
metadata, the recipe ``{layer name: {"scheme", "rank"}}`` of every factorized layer.
Loading replays the recipe on a freshly built original model, then loads the weights.
Nothing is pickled. A file is untrusted: its recipe is checked against the model (known
layers and schemes, ranks within each layer's maximum) and the stored tensor shapes against
the rebuilt model before any weight is read, so a crafted file cannot make loading allocate
more than the model itself; every failure is a ``ValueError`` naming the field.
Nothing is pickled. A DistributedDataParallel, DataParallel or ``torch.compile`` wrapper is
removed on both sides: names are the plain model's, never ``module.``-prefixed.
"""

from __future__ import annotations

import json
from collections import OrderedDict
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.decompose import apply_recipe, check_recipe, recipe_of
from ..errors import Error, FileError, WriteError, is_write_failure, write_error
from ..limits import parse_json
from ..core.wrappers import unwrap, wrapper_prefix

__all__ = [
    "save", "load", "read_metadata", "read_recipe", "parse_json_field", "stored_shapes",
    "check_recipe", "check_shapes", "check_dtypes", "stored_dtypes", "check_file", "atomic_write", "check_destination",
    "remove_stale_temporaries",
]

PathLike = Union[str, os.PathLike]
FORMAT = "trp"
FORMAT_VERSION = "1"


def check_destination(path: PathLike) -> Path:
    """``path`` as a Path, or :class:`~trp.errors.WriteError` when a file cannot go there.

    Checked before any work: an existing directory at ``path``, or a parent that is a file.
    """
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"cannot write {path}: it is an existing directory; give a file name inside it "
                         f"(e.g. {path / 'model.safetensors'})")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise WriteError(f"cannot write {path}: {parent} is a file, not a folder; choose another location")
            break
    return path


class atomic_write:
    """Context manager yielding a temporary path that replaces ``path`` only on success.

    The destination is checked first (:func:`check_destination`); on every failure the temporary
    file is removed, and a failed write (full disk, read-only folder, permissions, a C++ stream
    error) raises :class:`~trp.errors.WriteError` naming ``path``.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = check_destination(path)
        self.tmp: Optional[Path] = None

    def __enter__(self) -> Path:
        check_destination(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as err:
            raise write_error(err, self.path) from None
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is None:
            try:
                umask = os.umask(0)
                os.umask(umask)
                # mkstemp makes 0600 (and writers that recreate the file too): give it the usual mode
                os.chmod(self.tmp, 0o666 & ~umask)
                os.replace(self.tmp, self.path)
            except OSError as err:
                self.tmp.unlink(missing_ok=True)
                raise write_error(err, self.path) from None
            return
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if exc is not None and not isinstance(exc, Error) and is_write_failure(exc):
            raise write_error(exc, self.path) from None


def save(model: nn.Module, path: PathLike, metadata: Optional[dict[str, str]] = None, *,
         factory: Optional[str] = None, input_shape: Optional[Sequence[int]] = None, data: str = "") -> None:
    """Write ``model``'s weights and decomposition recipe to ``path`` (atomically).

    ``metadata`` adds string entries (e.g. how to rebuild the original model). A wrapped
    model (DDP, DataParallel, ``torch.compile``) is saved as the plain model inside.
    ``factory="package.module:callable"`` (a callable without arguments returning the original
    model) with ``input_shape`` records how to rebuild a model from outside trp's registry, so the
    command line (``trp bench``, ``trp export``, ...) can load the file (it imports the factory only
    when told to: ``--trust-factory``); ``data`` names its data set for accuracy checks.
    """
    path = check_destination(path)  # before any work
    model = unwrap(model)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if factory is not None:
        if input_shape is None or not all(isinstance(d, int) and d >= 1 for d in input_shape):
            raise ValueError("trp.save: factory= needs input_shape=(N, C, H, W), positive integers")
        if not isinstance(factory, str) or ":" not in factory:
            raise ValueError(f"trp.save: factory must look like 'package.module:callable', got {factory!r}")
        meta["trp_factory"] = json.dumps({"factory": factory, "input_shape": [int(d) for d in input_shape],
                                          "data": str(data)})
    meta.update(format=FORMAT, format_version=FORMAT_VERSION,
                recipe=json.dumps(recipe_of(model), sort_keys=True))
    meta = dict(sorted(meta.items()))  # fixed key order: the same model gives the same bytes
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        _canonical_header(tmp)


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted (safetensors writes them in hash order)."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:  # same entries, same length: rewrite in place, padded as safetensors pads
            f.seek(8)
            f.write(text + b" " * (length - len(text)))
            return
    padded = text + b" " * (-len(text) % 8)
    with open(path, "rb") as src, open(path.with_name(path.name + ".hdr"), "wb") as dst:
        dst.write(struct.pack("<Q", len(padded)) + padded)
        src.seek(8 + length)
        shutil.copyfileobj(src, dst)
    os.replace(path.with_name(path.name + ".hdr"), path)


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


def parse_json_field(meta: dict[str, str], key: str, path: PathLike, default: str = "{}") -> Any:
    """The JSON value stored under metadata ``key`` (read within :mod:`trp.limits`); FileError naming the
    file and field otherwise."""
    return parse_json(meta.get(key, default), f"{path}: metadata field {key!r}")


def read_recipe(meta: dict[str, str], path: PathLike) -> dict[str, Any]:
    """The decomposition recipe stored in ``meta`` (a mapping; its entries are checked by :func:`check_recipe`)."""
    recipe = parse_json_field(meta, "recipe", path)
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: metadata field 'recipe' must be a mapping {{layer: {{scheme, rank}}}}, "
                         f"got {type(recipe).__name__}; the file is corrupt")
    return recipe


def stored_dtypes(path: PathLike) -> dict[str, str]:
    """Name -> safetensors dtype (``F32``, ``I8``, ``BOOL``, ...) of every tensor stored in a file (header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise FileError(f"{path}: cannot read the tensor table ({err}); the file is truncated or corrupt") from None


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def check_dtypes(model: nn.Module, dtypes: dict[str, str], source: PathLike = "file") -> None:
    """FileError naming the first tensor stored as integers or booleans where the model holds floats
    (or the reverse): loading would cast it silently into nonsense weights."""
    for name, tensor in model.state_dict().items():
        stored = dtypes.get(name)
        if stored is None:
            continue
        if tensor.is_floating_point() != (stored in _FLOAT_DTYPES):
            want = "a floating type" if tensor.is_floating_point() else str(tensor.dtype).removeprefix("torch.")
            raise FileError(f"{source}: tensor {name!r} is stored as {stored}, but the model holds {want} there "
                            "(it would load as nonsense weights); the file is corrupt or crafted: save the model again")


def stored_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor stored in a safetensors file (read from the header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path}: cannot read the tensor table ({err}); the file is truncated or corrupt") from None


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], source: PathLike = "file") -> None:
    """ValueError listing every missing, unexpected or differently shaped tensor (nothing cut off)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k}: stored {list(shapes[k])}, model {list(expected[k])}"
             for k in sorted(set(expected) & set(shapes)) if shapes[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_listed(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches {_listed(wrong)}")
    if problems:
        raise ValueError(
            f"{source} does not fit this model ({'; '.join(problems)}): build the same architecture, "
            "input channels and classes the file was saved from"
        )


def check_file(path: PathLike, model: nn.Module) -> dict[str, str]:
    """Check ``path`` against ``model`` and give ``model`` its recipe's structure; read no weights.

    Returns the file's metadata. Build ``model`` on the ``meta`` device to check a file
    without allocating anything.
    """
    meta = read_metadata(path)
    recipe = read_recipe(meta, path)
    shapes = stored_shapes(path)
    _check_prefix(path, list(shapes), model)
    apply_recipe(model, recipe, path)  # checks every entry before building anything
    check_shapes(model, shapes, path)
    check_dtypes(model, stored_dtypes(path), path)
    return meta


def load(path: PathLike, model: nn.Module) -> nn.Module:
    """Rebuild the saved structure on ``model`` (the original, freshly built) and load weights.

    ``model`` is modified in place and returned; for a wrapped model (DDP, DataParallel,
    ``torch.compile``) that is the plain model inside, which the caller wraps again. Everything in
    the file is checked against ``model`` before weights are read (see the module docstring); a
    bad file raises ValueError.
    """
    model = unwrap(model)
    check_file(path, model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        state = load_file(str(path), device=str(device))
    except Exception as err:
        raise ValueError(f"{path}: cannot read the weights ({err}); the file is corrupt") from None
    # Modules that version their state (e.g. torchvision's MNASNet) read it from the metadata,
    # which safetensors does not store: the fresh model's own is the right one.
    state = OrderedDict(state)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)  # names and shapes checked above
    return model


def remove_stale_temporaries(path: PathLike) -> list[Path]:
    """Delete the temporary files interrupted :class:`atomic_write` calls left for ``path``; return them."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob wildcards escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _check_prefix(path: PathLike, names: list[str], model: nn.Module) -> None:
    """A file whose names all carry a wrapper prefix the model lacks: say so, not "wrong architecture"."""
    prefix = wrapper_prefix(names)
    own = wrapper_prefix(model.state_dict().keys())
    if prefix is None or prefix == own:
        return
    raise ValueError(
        f"{path}: every name in the checkpoint starts with {prefix!r} (it was saved from a "
        "DistributedDataParallel/DataParallel or torch.compile wrapper), which this plain model's names lack; "
        f"strip the prefix {prefix!r} from the names (or save the model with trp.save, which removes wrappers)"
    )
