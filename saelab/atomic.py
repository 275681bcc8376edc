"""Crash-safe writes: write to a temporary sibling, fsync, rename over the target.

A reader (or a resumed job) therefore sees either the previous complete file/folder or the new
complete one, never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file


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
    with atomic_path(target) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def truncate_jsonl_log(path: Path | str, step: int) -> None:
    """Drop JSONL records whose ``step`` is past ``step``: a run resumed from that checkpoint redoes them."""
    path = Path(path)
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    write_bytes(path, "".join(line + "\n" for line in keep).encode("utf-8"))


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
    tmp.mkdir(parents=True)
    try:
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
