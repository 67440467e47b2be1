"""The errors trp raises when it refuses something: one family, one line each.

Every refusal (a bad argument, a bad config value, an untrusted file that is corrupt or crafted,
a write that failed) is a :class:`trp.Error`. It subclasses :class:`ValueError`, so code written
against the earlier ``except ValueError`` keeps working. Its message is one line naming what was
refused (the file, the key, the option) and the fix; the command line prints it as ``Error: ...``
without a traceback (:mod:`trp.app.cli`).

- :class:`FileError`: a file trp reads is corrupt, crafted or of the wrong kind.
- :class:`ConfigError`: a config key, command-line option or argument has a wrong type or value.
- :class:`WriteError`: writing a file failed (full disk, read-only folder, permissions, a folder
  where the file should go); :func:`write_error` builds it from the OS's own error.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Optional, Union

__all__ = ["Error", "FileError", "ConfigError", "WriteError", "write_error", "one_line", "is_write_failure"]


class Error(ValueError):
    """Something trp refuses: the message names what and how to fix it (a :class:`ValueError`)."""


class FileError(Error):
    """A file trp reads is corrupt, crafted, too large or of the wrong kind."""


class ConfigError(Error):
    """A config key, option or argument has a wrong type or value."""


class WriteError(Error, OSError):
    """Writing a file failed: full disk, read-only location, permissions, or a folder in the way.

    Also an :class:`OSError` (with the OS's ``errno`` when there was one), as before it existed.
    """


def one_line(text: object) -> str:
    """``text`` with its whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


# What a C++ stream or torch's zip writer says when the disk fills or the file cannot be written.
_STREAM_FAILURES = ("iostream error", "basic_ios", "PytorchStreamWriter", "file write failed",
                    "No space left", "unexpected pos")


def is_write_failure(err: BaseException) -> bool:
    """Whether ``err`` is the OS's (or a C++ writer's) report of a failed write."""
    if isinstance(err, OSError):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _STREAM_FAILURES)


def write_error(err: BaseException, path: Optional[Union[str, os.PathLike]] = None) -> WriteError:
    """A one-line :class:`WriteError` for a failed write of ``path``, saying whether space or permissions
    are the cause (a C++ stream error, which names no cause, is checked against the free space)."""
    if isinstance(err, WriteError):
        return err
    error = _write_error(err, path)
    error.errno = getattr(err, "errno", None)
    return error


def _write_error(err: BaseException, path: Optional[Union[str, os.PathLike]]) -> WriteError:
    filename = getattr(err, "filename", None)
    place = Path(path) if path is not None else (Path(filename) if filename else "the output")
    code = getattr(err, "errno", None)
    if code is None and not isinstance(err, OSError):
        folder = Path(place).parent if isinstance(place, Path) else Path(".")
        try:
            if shutil.disk_usage(folder).free < 2**20:
                code = errno.ENOSPC
        except OSError:
            pass
    if code in (errno.ENOSPC, errno.EDQUOT):
        return WriteError(f"no space left writing {place}: free some space or choose another location")
    if code == errno.EROFS:
        return WriteError(f"cannot write {place}: the file system is read-only; choose another location")
    if code in (errno.EACCES, errno.EPERM):
        return WriteError(f"cannot write {place} (permission denied): fix its permissions or choose another location")
    if code == errno.EISDIR:
        return WriteError(f"cannot write {place}: it is a directory; give a file name")
    reason = getattr(err, "strerror", None) or one_line(err)
    return WriteError(f"cannot write {place} ({reason}): check the location and the free space")
