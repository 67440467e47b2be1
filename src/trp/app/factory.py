"""Models from outside trp's registry on the command line: ``--model-factory package.module:callable``.

``trp decompose|evaluate|bench|export|profile`` take a model either from trp's registry (the
``trp_model`` metadata of files ``trp train`` writes) or from a Python *factory*: a callable that
takes no arguments and returns the ``nn.Module`` (random or pretrained weights), given as
``--model-factory package.module:callable`` with ``--input-shape 1,3,224,224`` (and ``--data NAME``
for the commands that need a data set). The working directory is importable.

A file written from such a model (``trp decompose --model-factory ...``, or
``trp.save(model, path, factory="package.module:callable", input_shape=(1, 3, 224, 224))`` in
Python) records the factory in its ``trp_factory`` metadata, so later commands need nothing more
on it; but a factory string is code that importing runs, and a file may come from anywhere:
trp imports a factory recorded in a file only when the user says so, by passing
``--model-factory`` (the user's own) or ``--trust-factory`` (accept the file's). Otherwise the
command stops with an error showing the recorded factory and both flags.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import click

if TYPE_CHECKING:  # torch is imported when a model is built, not for --help
    import torch
    from torch import nn

__all__ = ["FactorySpec", "import_factory", "parse_shape", "factory_options", "load_factory_file", "active",
           "FACTORY_KEY"]

FACTORY_KEY = "trp_factory"
_NAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_MAX_DIMS, _MAX_SIDE = 6, 1 << 16


def parse_shape(text: Any, what: str = "--input-shape") -> tuple[int, ...]:
    """``"1,3,224,224"`` (or a list of integers) -> ``(1, 3, 224, 224)``; ValueError naming ``what``."""
    items = text if isinstance(text, (list, tuple)) else [t for t in re.split(r"[,x\s]+", str(text).strip()) if t]
    try:
        shape = tuple(int(t) for t in items)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: cannot read {str(text)[:60]!r}; give sizes like 1,3,224,224") from None
    if not 1 <= len(shape) <= _MAX_DIMS or any(isinstance(t, bool) or not 1 <= t <= _MAX_SIDE for t in shape):
        raise ValueError(f"{what}: {str(text)[:60]!r} must be 1 to {_MAX_DIMS} sizes from 1 to {_MAX_SIDE}")
    return shape


def import_factory(name: str) -> Callable[[], nn.Module]:
    """The callable ``package.module:attr`` names (imported; the working directory is importable)."""
    if not isinstance(name, str) or len(name) > 300 or not _NAME.match(name):
        raise ValueError(f"model factory {str(name)[:80]!r} must look like package.module:callable")
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model factory {name}: cannot import {module_name} ({err})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model factory {name}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model factory {name} is not callable")
    return obj


@dataclass(frozen=True)
class FactorySpec:
    """How to rebuild a model from outside the registry; stands in for :class:`~trp.app.engine.ModelSpec`."""

    factory: str
    input_shape: tuple[int, ...]
    data: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def model(self) -> str:
        return f"factory {self.factory}"

    @property
    def in_channels(self) -> int:
        return self.input_shape[1] if len(self.input_shape) > 1 else 0

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(self.input_shape[2:])

    @property
    def num_classes(self) -> int:
        return 0  # not known without running the model

    def build(self) -> nn.Module:
        from torch import nn

        model = import_factory(self.factory)()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model factory {self.factory} returned {type(model).__name__}, not an nn.Module")
        return model

    def metadata(self) -> dict[str, str]:
        return {FACTORY_KEY: json.dumps({"factory": self.factory, "input_shape": list(self.input_shape),
                                         "data": self.data})}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> "FactorySpec":
        """The factory a file records, every field checked (the file is untrusted); nothing imported."""
        from ..deploy.io import parse_json_field

        d = parse_json_field(meta, FACTORY_KEY, path)
        where = f"{path}: metadata field {FACTORY_KEY}"
        if not isinstance(d, dict) or not isinstance(d.get("factory"), str) or not _NAME.match(d["factory"]):
            raise ValueError(f"{where} must hold a factory package.module:callable; the file is corrupt or crafted")
        data = d.get("data", "")
        if not isinstance(data, str) or len(data) > 200:
            raise ValueError(f"{where}.data must be a data set name")
        return cls(d["factory"], parse_shape(d.get("input_shape"), f"{where}.input_shape"), data)


@dataclass
class _Active:
    """What the running command was given: an explicit factory, and whether recorded ones are trusted."""

    factory: Optional[str] = None
    input_shape: Optional[tuple[int, ...]] = None
    data: str = ""
    trust: bool = False


_ACTIVE = _Active()


def active() -> _Active:
    """The factory options of the running command (defaults outside one)."""
    return _ACTIVE


def explicit_spec() -> Optional[FactorySpec]:
    """The spec ``--model-factory`` gives, or None."""
    if _ACTIVE.factory is None:
        return None
    if _ACTIVE.input_shape is None:
        raise ValueError("--model-factory needs --input-shape (e.g. --input-shape 1,3,224,224)")
    return FactorySpec(_ACTIVE.factory, _ACTIVE.input_shape, _ACTIVE.data)


def load_factory_file(path: Path, meta: dict[str, str], device: torch.device | str = "cpu") -> tuple[nn.Module, FactorySpec]:
    """The model in ``path`` rebuilt from a factory: the one given with ``--model-factory``, else the recorded one
    (only with ``--trust-factory``)."""
    from ..deploy.io import load as load_weights

    spec = explicit_spec()
    if spec is None:
        if FACTORY_KEY not in meta:
            raise ValueError(
                f"{path} does not say which model it holds (no 'trp_model' or '{FACTORY_KEY}' metadata): give the "
                "model with --model-factory package.module:callable --input-shape 1,C,H,W")
        recorded = FactorySpec.from_metadata(meta, path)
        if not _ACTIVE.trust:
            raise ValueError(
                f"{path} was saved from the model factory {recorded.factory} (input shape "
                f"{','.join(map(str, recorded.input_shape))}); importing it runs that code, so trp does not do it "
                f"unasked: pass --trust-factory to use it, or --model-factory {recorded.factory} "
                f"--input-shape {','.join(map(str, recorded.input_shape))}")
        spec = FactorySpec(recorded.factory, _ACTIVE.input_shape or recorded.input_shape,
                           _ACTIVE.data or recorded.data)
    elif FACTORY_KEY in meta and not _ACTIVE.data:
        # the file's recorded data spec (the factory given on the command line wins); a corrupt one is refused
        spec = FactorySpec(spec.factory, spec.input_shape, FactorySpec.from_metadata(meta, path).data)
    model = spec.build()
    return load_weights(path, model).to(device), spec


def resolve_source(source: Path, device: torch.device | str = "cpu") -> Optional[tuple[nn.Module, FactorySpec, None]]:
    """``(model, spec, None)`` when ``source`` is a factory model ('-' or a file the factory options cover), else None."""
    from ..deploy.io import read_metadata

    spec = explicit_spec()
    if spec is not None and str(source) == "-":
        return spec.build().to(device), spec, None
    path = Path(source)
    if not path.is_file() or path.suffix == ".pt":
        return None
    meta = read_metadata(path)
    if "trp_model" in meta and spec is None:
        return None
    if spec is None and FACTORY_KEY not in meta:
        return None
    model, spec = load_factory_file(path, meta, device)
    return model, spec, None


def _call_with_factory(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    factory = kwargs.pop("model_factory", None)
    shape = kwargs.pop("input_shape", None)
    data = kwargs.pop("factory_data", None)
    trust = kwargs.pop("trust_factory", False)
    saved = (_ACTIVE.factory, _ACTIVE.input_shape, _ACTIVE.data, _ACTIVE.trust)
    try:
        try:
            _ACTIVE.input_shape = parse_shape(shape) if shape is not None else None
        except ValueError as err:
            raise click.UsageError(str(err)) from None
        if factory is not None:
            try:
                import_factory(factory)  # a clear error now, before any work
            except ValueError as err:
                raise click.UsageError(str(err)) from None
            if _ACTIVE.input_shape is None:
                raise click.UsageError("--model-factory needs --input-shape (e.g. --input-shape 1,3,224,224)")
        _ACTIVE.factory, _ACTIVE.data, _ACTIVE.trust = factory, data or "", bool(trust)
        if factory is not None and "no_eval" in kwargs and not data:
            kwargs["no_eval"] = True  # no data set to check accuracy on
        return fn(**kwargs)
    finally:
        _ACTIVE.factory, _ACTIVE.input_shape, _ACTIVE.data, _ACTIVE.trust = saved


def factory_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Click options ``--model-factory``, ``--input-shape``, ``--data``, ``--trust-factory`` for a command.

    Put it under ``@main.command``; the command itself needs no new parameters: while it runs,
    loading a model source (:func:`trp.app.workflow.load_source`) honours them.
    """
    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        return _call_with_factory(fn, kwargs)

    options = [
        click.option("--model-factory", default=None, metavar="PACKAGE.MODULE:CALLABLE",
                     help="Build the model with this Python callable (no arguments, returns the nn.Module) instead "
                          "of trp's registry; SOURCE is then a trp.save file of it, or '-' for the model as the "
                          "factory builds it. Needs --input-shape."),
        click.option("--input-shape", default=None, metavar="N,C,H,W",
                     help="Input shape of a --model-factory model (overrides a file's recorded one)."),
        click.option("--data", "factory_data", default=None, metavar="NAME",
                     help="Data set (trp's names) of a --model-factory model, for accuracy checks."),
        click.option("--trust-factory", is_flag=True,
                     help="Import the model factory a file records (its trp_factory metadata): that runs its code."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
