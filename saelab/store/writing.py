"""Writing a store: shards written then committed atomically, and preparing (or resuming) a folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from saelab import atomic
from saelab.errors import StorageError
from saelab.store.format import MANIFEST, read_manifest, shard_name


# -- writing ---------------------------------------------------------------------------------------

def shard_columns(acts: torch.Tensor, tokens: torch.Tensor, seq: torch.Tensor,
                  pos: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of one shard, checked and in their stored dtypes (no copy when they already are)."""
    n = acts.shape[0]
    if not (tokens.shape == seq.shape == pos.shape == (n,)):
        raise ValueError(f"shard columns disagree: acts {tuple(acts.shape)}, tokens {tuple(tokens.shape)}, "
                         f"seq {tuple(seq.shape)}, pos {tuple(pos.shape)}")
    return {"acts": acts.contiguous(), "tokens": tokens.to(torch.int32).contiguous(),
            "seq": seq.to(torch.int64).contiguous(), "pos": pos.to(torch.int32).contiguous()}


class PendingShard(NamedTuple):
    """A shard written to its temporary file and checksummed, not yet durable nor listed."""

    tmp: Path
    file: str
    rows: int
    bytes: int
    sha256: str


def _drop_cached_pages(file: Path) -> None:
    """Hand the page-cache pages of a written shard back, just before the next shard needs new ones.

    Pages freed and reused at once are cheap; pages that have sat free for a couple of seconds are
    returned to the hypervisor on our VMs and cost a fault each to get back. Dropping the previous
    shard's (clean, fsynced) pages right before writing the next one made the write of a 64 MB shard
    about 3x cheaper there; elsewhere it only keeps the store out of the page cache, which training
    reads much later through its own prefetching. Dirty pages are not dropped.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_shard(path: Path, index: int, acts: torch.Tensor, tokens: torch.Tensor, seq: torch.Tensor,
                pos: torch.Tensor) -> PendingShard:
    """First half of :func:`append_shard`: the CPU work. safetensors writes straight from the
    tensors' memory (no serialised copy of the shard) and the bytes depend only on the tensors (no
    timestamps), so reruns are identical; the checksum is read back from the written file."""
    name = shard_name(index)
    tmp = atomic.temp_path(Path(path) / name)
    if index:
        _drop_cached_pages(Path(path) / shard_name(index - 1))
    cols = shard_columns(acts, tokens, seq, pos)
    try:
        with atomic.storage_errors(Path(path) / name, sum(t.numel() * t.element_size() for t in cols.values())):
            save_file(cols, str(tmp))
        with open(tmp, "rb") as f:
            digest, size = hashlib.file_digest(f, "sha256").hexdigest(), os.fstat(f.fileno()).st_size
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return PendingShard(tmp, name, acts.shape[0], size, digest)


def commit_shard(path: Path, manifest: dict, shard: PendingShard, **extra) -> dict:
    """Second half of :func:`append_shard`, mostly waiting on the disk: fsync and rename the shard,
    then list it in the manifest (replaced atomically). Returns the new manifest. ``extra`` keys go
    into the shard's manifest entry, except ``manifest_update`` (merged into the manifest's top
    level in the same atomic write)."""
    path = Path(path)
    if shard.file != shard_name(len(manifest["shards"])):
        raise ValueError(f"shard {shard.file} committed out of order: the manifest lists {len(manifest['shards'])}")
    update = extra.pop("manifest_update", {})
    try:
        with atomic.storage_errors(path / shard.file, shard.bytes):
            atomic.commit(shard.tmp, path / shard.file)
    finally:
        shard.tmp.unlink(missing_ok=True)
    entry = {"file": shard.file, "rows": shard.rows, "bytes": shard.bytes, "sha256": shard.sha256, **extra}
    new = {**manifest, **update, "shards": [*manifest["shards"], entry]}
    new["n_rows"] = sum(s["rows"] for s in new["shards"])
    atomic.write_json(path / MANIFEST, new)
    return new


def append_shard(path: Path, manifest: dict, acts: torch.Tensor, tokens: torch.Tensor, seq: torch.Tensor,
                 pos: torch.Tensor, **extra) -> dict:
    """Write shard ``len(shards)`` atomically and list it in the manifest; returns the new manifest."""
    pending = write_shard(path, len(manifest["shards"]), acts, tokens, seq, pos)
    return commit_shard(path, manifest, pending, **extra)


# fields that must agree for a resumed harvest to continue the same store
IDENTITY = ("model_weights_sha256", "tokenizer", "hook_name", "hf_hook_name", "hook_io", "d_in", "dtype",
            "context", "bos", "positions", "corpus", "harvest")


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def identity_diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences in the harvest identity between two manifests."""
    a = _flat({k: old.get(k) for k in IDENTITY})
    b = _flat({k: new.get(k) for k in IDENTITY})
    return [f"{k}: store has {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _ours(name: str) -> bool:
    """Files a harvest writes (temporary files of an interrupted write included)."""
    return name == MANIFEST or (name.startswith("shard-") and name.endswith(".safetensors")) or (
        name.startswith(".") and ".tmp-" in name)


def prepare(path: Path, header: dict, resume: bool) -> dict:
    """Create the store folder for ``header`` or reopen it to resume; return its manifest.

    Refuses, without touching anything, a folder that is not empty and holds something else or a
    different harvest (naming the differing fields), or this harvest without ``resume``. On resume,
    removes leftovers of an interrupted write: temporary files and shards not in the manifest.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the store folder {path}: {e.strerror or e}") from None
    entries = [p.name for p in path.iterdir()]
    if (path / MANIFEST).exists():
        manifest = read_manifest(path)
        diff = identity_diff(manifest, header)
        if diff:
            verb = "resume" if resume else "write into"
            raise ValueError(f"refusing to {verb} {path}: it holds a different harvest ({'; '.join(diff)}). "
                             "Use another --out folder, or the original arguments to resume")
        if not resume:
            state = "complete" if manifest.get("complete") else f"unfinished, {len(manifest['shards'])} shards"
            raise FileExistsError(f"{path} already holds this harvest ({state}); pass --resume to continue it "
                                  "or choose another --out folder")
    elif entries and not all(_ours(n) and n.startswith(".") for n in entries):
        raise FileExistsError(f"refusing to write into {path}: the folder is not empty and is not an activation "
                              f"store (found {', '.join(sorted(entries)[:5])}); choose an empty or new --out folder")
    else:
        manifest = {**header, "shards": [], "n_rows": 0, "complete": False}
    listed = {s["file"] for s in manifest["shards"]}
    for name in entries:
        if _ours(name) and name != MANIFEST and name not in listed:
            (path / name).unlink()
    try:
        atomic.write_json(path / MANIFEST, manifest)
    except StorageError:
        raise
    except OSError as e:
        raise OSError(f"cannot write to the store folder {path}: {e.strerror or e}") from None
    return manifest
