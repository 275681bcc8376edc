"""Crash-safe writes: write to a temporary sibling, fsync, rename over the target.

A reader (or a resumed job) therefore sees either the previous complete file/folder or the new
complete one, never a torn one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from saelab.errors import NotAFile, StorageError

# errno → what the user reads (the system's words); _STORAGE_TEXTS: how safetensors (Rust io::Error) and
# SQLite report the same conditions
_STORAGE = {code: os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)}
_STORAGE_TEXTS = {"no space left on device": errno.ENOSPC, "storagefull": errno.ENOSPC,
                  "database or disk is full": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
                  "read-only file system": errno.EROFS, "readonlyfilesystem": errno.EROFS,
                  "permission denied": errno.EACCES}


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} kB"


def storage_error(e: BaseException, target: Path | str, needed: int | None = None) -> StorageError | None:
    """``e`` as a one-line :class:`StorageError` naming ``target`` (and the bytes needed and free when
    known) if it is a full disk or a read-only/forbidden folder; None for any other error."""
    code = e.errno if isinstance(e, OSError) and e.errno in _STORAGE else None
    if code is None and not isinstance(e, OSError):
        text = str(e).lower()
        code = next((c for t, c in _STORAGE_TEXTS.items() if t in text), None)
    if code is None:
        return None
    # name what is being written, not the temporary sibling it is written through
    target = Path(*(re.sub(r"^\.(.+)\.tmp-\d+$", r"\1", part) for part in Path(target).parts))
    msg = f"cannot write {target}: {_STORAGE[code]}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        folder = next((p for p in (target, *target.parents) if p.is_dir()), None)
        free = shutil.disk_usage(folder).free if folder is not None else None
        parts = ([f"needs about {_size(needed)}"] if needed else []) + ([f"{_size(free)} free there"] if free is not None else [])
        msg += f" ({', '.join(parts)})" if parts else ""
        msg += "; free some space or write to another folder"
    else:
        msg += "; make the folder writable or write to another folder"
    err = StorageError(msg + ". Nothing was left half-written; rerun (with --resume where the stage has it)")
    err.errno = code
    return err


@contextmanager
def storage_errors(target: Path | str, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk or a read-only folder met inside the block into a :class:`StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        err = storage_error(e, target, needed)
        if err is None:
            raise
        raise err from e


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(target: Path | str) -> Path:
    """The temporary sibling a write of ``target`` goes to (hidden; named after this process)."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def discard_temp_files(folder: Path | str) -> None:
    """Delete this process's temporary files in ``folder`` (writes abandoned after an error)."""
    for tmp in Path(folder).glob(f".*.tmp-{os.getpid()}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def commit(tmp: Path, target: Path | str) -> None:
    """Make the fully written ``tmp`` durable and move it over ``target``: fsync, rename, fsync the folder."""
    target = Path(target)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to ``target``."""
    tmp = temp_path(target)
    try:
        with storage_errors(target):
            yield tmp
            commit(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(target: Path | str, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: Path | str, obj) -> None:
    write_bytes(target, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def write_tensors(target: Path | str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(target) as tmp, storage_errors(target, needed):
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def truncate_jsonl_log(path: Path | str, step: int) -> None:
    """Drop JSONL records whose ``step`` is past ``step``: a run resumed from that checkpoint redoes them."""
    path = Path(path)
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if _step_of(line) is not None and _step_of(line) <= step]
    write_bytes(path, "".join(line + "\n" for line in keep).encode("utf-8"))


def _step_of(line: str) -> int | None:
    """The step of one JSONL record; None for a blank line or one torn by a crash mid-write."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec.get("step", 0) if isinstance(rec, dict) else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts as alive until reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


def pid_of_temp(name: str) -> int | None:
    """The PID in a temporary name ``.<target>.tmp-PID`` / ``.<target>.old-PID`` (None if not one)."""
    head, sep, pid = name.rpartition("-")
    return int(pid) if sep and pid.isdigit() and head.endswith((".tmp", ".old")) else None


def remove_stale_temps(target: Path | str) -> list[Path]:
    """Delete the temporary siblings of ``target`` (``.<name>.tmp-PID`` files or folders, and
    ``.<name>.old-PID`` folders once ``target`` exists again) left by killed processes: only those
    whose PID is no longer running. Returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    olds = list(target.parent.glob(f".{target.name}.old-*")) if target.exists() else []  # else recover_dir's
    for tmp in [*target.parent.glob(f".{target.name}.tmp-*"), *olds]:
        pid = pid_of_temp(tmp.name)
        if pid is None or pid_alive(pid):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


@contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces ``target`` as a whole.

    Every file in it is fsynced before the swap. The old folder is moved aside, the new one moved
    in, then the old one deleted: after a crash, either name holds a complete folder.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with storage_errors(target):
            tmp.mkdir(parents=True)
            yield tmp
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            fsync_dir(tmp)
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(target: Path | str) -> None:
    """After a crash between the two renames of :func:`atomic_dir`, put the old folder back."""
    target = Path(target)
    if target.exists():
        return
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
        os.replace(old, target)
        return


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def regular_file(path: Path | str, what: str = "file") -> Path:
    """``path`` when it is a regular file (symlinks followed) or missing (the caller says what is missing);
    a FIFO, device, socket or folder is refused with :class:`NotAFile` before anything opens it, since
    reading a FIFO or a device can block forever or never end."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise NotAFile(f"{path}: the {what} is {kind}, not a regular file; saelab reads only regular files "
                       "(replace it with the real file)")
    return path
