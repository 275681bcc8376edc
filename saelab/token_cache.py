"""A local corpus tokenised once, on disk, reused by every later harvest, analysis and evaluation.

Reading and tokenising text costs a tenth of a small model's forward pass (the builtin model at
a middle layer reads ~50k tokens/s per core, the tokenizer ~700k): on a machine whose cores all
run the model that tenth is lost throughput. So the first time a local corpus (``stdlib``, a
folder, a file, a ``.jsonl``) meets a tokenizer, every document is tokenised (in Rust, in batches,
on all cores) and written here; afterwards packing sequences is a few numpy slices.

Layout: ``<cache>/tokens/<key>/`` with ``tokens.bin`` (int32, all documents back to back, in the
corpus' fixed order, every split), ``offsets.bin`` (int64, ``n_docs + 1``) and ``index.json`` (document
names, the sha256 of both files, the key's ingredients). ``<key>`` hashes the tokenizer definition
and every source file's relative path, size and modification time, so an edited corpus or another
tokenizer gets a new entry. ``<cache>`` is ``$SAELAB_CACHE``, else ``$XDG_CACHE_HOME/saelab``,
else ``~/.cache/saelab``; ``SAELAB_TOKEN_CACHE=0`` turns the cache off. Corpora over
``MAX_TEXT_BYTES`` and ``hf:`` datasets are tokenised on the fly instead.

A cache that cannot be written (read-only or full disk) or fails its checksum is reported with a
warning and the corpus is tokenised on the fly: the cache only ever changes speed, never tokens.
:func:`sequences` packs a corpus' sequences from the cache when there is one, else on the fly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from saelab import atomic
from saelab.progress import bar as progress_bar
from saelab.runtime import cache_root
from saelab.corpus import (CorpusSpec, bos_token_id, documents, in_split, pack, source_files, token_stream,
                           tokenizer_identity)

FORMAT = "saelab-token-cache"
VERSION = 2
"""2: windows start with exactly one BOS (:data:`saelab.corpus.WINDOW_START`). The cached document tokens did
not change, but the key did, so nothing packed under the old rule is taken for the new one."""
MAX_TEXT_BYTES = 2 << 30      # larger local corpora are tokenised on the fly
BUILD_BATCH_CHARS = 4 << 20   # text per tokenizer call while building (bounds memory)


class TokenizedCorpus(NamedTuple):
    """Every document of a corpus as token ids: document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``."""

    names: list[str]
    offsets: np.ndarray   # (n_docs + 1,) int64
    tokens: np.ndarray    # (n_tokens,) int32, memory-mapped
    path: Path


def enabled() -> bool:
    return os.environ.get("SAELAB_TOKEN_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_key(spec: CorpusSpec, tokenizer) -> dict | None:
    """What identifies a tokenised corpus; None when the corpus is not cached (hf:, too large)."""
    files = source_files(spec)
    if files is None:
        return None
    root, paths = files
    listing = hashlib.sha256()
    total = 0
    for p in paths:
        st = p.stat()
        total += st.st_size
        name = p.relative_to(root).as_posix() if p != root else p.name
        listing.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode("utf-8"))
    if total > MAX_TEXT_BYTES:
        return None
    return {"format": FORMAT, "version": VERSION, "source": spec.source, "root": str(root.resolve()),
            "files": len(paths), "text_bytes": total, "listing_sha256": listing.hexdigest(),
            "tokenizer_sha256": tokenizer_identity(tokenizer)["sha256"]}


def _key_dir(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:24]
    return cache_root() / "tokens" / digest


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _load(folder: Path, key: dict) -> TokenizedCorpus:
    """Open a cache entry, checking its key, sizes and checksums; ValueError when it is unusable."""
    try:
        index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable index ({e})") from None
    if index.get("key") != key:
        raise ValueError("its key does not match this corpus and tokenizer")
    for name in ("tokens.bin", "offsets.bin"):
        if _file_sha256(folder / name) != index["sha256"][name]:
            raise ValueError(f"{name} fails its checksum")
    offsets = np.fromfile(folder / "offsets.bin", dtype="<i8")
    n_tokens = (folder / "tokens.bin").stat().st_size // 4
    if len(offsets) != len(index["names"]) + 1 or offsets[-1] != n_tokens:
        raise ValueError("offsets and tokens disagree")
    tokens = np.memmap(folder / "tokens.bin", dtype="<i4", mode="r") if n_tokens else np.zeros(0, "<i4")
    return TokenizedCorpus(index["names"], offsets, tokens, folder)


def _build(folder: Path, spec: CorpusSpec, tokenizer, key: dict) -> None:
    """Tokenise every document of ``spec`` (all splits) into a new cache entry, atomically."""
    with atomic.atomic_dir(folder) as tmp:
        names, offsets = [], [0]
        with open(tmp / "tokens.bin", "wb") as out:
            batch: list[str] = []

            def flush() -> None:
                # The batched call runs the Rust tokenizer on all cores; ids equal tokenizer.encode's.
                ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
                for doc in ids:
                    out.write(np.asarray(doc, dtype="<i4").tobytes())
                    offsets.append(offsets[-1] + len(doc))
                batch.clear()

            chars = 0
            with progress_bar(desc=f"tokenising {spec.source} once (cached for later runs)", unit="doc") as bar:
                for doc in documents(CorpusSpec(spec.source, "all")):
                    names.append(doc.name)
                    batch.append(doc.text)
                    chars += len(doc.text)
                    bar.update(1)
                    if chars >= BUILD_BATCH_CHARS:
                        flush()
                        chars = 0
                if batch:
                    flush()
        np.asarray(offsets, dtype="<i8").tofile(tmp / "offsets.bin")
        sums = {name: _file_sha256(tmp / name) for name in ("tokens.bin", "offsets.bin")}
        atomic.write_json(tmp / "index.json", {"key": key, "names": names, "sha256": sums})


def tokenized(spec: CorpusSpec, tokenizer) -> TokenizedCorpus | None:
    """The cached tokens of ``spec`` (built now if missing), or None to tokenise on the fly."""
    if not enabled():
        return None
    key = cache_key(spec, tokenizer)
    if key is None:
        return None
    folder = _key_dir(key)
    if folder.exists():
        try:
            return _load(folder, key)
        except ValueError as e:
            warnings.warn(f"token cache {folder} is unusable ({e}); rebuilding it")
    try:
        _build(folder, spec, tokenizer, key)
    except OSError as e:
        warnings.warn(f"could not write the token cache {folder} ({e.strerror or e}); tokenising {spec.source!r} "
                      "on the fly. Set SAELAB_CACHE to a writable folder, or SAELAB_TOKEN_CACHE=0 to silence this")
        return None
    return _load(folder, key)


def entries() -> list[dict]:
    """What the cache holds: one dict per tokenised corpus (source, files, tokens, bytes, path)."""
    root = cache_root() / "tokens"
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith("."):
            continue                                   # a build in progress, or one that was interrupted
        try:
            key = json.loads((folder / "index.json").read_text(encoding="utf-8"))["key"]
        except (OSError, ValueError, KeyError):
            key = {}
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        tokens = (folder / "tokens.bin").stat().st_size // 4 if (folder / "tokens.bin").exists() else 0
        found.append({"source": key.get("source", "?"), "root": key.get("root"), "files": key.get("files"),
                      "tokenizer_sha256": key.get("tokenizer_sha256"), "tokens": tokens, "bytes": size,
                      "path": str(folder)})
    return found


def clear() -> int:
    """Delete every cached corpus; returns how many bytes were freed."""
    root = cache_root() / "tokens"
    freed = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0
    shutil.rmtree(root, ignore_errors=True)
    return freed


# -- packed sequences, from the cache when there is one --------------------------------------------------

def sequences(spec: CorpusSpec | str, tokenizer, context: int, seed: int = 0, *,
              cache: bool = True) -> Iterator[torch.Tensor]:
    """Packed ``[context]`` token sequences of a corpus; deterministic for a given seed.

    Local corpora are read from this token cache (built on first use);
    ``cache=False`` or an uncacheable corpus tokenises on the fly. Both give the same sequences.
    """
    spec = CorpusSpec(spec) if isinstance(spec, str) else spec
    bos = bos_token_id(tokenizer)
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    cached = tokenized(spec, tokenizer) if cache else None
    if cached is None:
        return pack(token_stream(documents(spec), tokenizer, bos, seed), context, bos)
    return _pack_cached(cached, spec.split, bos, context, seed)


def _pack_cached(corpus, split: str, bos: int, context: int, seed: int | None,
                 chunk_windows: int = 64) -> Iterator[torch.Tensor]:
    """:func:`pack` of :func:`token_stream` over cached documents, cut a chunk of windows at a time."""
    piece = context - 1                                                  # each window: BOS + piece tokens
    order = [i for i, name in enumerate(corpus.names) if in_split(name, split)]
    if seed is not None:
        random.Random(seed).shuffle(order)   # the same permutation token_stream applies to the documents
    bos_piece = np.array([bos], dtype=np.int64)
    pieces: list[np.ndarray] = []
    have = 0
    for i in order:
        doc = corpus.tokens[corpus.offsets[i]:corpus.offsets[i + 1]]
        pieces += [bos_piece, doc]
        have += 1 + len(doc)
        if have >= chunk_windows * (piece + 1):
            windows, rest = _cut(np.concatenate(pieces).astype(np.int64), piece, bos)
            yield from windows
            pieces, have = [rest], len(rest)
    if have:                                                             # the last whole windows; a short tail is dropped
        yield from _cut(np.concatenate(pieces).astype(np.int64), piece, bos)[0]


def _cut(flat: np.ndarray, piece: int, bos: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """Windows of ``flat`` as :func:`pack` cuts them (BOS + ``piece`` tokens, a stream BOS at the cut
    dropped), and the uncut rest (its leading BOS tokens already dropped)."""
    starts, p, n = [], 0, len(flat)
    while True:
        while p < n and flat[p] == bos:
            p += 1                                   # a document's BOS at the cut: the window's BOS stands for it
        if p + piece > n:
            break
        starts.append(p)
        p += piece
    if not starts:
        return [], flat[p:]
    body = flat[np.asarray(starts)[:, None] + np.arange(piece)]                 # (n_windows, piece)
    windows = np.concatenate([np.full((len(starts), 1), bos, dtype=np.int64), body], axis=1)
    return list(torch.from_numpy(windows)), flat[p:]
