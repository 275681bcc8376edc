"""One writer per artifact: an exclusive lock on the folder (or file) a long job writes.

The lock is an advisory ``flock`` on a hidden sibling, ``.<name>.lock`` (beside the store, the SAE
run folder or features.db, never inside it: a run folder is replaced as a whole when training ends).
The kernel drops the lock when its holder dies, however it dies, so a stale lock file (kill -9, a
crash) is simply taken over; the PID written in it only names the holder for the error message. The
holder deletes the file when it finishes; a contender that locked a file just deleted notices (the
name points at another inode or none) and tries again. Locks are re-entrant within a process
(``analyze()`` holds features.db's lock for its whole pass and ``featuredb.build`` takes it again),
and not taken on platforms without ``fcntl``.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from saelab.atomic import storage_errors
from saelab.errors import FolderLocked, SaelabError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; jobs run unguarded
    fcntl = None

# lock file → [fd, depth] held by this process: flock would refuse the same process a second
# descriptor, so a nested exclusive() only counts.
_held: dict[Path, list] = {}
_guard = threading.Lock()


def lock_path(target: Path | str) -> Path:
    """The lock file that guards ``target``: ``.<name>.lock`` in the same folder."""
    target = Path(target).expanduser().absolute()
    return target.with_name(f".{target.name}.lock")


def holder(target: Path | str) -> int | None:
    """PID recorded by the last process that locked ``target`` (None when never locked or unreadable)."""
    try:
        text = lock_path(target).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


@contextmanager
def exclusive(target: Path | str, what: str = "job", noun: str = "folder") -> Iterator[None]:
    """Hold the lock on ``target`` for the block; a second writer gets :class:`FolderLocked` at once.

    ``what`` names the job and ``noun`` the target in messages ("harvest", "store folder")."""
    if fcntl is None:
        yield
        return
    path = lock_path(target)
    with _guard:
        if path in _held:
            _held[path][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            _release(path)
        return
    fd = _acquire(path, target, what, noun)
    with _guard:
        _held[path] = [fd, 1]
    try:
        yield
    finally:
        _release(path)


def _acquire(path: Path, target: Path | str, what: str, noun: str) -> int:
    """Open and flock ``path``; returns the descriptor. Retries when the file was replaced meanwhile."""
    try:
        with storage_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if isinstance(e, SaelabError):
            raise
        raise OSError(f"cannot create the {noun} {target}: {e.strerror or e} ({e.filename})") from None
    while True:
        with storage_errors(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)   # no O_TRUNC: the holder's PID must survive
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = holder(target)
            who = f"process {pid}" if pid is not None else "another process"
            raise FolderLocked(f"{Path(target)} is in use: {who} is writing it (lock {path}). Wait for it to "
                               f"finish or stop it, then run this {what} again") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:            # else the holder released and unlinked it between our open and flock
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def _release(path: Path) -> None:
    with _guard:
        entry = _held[path]
        entry[1] -= 1
        if entry[1]:
            return
        del _held[path]
    # Unlink while still holding the lock: a process that opened the old file sees, once it gets the
    # flock, that the name no longer points at it and starts over (see _acquire).
    path.unlink(missing_ok=True)
    os.close(entry[0])
