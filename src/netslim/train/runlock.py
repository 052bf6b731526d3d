"""One writer per run folder: a lock file that names the run holding it.

``with hold(folder): ...`` takes an exclusive ``flock`` on ``folder/.netslim.lock`` and
writes the holder's pid, host, start time and command into it. A second netslim run
into the same folder fails at once with a one-line error naming the holder. The
operating system drops the lock when its process ends, however it ends (``kill -9``
too), so the lock of a dead run is simply taken over by the next one; the file it
leaves behind is overwritten. On network file systems ``flock`` works where the
server supports locks (NFSv4; NFSv3 with lockd). Under torchrun only rank 0 writes
the run folder, so only rank 0 takes the lock. Where ``fcntl`` does not exist
(Windows), there is no lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from netslim.errors import NetslimError
from netslim.files import make_dirs, write_error

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".netslim.lock"


def holder_text(info: dict) -> str:
    """``"pid 123 on host h since 2026-11-28 12:00:00 UTC (netslim train ...)"``."""
    if not info:
        return "a run that is just starting"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started", 0)))
    command = f" ({info['command']})" if info.get("command") else ""
    return f"pid {info.get('pid')} on host {info.get('host')} since {since}{command}"


def read_holder(folder: str | Path) -> dict:
    """What the lock file of ``folder`` says about its (last) holder; {} if nothing."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def hold(folder: str | Path) -> Iterator[None]:
    """Hold the lock of the run folder ``folder`` (created if missing) for the body.

    Raises:
        NetslimError: another live process holds it (the message names it), or the
            folder cannot be written.
    """
    folder = Path(folder)
    created = not folder.exists()
    make_dirs(folder)
    if fcntl is None:
        yield
        return
    path = folder / LOCK_NAME
    fd = _lock(path, folder)
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(["netslim", *sys.argv[1:]])[:200],
        }
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        yield
    finally:
        # Unlink while still locked; a run that opened the old file meanwhile sees that the
        # path no longer leads to what it locked and tries again (see _lock).
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        if created:  # a run that stopped before writing anything leaves no empty folder
            with contextlib.suppress(OSError):
                folder.rmdir()  # fails unless empty


def _lock(path: Path, folder: Path) -> int:
    """Open and flock ``path``; the descriptor of the locked file."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NetslimError(
                f"{folder} is in use by another netslim run: {holder_text(read_holder(folder))}; "
                "wait for it to end, stop it, or choose another --out"
            ) from None
        except OSError:  # the file system has no locks: run unlocked rather than not at all
            return fd
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
