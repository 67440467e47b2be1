"""The machinery of the configuration schema (:mod:`trp.app.config`): field types and validation.

Field types with ranges (:func:`Number`, :func:`Integer`, strict ``Flag`` / ``Text``), the
validation of a dataclass through pydantic (v2) whenever it is built (:class:`_Schema`), and the
one-line :class:`~trp.errors.ConfigError` that names the key and the file (:func:`config_error`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from typing import Annotated, Any, Optional

from pydantic import BeforeValidator, ConfigDict, Strict, TypeAdapter, ValidationError

from ..errors import ConfigError

__all__ = ["Number", "Integer", "Flag", "Text", "config_error"]


# -- the field types of the schema ---------------------------------------------------------
def _span(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def Number(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False,
           what: str = "") -> Any:
    """A finite float in a range (strings such as ``'1e-4'`` read as numbers; bools refused)."""
    def check(v: Any) -> float:
        number = _as_number(v)
        try:
            number = None if number is None else float(number)
        except OverflowError:  # an integer beyond float's range
            number = None
        ok = (number is not None and math.isfinite(number) and (number > low if low_open else number >= low)
              and (number < high if high_open else number <= high))
        if not ok:
            raise ValueError(f"must be {what or 'a number in ' + _span(low, high, low_open, high_open)}, got {_shown(v)}")
        return float(number)  # type: ignore[arg-type]

    return Annotated[float, BeforeValidator(check)]


def Integer(low: int, high: int) -> Any:
    """An integer in ``[low, high]`` (integral floats and numeric strings read as integers; bools refused)."""
    def check(v: Any) -> int:
        number = _as_number(v)
        if isinstance(number, float) and (not math.isfinite(number) or not number.is_integer()):
            number = None
        if number is None or not low <= number <= high:
            raise ValueError(f"must be an integer from {low} to {high}, got {_shown(v)}")
        return int(number)

    return Annotated[int, BeforeValidator(check)]


def _as_number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v  # type: ignore[return-value]  (exact, however large)
    if isinstance(v, float):
        return v
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _shown(v: Any) -> str:
    try:
        text = repr(v)
    except ValueError:  # an integer too long to print
        return "an integer too long to print"
    return text if len(text) <= 60 else text[:57] + "..."


def _milestones(v: Any) -> Any:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"must be a list of epochs, e.g. [81, 122], got {_shown(v)}")
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        raise ValueError(f"must be a list of epochs (integers), e.g. [81, 122], got {_shown(v)}")
    if any(e < 1 for e in v) or list(v) != sorted(set(v)):
        raise ValueError(f"must be increasing epochs >= 1 (lr is divided after each), got {list(v)}")
    return list(v)


Flag = Annotated[bool, Strict()]


Text = Annotated[str, Strict()]


# -- errors --------------------------------------------------------------------------------
_MESSAGES = {
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
}


def config_error(err: ValidationError, source: str, fields: Any = ()) -> ConfigError:
    """One line naming the key(s) and the file for the first problem pydantic found."""
    problems = err.errors()
    unknown = [str(p["loc"][-1]) for p in problems if p["type"] in ("unexpected_keyword_argument", "extra_forbidden")]
    prefix = f"{source}: " if source else ""
    if unknown:
        known = sorted(f.name for f in fields)
        return ConfigError(f"{prefix}unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}")
    first = problems[0]
    key = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(first["loc"]))
    kind = first["type"]
    if kind in ("missing", "missing_argument"):
        return ConfigError(f"{prefix}needs a {key}" + (", e.g. 'energy:0.9'" if key == "criterion" else ""))
    if kind == "value_error":
        message = " ".join(str(first["ctx"]["error"]).split())
    elif kind == "literal_error":
        choices = first["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        if str(first["loc"][-1]) == "scheme" and isinstance(first.get("input"), str):  # as trp.core.schemes says it
            return ConfigError(f"{prefix}unknown scheme {_shown(first['input'])}: choose one of {choices}")
        message = f"must be one of {choices}, got {_shown(first.get('input'))}"
    else:
        message = f"{_MESSAGES.get(kind, ' '.join(first['msg'].split()).lower())}, got {_shown(first.get('input'))}"
    return ConfigError(f"{prefix}{key} {message}".strip())


# Where the config being validated came from (a file, "--resume"), for errors raised in __post_init__.
_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("trp_config_source", default="")


_VALIDATING: contextvars.ContextVar[bool] = contextvars.ContextVar("trp_config_validating", default=False)


def _validated(cls: type, data: dict[str, Any], source: str) -> Any:
    """``cls`` built from ``data`` through its schema (types, ranges, then its cross-field checks)."""
    source_token = _SOURCE.set(source)
    token = _VALIDATING.set(True)
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as err:
        raise config_error(err, source, dataclasses.fields(cls)) from None
    except ConfigError:
        raise
    except ValueError as err:  # a cross-field check: name the file
        prefix = f"{source}: " if source and not str(err).startswith(source) else ""
        raise ConfigError(f"{prefix}{err}") from None
    finally:
        _VALIDATING.reset(token)
        _SOURCE.reset(source_token)


_ADAPTERS: dict[type, TypeAdapter] = {}


def _adapter(cls: type) -> TypeAdapter:
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


class _Schema:
    """Validate a dataclass built directly (``TrainConfig(lr=...)``) through its schema, once."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    def __post_init__(self) -> None:
        if not _VALIDATING.get():  # built from Python: validate the given values, keep the coerced ones
            checked = _validated(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                                 _SOURCE.get())
            for f in dataclasses.fields(self):
                object.__setattr__(self, f.name, getattr(checked, f.name))
            return
        self._check()

    def _check(self) -> None:
        """The rules between fields (ValueError naming the field)."""
