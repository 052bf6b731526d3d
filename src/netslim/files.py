"""Atomic file writes: a reader sees the old file or the new one, never half of one.

A write that the system refuses (a full disk, a read-only folder, a path through a file)
raises :class:`~netslim.errors.NetslimError` naming the file and what to do, and leaves
nothing behind: the temporary file is removed and the old file, if any, is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Callable

from netslim.errors import NetslimError

# What atomic_write's temporary files are called: ".NAME.<8 random characters>.tmp"
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")

_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space and run the command again",
    errno.EDQUOT: "the disk quota is used up; free some space and run the command again",
    errno.EROFS: "the file system is read-only; choose a writable --out",
    errno.EACCES: "no permission to write there; choose a writable --out",
    errno.EPERM: "no permission to write there; choose a writable --out",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another --out",
    errno.EISDIR: "it is a folder; give a file name",
}


def write_error(path: str | Path, error: OSError) -> NetslimError:
    """The one-line error for an OSError met while writing ``path``."""
    reason = error.strerror or str(error)
    advice = _ADVICE.get(error.errno, "check the path and the disk, then run the command again")
    return NetslimError(f"cannot write {path}: {reason}; {advice}")


def make_dirs(path: str | Path) -> None:
    """``mkdir -p path``, raising NetslimError when the system refuses."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NetslimError(f"{path} is a file, not a folder; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: torch.save reports a failed write as a RuntimeError
    ("unexpected pos ...") raised while handling the OSError of the file's write."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def _temp_file_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in ``path``'s folder (made if missing), named as
    :func:`remove_temp_files` recognises it: ``(open descriptor, its path)``."""
    make_dirs(path.parent)
    try:
        return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    if path.is_dir():
        raise NetslimError(f"cannot write {path}: it is a folder; give a file name")
    fd, tmp = _temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; use the usual mode
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _os_error(e) if isinstance(e, Exception) else None
        if cause is not None:
            raise write_error(path, cause) from None
        raise


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in ``folder``.

    Call it only while no other process writes to ``folder`` (e.g. holding its run lock):
    a temporary file of a live write looks the same. Returns the files removed.
    """
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        if _TEMP_NAME.match(path.name) and path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """Check, before any work, that a file can be written at ``path``; return it.

    Refuses a folder, a path through a file and a folder the system will not write in
    (probed by creating and deleting a temporary file, which also catches read-only
    file systems where permission bits say nothing, e.g. for root).
    """
    path = Path(path)
    if path.is_dir():
        raise NetslimError(f"{flag} {path} is a folder; give the path of a file to write")
    fd, probe = _temp_file_beside(path)
    os.close(fd)
    os.unlink(probe)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented JSON (one trailing newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
