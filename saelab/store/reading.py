"""Reading a store: checked shards, shuffled resumable batches with read-ahead, the summary."""

from __future__ import annotations

import hashlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from saelab.atomic import regular_file
from saelab.store.format import DTYPES, MANIFEST, SPLITS, StoreError, read_manifest


def non_finite_rows(acts: torch.Tensor, chunk: int = 8192) -> list[int]:
    """Indices of the rows of ``acts [n, d_in]`` holding a NaN or inf (read in chunks: shards are mapped)."""
    bad = []
    for start in range(0, acts.shape[0], chunk):
        rows = ~torch.isfinite(acts[start:start + chunk]).all(dim=1)     # (chunk,)
        bad += (rows.nonzero().squeeze(1) + start).tolist()
    return bad


# -- reading ---------------------------------------------------------------------------------------

def _split_mask(seq: torch.Tensor, split: str, heldout_fraction: float) -> torch.Tensor | None:
    """Rows of ``split``: held-out = whole sequences whose splitmix64 hash falls below the fraction."""
    if split == "all":
        return None
    z = seq.numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    held = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < heldout_fraction
    return torch.from_numpy(held if split == "heldout" else ~held)


class ActivationStore:
    """A read-only view of a harvested activation store (see the module docstring)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.d_in = int(manifest["d_in"])
        self.n_rows = int(sum(s["rows"] for s in manifest["shards"]))
        self.hook_name = manifest["hook_name"]
        self.model_name = manifest["model_name"]
        self.context = int(manifest["context"])
        self.dtype = DTYPES[manifest["dtype"]]
        self._verified: set[str] = set()
        self._split_rows: dict[tuple, list[torch.Tensor | None]] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path, allow_incomplete: bool = False) -> "ActivationStore":
        """Open a store folder; size-checks every shard. An unfinished harvest needs ``allow_incomplete``."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"activation store {path} does not exist")
        manifest = read_manifest(path)
        if not manifest.get("complete", False) and not allow_incomplete:
            raise StoreError(f"{path} holds an unfinished harvest ({len(manifest['shards'])} shards so far); "
                             "finish it with 'saelab harvest ... --resume' before training on it")
        store = cls(path, manifest)
        for entry in manifest["shards"]:
            store._check_size(entry)
        return store

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, model={self.model_name!r}, hook={self.hook_name!r}, "
                f"rows={self.n_rows}, d_in={self.d_in}, shards={len(self.manifest['shards'])})")

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    def _check_size(self, entry: dict) -> Path:
        file = self.path / entry["file"]
        if not regular_file(file, "activation shard").exists():
            raise StoreError(f"shard {file} is missing (listed in {self.path / MANIFEST})")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise StoreError(f"shard {file} is truncated or modified: {size} bytes on disk, "
                             f"{entry['bytes']} in the manifest; re-harvest it")
        return file

    def read_shard(self, index: int, verify: bool | None = None) -> dict[str, torch.Tensor]:
        """Load shard ``index`` with size/shape checks; checksum on first read (or when ``verify``).

        The tensors are memory-mapped from the file: copy what you keep (``_load_window`` does)."""
        entry = self.shards[index]
        file = self._check_size(entry)
        with self._lock:
            check = verify if verify is not None else entry["file"] not in self._verified
        if check:
            # Streamed through a small buffer, and the tensors below are memory-mapped: reading a shard
            # into bytes and parsing those cost 2 fresh copies (~200k page faults per 6 shards, 2.8x
            # the time on our VMs).
            with open(file, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != entry["sha256"]:
                raise StoreError(f"shard {file} is corrupt: sha256 {digest[:16]}… does not match the manifest's "
                                 f"{entry['sha256'][:16]}…; re-harvest it")
            with self._lock:
                self._verified.add(entry["file"])
        try:
            tensors = load_file(str(file))
        except Exception as e:  # safetensors raises its own error types for malformed headers
            raise StoreError(f"shard {file} cannot be parsed: {e}") from None
        if file.stat().st_size != entry["bytes"]:
            raise StoreError(f"shard {file} changed while being read ({file.stat().st_size} bytes, "
                             f"expected {entry['bytes']})")
        self._check_shapes(file, entry, tensors)
        return tensors

    def _check_shapes(self, file: Path, entry: dict, t: dict[str, torch.Tensor]) -> None:
        n = entry["rows"]
        expect = {"acts": ((n, self.d_in), self.dtype), "tokens": ((n,), torch.int32),
                  "seq": ((n,), torch.int64), "pos": ((n,), torch.int32)}
        for key, (shape, dtype) in expect.items():
            if key not in t:
                raise StoreError(f"shard {file} has no tensor {key!r}")
            if tuple(t[key].shape) != shape or t[key].dtype != dtype:
                raise StoreError(f"shard {file}: {key} is {tuple(t[key].shape)} {t[key].dtype}, "
                                 f"the manifest says {shape} {dtype}")

    def verify(self) -> list[str]:
        """Re-check every shard (size, sha256, shapes, finite values); return a list of problems (empty when sound)."""
        problems = []
        for i in range(len(self.shards)):
            try:
                acts = self.read_shard(i, verify=True)["acts"]
            except StoreError as e:
                problems.append(str(e))
                continue
            bad = non_finite_rows(acts)
            if bad:
                problems.append(f"shard {self.path / self.shards[i]['file']}: {len(bad)} rows hold NaN/inf values "
                                f"(first rows {bad[:5]}); re-harvest with nan_policy='skip' or find the cause")
        return problems

    def _read_seq(self, index: int) -> torch.Tensor:
        """Only the ``seq [n]`` column of a shard (memory-mapped; the checksum waits for the full read)."""
        entry = self.shards[index]
        file = self._check_size(entry)
        try:
            with safe_open(str(file), framework="pt") as f:
                seq = f.get_tensor("seq")
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise StoreError(f"shard {file} cannot be parsed: {e}") from None
        if tuple(seq.shape) != (entry["rows"],) or seq.dtype != torch.int64:
            raise StoreError(f"shard {file}: seq is {tuple(seq.shape)} {seq.dtype}, expected ({entry['rows']},) int64")
        return seq

    def _split_index(self, split: str, heldout_fraction: float) -> list[torch.Tensor | None]:
        """Per shard: row indices of ``split`` (None: all rows). Reads only the ``seq`` column."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        key = (split, heldout_fraction)
        if key not in self._split_rows:
            out = []
            for i in range(len(self.shards)):
                mask = None if split == "all" else _split_mask(self._read_seq(i), split, heldout_fraction)
                out.append(None if mask is None else mask.nonzero().squeeze(1))
            self._split_rows[key] = out
        return self._split_rows[key]

    def n_rows_in(self, split: str = "train", heldout_fraction: float = 0.05) -> int:
        """Rows in ``split`` (train / heldout / all)."""
        idx = self._split_index(split, heldout_fraction)
        return sum(s["rows"] if r is None else len(r) for s, r in zip(self.shards, idx))

    def batches(self, batch_size: int, *, seed: int = 0, start_batch: int = 0, split: str = "train",
                heldout_fraction: float = 0.05, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                epochs: int | None = None, window_shards: int = 4, prefetch: int = 2) -> Iterator[torch.Tensor]:
        """float32 ``[batch_size, d_in]`` batches; see the module docstring for the order.

        Global batch g has ``batch_size * world_size`` rows; rank r gets rows ``[r*B, (r+1)*B)`` of
        it. ``start_batch`` skips g global batches without reading them. ``epochs=None``: forever.
        A final partial global batch of each epoch is dropped.
        """
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_batch < 0 or window_shards < 1:
            raise ValueError(f"bad batches() arguments: batch_size={batch_size}, rank={rank}, "
                             f"world_size={world_size}, start_batch={start_batch}, window_shards={window_shards}")
        global_batch = batch_size * world_size
        per_epoch = self.n_rows_in(split, heldout_fraction) // global_batch
        if per_epoch == 0:
            raise ValueError(f"{self.path}: split {split!r} has {self.n_rows_in(split, heldout_fraction)} rows, "
                             f"fewer than one global batch of {global_batch}")
        gen = self._iter_batches(batch_size, global_batch, per_epoch, seed=seed, start_batch=start_batch,
                                 split=split, heldout_fraction=heldout_fraction, rank=rank, shuffle=shuffle,
                                 epochs=epochs, window_shards=window_shards)
        return prefetched(gen, prefetch) if prefetch > 0 else gen

    def _epoch_windows(self, seed: int, epoch: int, shuffle: bool, window_shards: int) -> list[list[int]]:
        order = list(range(len(self.shards)))
        if shuffle:
            order = np.random.default_rng([seed + epoch, 0]).permutation(len(order)).tolist()
        return [order[i:i + window_shards] for i in range(0, len(order), window_shards)]

    def _load_window(self, shard_ids: list[int], rows: list[torch.Tensor | None], seed: int, epoch: int,
                     w: int, shuffle: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The window's rows in storage dtype ``[n, d_in]`` and their order (None: as stored).

        Batches gather through the order, so the window is held once, not also as a shuffled copy.
        """
        parts = []
        for i in shard_ids:
            acts = self.read_shard(i)["acts"]
            parts.append(acts if rows[i] is None else acts[rows[i]])
        # A copy in memory we own: shards are memory-mapped, and a file changed under a mapping
        # would crash the reader instead of raising.
        window = torch.cat(parts) if len(parts) > 1 else parts[0].clone()   # (rows_in_window, d_in)
        if not shuffle:
            return window, None
        return window, torch.from_numpy(np.random.default_rng([seed + epoch, 1, w]).permutation(window.shape[0]))

    def _iter_batches(self, batch_size: int, global_batch: int, per_epoch: int, *, seed: int, start_batch: int,
                      split: str, heldout_fraction: float, rank: int, shuffle: bool, epochs: int | None,
                      window_shards: int) -> Iterator[torch.Tensor]:
        rows = self._split_index(split, heldout_fraction)
        counts = [s["rows"] if r is None else len(r) for s, r in zip(self.shards, rows)]
        epoch, g = divmod(start_batch, per_epoch)
        lo, hi = rank * batch_size, (rank + 1) * batch_size
        # While one window's batches are served, the next window is read in a thread: loading four
        # shards (read, checksum, concatenate) took 1.5-2 s, a stall every ~85 training steps otherwise.
        pool = ThreadPoolExecutor(1, thread_name_prefix="saelab-store-window")
        ahead = None                             # ((epoch, window index), future) of the window being read

        def load(at: tuple[int, int], ids: list[int]):
            if ahead is not None and ahead[0] == at:
                return ahead[1].result()
            return self._load_window(ids, rows, seed, *at, shuffle)

        def read_ahead(at: tuple[int, int], windows: list[list[int]]):
            e, w = (at[0], at[1] + 1) if at[1] + 1 < len(windows) else (at[0] + 1, 0)
            if epochs is not None and e >= epochs:
                return None
            ids = windows[w] if e == at[0] else self._epoch_windows(seed, e, shuffle, window_shards)[0]
            return (e, w), pool.submit(self._load_window, ids, rows, seed, e, w, shuffle)

        try:
            while epochs is None or epoch < epochs:
                offset = g * global_batch            # row offset of the next batch in this epoch's stream
                carry = torch.empty(0, self.d_in)    # rows of a global batch that began in the previous window
                start = 0
                windows = self._epoch_windows(seed, epoch, shuffle, window_shards)
                for w, ids in enumerate(windows):
                    n = sum(counts[i] for i in ids)
                    if start + n <= offset or g >= per_epoch:   # before the resume point / past the last batch
                        start += n
                        continue
                    window, order = load((epoch, w), ids)
                    ahead = read_ahead((epoch, w), windows)

                    def take(a: int, b: int) -> torch.Tensor:   # (b - a, d_in) float32
                        return (window[a:b] if order is None else window[order[a:b]]).float()

                    k = max(offset - start, 0)
                    start += n
                    if len(carry):
                        need = global_batch - len(carry)
                        if n - k < need:
                            carry = torch.cat([carry, take(k, n)])
                            continue
                        yield torch.cat([carry, take(k, k + need)])[lo:hi]
                        k, g, carry = k + need, g + 1, torch.empty(0, self.d_in)
                    while k + global_batch <= n and g < per_epoch:
                        yield take(k + lo, k + hi)
                        k, g = k + global_batch, g + 1
                    if g < per_epoch:
                        carry = take(k, n)
                epoch, g = epoch + 1, 0
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def prefetched(gen: Iterator[torch.Tensor], depth: int) -> Iterator[torch.Tensor]:
    """Run ``gen`` in a background thread, ``depth`` items ahead; errors re-raise in the consumer.

    Closing the returned generator (or dropping it) stops the thread at its next item."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in gen:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    thread = threading.Thread(target=produce, name="saelab-store-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def summary(store: ActivationStore) -> dict:
    """What ``saelab store info`` shows: provenance, size and the row-norm summary."""
    m = store.manifest
    norm = m.get("stats", {}).get("norm", {})
    median = norm.get("median")
    size = sum(s["bytes"] for s in m["shards"]) + (store.path / MANIFEST).stat().st_size
    return {
        "path": str(store.path), "model": m["model_name"], "model_weights_sha256": m.get("model_weights_sha256"),
        "hook": m["hook_name"], "hf_hook": m.get("hf_hook_name"), "d_in": store.d_in, "dtype": m["dtype"],
        "context": store.context, "corpus": m.get("corpus"), "rows": store.n_rows,
        "sequences": m.get("n_sequences", m["shards"][-1]["seq_end"] if m["shards"] else 0),
        "shards": len(m["shards"]), "bytes": size, "complete": bool(m.get("complete")),
        "corpus_exhausted": bool(m.get("corpus_exhausted")), "excluded": m.get("excluded", {}),
        "skipped_sequences": len(m.get("skipped_sequences", [])),
        "norm": {k: norm.get(k) for k in ("mean", "std", "min", "median", "p99", "max")},
        "max_over_median": norm["max"] / median if median else None,
    }
