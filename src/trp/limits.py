"""The limits on untrusted input, in one place, and the one bounded JSON reader.

Every file trp reads is untrusted: a size it declares is checked against these limits and
against the bytes actually present before anything is allocated; a file over a limit is
refused with a :class:`trp.errors.FileError` naming the file, the limit and how to raise it.
Each limit can be raised with an environment variable (a positive integer) for a legitimate
file that exceeds it:

=================================  ======================  ========================================
limit                              default                 environment variable
=================================  ======================  ========================================
JSON file / metadata field size    64 MiB                  ``TRP_MAX_JSON_BYTES``
JSON nesting depth                 100                     ``TRP_MAX_JSON_DEPTH``
pixels of one decoded image        50 million (~ 7070²)    ``TRP_MAX_IMAGE_PIXELS``
examples in one data file          10 million              ``TRP_MAX_EXAMPLES``
=================================  ======================  ========================================

(The bounds on a model file's declared channels, classes and input size are in
:mod:`trp.app.files`; the batch bound of timing and export is :data:`trp.deploy.latency.MAX_BATCH`.)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Union

from .errors import FileError, one_line

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_IMAGE_PIXELS", "MAX_EXAMPLES", "limit", "json_depth",
           "parse_json", "read_json", "read_json_lines"]

_DEFAULTS = {
    "TRP_MAX_JSON_BYTES": 64 * 2**20,
    "TRP_MAX_JSON_DEPTH": 100,
    "TRP_MAX_IMAGE_PIXELS": 50_000_000,
    "TRP_MAX_EXAMPLES": 10_000_000,
}


def limit(name: str) -> int:
    """The limit ``name`` (e.g. ``TRP_MAX_JSON_BYTES``): the environment's value if set, else the default."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return _DEFAULTS[name]
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        from .errors import ConfigError

        raise ConfigError(f"${name}={text!r}: give a positive integer (default {_DEFAULTS[name]})")
    return value


MAX_JSON_BYTES = _DEFAULTS["TRP_MAX_JSON_BYTES"]
MAX_JSON_DEPTH = _DEFAULTS["TRP_MAX_JSON_DEPTH"]
MAX_IMAGE_PIXELS = _DEFAULTS["TRP_MAX_IMAGE_PIXELS"]
MAX_EXAMPLES = _DEFAULTS["TRP_MAX_EXAMPLES"]

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in the JSON ``text`` (brackets inside strings ignored)."""
    import numpy as np

    if "[" not in text and "{" not in text:
        return 0
    bare = _STRINGS.sub("", text).encode("ascii", "ignore")
    codes = np.frombuffer(bare, dtype=np.uint8)
    steps = np.zeros(codes.shape, dtype=np.int64)
    steps[(codes == ord("[")) | (codes == ord("{"))] = 1
    steps[(codes == ord("]")) | (codes == ord("}"))] = -1
    return int(np.cumsum(steps).max()) if steps.size else 0


def parse_json(text: Union[str, bytes], what: object) -> Any:
    """The JSON value in ``text`` (from ``what``, a file or field named in errors), within the size and
    depth limits; anything else raises :class:`~trp.errors.FileError` naming ``what``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise FileError(f"{what} is not UTF-8 JSON ({err.reason} at byte {err.start}): the file is corrupt") from None
    max_bytes, max_depth = limit("TRP_MAX_JSON_BYTES"), limit("TRP_MAX_JSON_DEPTH")
    if len(text) > max_bytes:
        raise FileError(f"{what} is {len(text):,} characters long, over the limit of {max_bytes:,} for JSON trp "
                        "reads: the file is corrupt or crafted (raise the limit with $TRP_MAX_JSON_BYTES)")
    depth = json_depth(text)
    if depth > max_depth:
        raise FileError(f"{what} is nested too deeply ({depth:,} levels, over the limit of {max_depth}) for JSON trp "
                        "reads: the file is corrupt or crafted (raise the limit with $TRP_MAX_JSON_DEPTH)")
    try:
        return json.loads(text)
    except RecursionError:
        raise FileError(f"{what} is nested too deeply to read: the file is corrupt or crafted") from None
    except ValueError as err:  # JSONDecodeError, and integer literals too long to convert
        raise FileError(f"{what} is not valid JSON ({one_line(err)[:200]}): the file is corrupt; write it again") from None


def _read_bounded(path: Path) -> bytes:
    max_bytes = limit("TRP_MAX_JSON_BYTES")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    if size > max_bytes:
        raise FileError(f"{path} is {size:,} bytes, over the limit of {max_bytes:,} for JSON trp reads: the file "
                        "is corrupt or crafted (raise the limit with $TRP_MAX_JSON_BYTES)")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def read_json(path: Union[str, os.PathLike]) -> Any:
    """The JSON value in the file ``path``, read within the limits (see :func:`parse_json`)."""
    path = Path(path)
    return parse_json(_read_bounded(path), path)


def read_json_lines(path: Union[str, os.PathLike]) -> list[tuple[int, str]]:
    """``(line number, text)`` of the non-empty lines of a JSON-lines file, after the file's size check.

    Parse each with :func:`parse_json` (a partial last line is the caller's to judge).
    """
    path = Path(path)
    data = _read_bounded(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FileError(f"{path} is not UTF-8 ({err.reason} at byte {err.start}): the file is corrupt") from None
    return [(n, line) for n, line in enumerate(text.split("\n"), 1)]
