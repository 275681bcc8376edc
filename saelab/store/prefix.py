"""A complete store made of the first shards of another (finished or still being harvested).

A harvest is sequential and deterministic, so its first N shards are exactly what a harvest of those
tokens would hold: a long harvest can feed a study of its first tokens while it runs on. The prefix's
shards are hard links to the source's (copies across file systems); its manifest lists those shards,
is marked complete, and says what it was cut from (``prefix_of``). The statistics are recomputed
from the stored rows (the source's running statistics cover all its shards so far, and their norms
came from the float32 activations, so a prefix of a float16 store differs from them in the last
digits); the source's per-position exclusion counts are not kept (they are running totals).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors import safe_open

from saelab import atomic
from saelab.store.format import MANIFEST, RunningStats, StoreError, read_manifest
from saelab.store.reading import ActivationStore

STATS_CHUNK = 16384   # rows per statistics update (bounds the float32 temporaries)


def shards_for(manifest: dict, tokens: int) -> int:
    """How many leading shards hold at least ``tokens`` corpus positions (all of them if fewer)."""
    context = int(manifest["context"])
    for i, entry in enumerate(manifest["shards"]):
        if entry.get("seq_end", 0) * context >= tokens:
            return i + 1
    return len(manifest["shards"])


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)                      # another file system: copy


def _stats(path: Path, shards: list[dict], d_in: int) -> RunningStats:
    stats = RunningStats(d_in)
    for entry in shards:
        with safe_open(str(path / entry["file"]), framework="pt") as f:
            acts = f.get_tensor("acts")                                 # (rows, d_in) storage dtype
        for chunk in acts.split(STATS_CHUNK):
            x = chunk.float()
            stats.update(x, x.norm(dim=1))
    return stats


def make_prefix(src: Path | str, out: Path | str, *, tokens: int | None = None,
                shards: int | None = None) -> ActivationStore:
    """Write the store ``out`` of the first ``shards`` shards of ``src`` (or as many as hold ``tokens``)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    manifest = read_manifest(src)
    n = shards if shards is not None else shards_for(manifest, tokens or 0)
    have = len(manifest["shards"])
    if n < 1 or n > have:
        raise StoreError(f"{src} has {have} complete shards; a prefix needs 1 to {have}, not {n}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"refusing to write the prefix into {out}: the folder is not empty; choose a new --out")
    taken = manifest["shards"][:n]
    with atomic.atomic_dir(out) as tmp:
        for entry in taken:
            _link(src / entry["file"], tmp / entry["file"])
        stats = _stats(tmp, taken, int(manifest["d_in"]))
        last = taken[-1].get("seq_end", 0)
        new = {k: v for k, v in manifest.items() if k != "excluded"}
        new.update(shards=taken, n_rows=sum(s["rows"] for s in taken), complete=True, n_sequences=last,
                   corpus_exhausted=False, stats=stats.to_json(),
                   skipped_sequences=[s for s in manifest.get("skipped_sequences", []) if s < last],
                   prefix_of={"path": str(src.resolve()), "shards": n, "of_shards": have,
                              "source_complete": bool(manifest.get("complete"))})
        atomic.write_json(tmp / MANIFEST, new)
    return ActivationStore.open(out)
