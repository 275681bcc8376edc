"""Run a model over a corpus and record activations at hook points: to a store, or as a stream.

``harvest`` writes one :class:`~saelab.store.ActivationStore` per hook in a single forward pass that
stops after the last hooked layer. With one hook, ``out`` is the store; with several, each store
is ``out/<hook name>/`` (``:`` in raw module paths becomes ``_``) and a dict hook → store is returned.

Determinism and resume: the corpus gives the same sequences for the same seed; model batches are
``batch_size`` consecutive sequences and a shard is a whole number of batches
(``seqs_per_shard``), so a resumed run skips the sequences of the shards already stored and
recomputes exactly the same batches: its shards are byte-identical to an uninterrupted run's.

Positions: every window starts with BOS (see :mod:`saelab.corpus`), where real models park their
attention sink. :class:`saelab.positions.PositionRule` decides which positions are left out —
BOS positions (``exclude_bos``, default on) and sinks (norm above ``sink_factor`` × the window's
median, default 5) — and the store records the rule (``positions``) and the counts (``excluded``);
evaluation, analysis and steering rebuild the same rule from the SAE's provenance.
Every stored row's norm goes into the store's statistics.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import threading
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

from saelab import store as st
from saelab.corpus import WINDOW_START, CorpusSpec, bos_token_id, tokenizer_identity
from saelab.hooks import HookPoint, hook_shapes, resolve, run_to_hooks
from saelab.locks import exclusive
from saelab.models import LoadedModel, load_model
from saelab.positions import SINK_FACTOR, PositionRule
from saelab.progress import bar as progress_bar
from saelab.runtime import tune_allocator
from saelab.stage_config import HarvestConfig, with_overrides
from saelab.token_cache import sequences

SHARD_BYTES = 64 << 20  # default shard size: large writes, bounded memory
STATS_CHUNK = 16384     # rows per statistics update (bounds the float64 temporaries)
PREFETCH_BATCHES = 4    # token batches prepared ahead by the tokenising thread


class NonFiniteActivation(ValueError):
    """NaN or inf in an activation, with where it happened."""


def store_dir(out: Path, hook: str) -> Path:
    """Folder of one hook's store inside a multi-hook harvest."""
    return Path(out) / hook.replace(":", "_").replace("/", "_")


class _ShardBuffer(NamedTuple):
    """Preallocated columns of one shard, reused shard after shard (fresh memory costs page faults)."""

    acts: torch.Tensor    # (capacity, d_in) storage dtype
    tokens: torch.Tensor  # (capacity,) int32
    seq: torch.Tensor     # (capacity,) int64
    pos: torch.Tensor     # (capacity,) int32
    norms: torch.Tensor   # (capacity,) float32, for the statistics only (not stored in the shard)


class _Sink:
    """One hook's store being written: the filling shard buffer, stats, counters."""

    def __init__(self, point: HookPoint, path: Path, manifest: dict, dtype: torch.dtype):
        self.point, self.path, self.manifest, self.dtype = point, path, manifest, dtype
        self.first_new_shard = len(manifest["shards"])   # shards below this are already on disk
        stats = manifest.get("stats")
        self.stats = st.RunningStats.from_json(stats) if stats else st.RunningStats(manifest["d_in"])
        self.skipped = list(manifest.get("skipped_sequences", []))
        self.excluded = dict(manifest.get("excluded", {"bos": 0, "sink": 0}))
        self.capacity = manifest["harvest"]["seqs_per_shard"] * manifest["context"]
        # Two buffers: one filling while the writer thread writes the other; bounds memory to 2 shards.
        self.free: queue.Queue = queue.Queue()
        self.n_buffers = 0
        self.buf: _ShardBuffer | None = None
        self.n = 0

    def _new_buffer(self, writer: "_Writer") -> _ShardBuffer:
        try:
            return self.free.get_nowait()      # written inline: the one buffer is always back
        except queue.Empty:
            pass
        if self.n_buffers < 2:
            self.n_buffers += 1
            c = self.capacity
            return _ShardBuffer(torch.empty(c, self.manifest["d_in"], dtype=self.dtype),
                                torch.empty(c, dtype=torch.int32), torch.empty(c, dtype=torch.int64),
                                torch.empty(c, dtype=torch.int32), torch.empty(c, dtype=torch.float32))
        while True:
            try:
                return self.free.get(timeout=0.5)
            except queue.Empty:
                writer.raise_error()

    def add(self, act: torch.Tensor, norms: torch.Tensor, ids: torch.Tensor, seq0: int, keep: torch.Tensor,
            shard: int, rule: PositionRule, writer: "_Writer") -> None:
        """Copy the kept rows of ``act [b, ctx, d]`` (row ``norms [b, ctx]``; ``keep [b, ctx]``: finite
        sequences) into the shard buffer."""
        if shard < self.first_new_shard:
            return
        b, ctx, d = act.shape
        counted = rule.keep(ids, norms)
        if rule.bos_id is not None:
            self.excluded["bos"] += int((keep & (ids == rule.bos_id)).sum())
        self.excluded["sink"] += int((keep & rule.sinks(ids, counted)).sum())
        keep = keep & counted
        x = act.reshape(b * ctx, d)                                         # (b*ctx, d)
        seq = (torch.arange(b).unsqueeze(1) + seq0).expand(b, ctx).reshape(-1)
        pos = torch.arange(ctx).expand(b, ctx).reshape(-1)
        cols = (x, ids.reshape(-1), seq, pos, norms.reshape(-1))            # (b*ctx, d), (b*ctx,) x4
        if not bool(keep.all()):
            sel = keep.reshape(-1)
            cols = tuple(c[sel.to(c.device)] for c in cols)
        if self.buf is None:
            self.buf, self.n = self._new_buffer(writer), 0
        k = cols[0].shape[0]
        for dst, src in zip(self.buf, cols):
            dst[self.n:self.n + k].copy_(src)                               # converts to the storage dtype
        if self.dtype == torch.float16 and not bool(torch.isfinite(self.buf.acts[self.n:self.n + k]).all()):
            raise ValueError(f"activations at hook {self.point.name} exceed the float16 range (max |x| = "
                             f"{float(x.abs().max()):.3g} > 65504); harvest with --dtype bfloat16 or float32")
        self.n += k

    def take(self, writer: "_Writer") -> tuple[_ShardBuffer, int]:
        """Hand the filled buffer and its row count over to the writer; the next add takes a free one."""
        buf = self.buf if self.buf is not None else self._new_buffer(writer)
        n, self.buf, self.n = (self.n if self.buf is not None else 0), None, 0
        return buf, n


def spare_core(device: torch.device) -> bool:
    """Is a CPU core free for helper threads while the model runs?

    True for models on an accelerator, and when torch uses fewer threads than the process may run
    on. Otherwise a helper thread takes a core from torch's thread pool, whose threads wait for each
    other at every operation: measured on 2 cores, the background writer cost more (harvest/bare
    forward 0.81) than doing the same work inline between batches (0.86-0.90).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return device.type != "cpu" or cores > torch.get_num_threads()


class _Writer:
    """Writes shards in order, in two halves per shard.

    The CPU half (statistics, serialising, checksum) runs on a background thread when a core is
    spare, else inline between batches; the commit half (fsync, rename, manifest) always runs on the
    background thread, because it waits on the disk rather than using the CPU.
    """

    def __init__(self, cpu_in_background: bool) -> None:
        self.cpu_in_background = cpu_in_background
        self.error: BaseException | None = None
        # Bounded: inline, at most a few shards are written but not yet committed; in the background,
        # the sinks' two buffers each bound it already.
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.thread = threading.Thread(target=self._run, name="saelab-harvest-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.q.get()) is not None:
            try:
                if self.error is None:
                    job()
            except BaseException as e:  # re-raised in the harvesting thread
                self.error = e

    def submit(self, write: Callable[[], Callable[[], None]], release: Callable[[], None]) -> None:
        """``write()`` does the CPU half and returns the commit half; ``release()`` follows the CPU half."""
        self.raise_error()

        def cpu_half() -> Callable[[], None]:
            try:
                return write()
            finally:
                release()

        self.q.put((lambda: cpu_half()()) if self.cpu_in_background else cpu_half())

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self.raise_error()


def _write_error(sink: _Sink, index: int, e: OSError) -> OSError:
    return OSError(f"could not write shard {index} of {sink.path}: {e.strerror or e}. The store keeps its {index} "
                   "complete shards; fix the problem (disk space, permissions) and rerun with --resume")


def _write_job(sink: _Sink, buf: _ShardBuffer, n: int, index: int, entry: dict) -> Callable[[], Callable[[], None]]:
    """The two halves of writing shard ``index`` of one store (see :class:`_Writer`).

    Both halves run in shard order, so the statistics merge in the same order on every run.
    """
    def write() -> Callable[[], None]:
        *cols, norms = [c[:n] for c in buf]
        for chunk, chunk_norms in zip(cols[0].split(STATS_CHUNK), norms.split(STATS_CHUNK)):
            sink.stats.update(chunk, chunk_norms)
        update = {"stats": sink.stats.to_json(), "skipped_sequences": entry.pop("skipped"),
                  "excluded": entry.pop("excluded")}
        try:
            pending = st.write_shard(sink.path, index, *cols)
        except OSError as e:
            raise _write_error(sink, index, e) from None

        def commit() -> None:
            try:
                sink.manifest = st.commit_shard(sink.path, sink.manifest, pending, manifest_update=update, **entry)
            except OSError as e:
                raise _write_error(sink, index, e) from None
        return commit
    return write


def _flush(sinks: list[_Sink], writer: _Writer, shard: int, seq_start: int, seq_end: int) -> None:
    for sink in sinks:
        if shard < sink.first_new_shard:
            continue
        entry = {"seq_start": seq_start, "seq_end": seq_end, "skipped": list(sink.skipped),
                 "excluded": dict(sink.excluded)}
        buf, n = sink.take(writer)
        writer.submit(_write_job(sink, buf, n, shard, entry), lambda sink=sink, buf=buf: sink.free.put(buf))


def _row_norms(act: torch.Tensor) -> torch.Tensor:
    """``[b, ctx]`` float32 norms of ``act [b, ctx, d]``: one pass that serves the finiteness check,
    the outlier filter and the store's statistics (NaN/inf in a row makes its norm non-finite)."""
    return torch.linalg.vector_norm(act, dim=-1, dtype=torch.float32)


def _finite_rows(acts: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], seq0: int,
                 nan_policy: str) -> tuple[torch.Tensor, list[int]]:
    """``keep [b, ctx]``: False for whole sequences with a non-finite value (policy skip), and their
    corpus indices; or raise (policy fail) naming the hook, sequence and position."""
    bad = None
    for name, a in acts.items():
        if bool(torch.isfinite(norms[name]).all()):
            continue
        finite = torch.isfinite(a).all(-1)                                  # (b, ctx): the exact check
        if bool(finite.all()):
            continue                                                        # finite rows whose norm overflowed
        s, p = (int(v) for v in (~finite).nonzero()[0])
        if nan_policy == "fail":
            raise NonFiniteActivation(
                f"non-finite activation (NaN/inf) at hook {name}, corpus sequence {seq0 + s}, position {p}; "
                "the store keeps its complete shards. Rerun with --nan-policy skip (and --resume) to drop such "
                "sequences")
        bad = ~finite.all(1) if bad is None else bad | ~finite.all(1)
    b, ctx = next(iter(acts.values())).shape[:2]
    keep = torch.ones(b, ctx, dtype=torch.bool)
    if bad is None:
        return keep, []
    bad = bad.cpu()
    keep[bad] = False
    return keep, [seq0 + s for s in bad.nonzero().squeeze(1).tolist()]


def _batched(it: Iterator[torch.Tensor], n: int) -> Iterator[torch.Tensor]:
    while chunk := list(itertools.islice(it, n)):
        yield torch.stack(chunk)                                            # (b, ctx)


def _check_multi_out(out: Path, points: list[HookPoint]) -> None:
    """A multi-hook ``out`` may hold only this harvest's per-hook folders (checked before writing)."""
    if not out.is_dir():
        return
    expected = {store_dir(out, p.name).name for p in points}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in expected)
    if foreign:
        raise FileExistsError(f"refusing to write into {out}: a harvest of several hooks makes one folder per hook "
                              f"there, but it already holds {', '.join(foreign[:5])}; choose an empty or new --out")


def harvest(model: LoadedModel | str, hooks: list[str] | str, corpus: CorpusSpec | str, *, out: Path | str,
            config: HarvestConfig | None = None, resume: bool = False, progress: bool = True, **overrides):
    """Harvest ``config.tokens`` positions (rounded up to whole sequences) at ``hooks`` into stores.

    ``config``: a :class:`HarvestConfig`; its fields can also be given (or overridden) as keywords:
    ``harvest(lm, hook, corpus, out=..., tokens=400_000, dtype="float16")``. The store's manifest records
    it whole (``harvest``). Returns the :class:`ActivationStore` (one hook) or ``{hook: ActivationStore}``.
    """
    tune_allocator()   # long batch job: keep big blocks in the heap (saelab.runtime)
    if config is None and "tokens" not in overrides:
        raise TypeError("harvest() needs tokens=... (or a HarvestConfig)")
    cfg = with_overrides(HarvestConfig, config, overrides)
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    names = [hooks] if isinstance(hooks, str) else list(hooks)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"give one or more distinct hooks, got {names}")
    points = [resolve(lm.model, n) for n in names]
    spec = CorpusSpec(corpus) if isinstance(corpus, str) else corpus
    if lm.max_positions and cfg.context > lm.max_positions:
        raise ValueError(f"context {cfg.context} is longer than the model's {lm.max_positions} positions")
    seq_iter = sequences(spec, lm.tokenizer, cfg.context, cfg.seed)   # a missing corpus path fails here
    first = next(seq_iter, None)         # an empty corpus fails here, not as a store with no shards
    if first is None:
        raise ValueError(f"corpus {spec.source!r} ({spec.split} split) holds no text for even one window of "
                         f"{cfg.context} tokens: it is empty or too small; add text to it or give another --corpus")
    seq_iter = itertools.chain([first], seq_iter)
    widths = hook_shapes(lm.model, names)
    itemsize = st.DTYPES[cfg.dtype].itemsize
    target = cfg.shard_rows or max(1, SHARD_BYTES // (max(widths.values()) * itemsize))
    seqs_per_shard = cfg.batch_size * max(1, round(target / (cfg.batch_size * cfg.context)))
    bos_id = bos_token_id(lm.tokenizer)
    rule = PositionRule(bos_id if cfg.exclude_bos else None, cfg.sink_factor)
    common = {"format": st.FORMAT, "version": st.VERSION, "model_name": lm.name, "model_family": lm.family,
              "model_weights_sha256": lm.weights_hash, "gguf_sha256": lm.gguf_sha256,
              "tokenizer": tokenizer_identity(lm.tokenizer),
              "context": cfg.context, "dtype": cfg.dtype,
              "bos": {"token_id": bos_id, "prepended_per_document": True, "window_start": WINDOW_START,
                      "excluded": cfg.exclude_bos},
              "positions": rule.to_json(),
              "corpus": {**spec.to_json(), "seed": cfg.seed},
              "harvest": {**asdict(cfg), "seqs_per_shard": seqs_per_shard}}
    out = Path(out).expanduser()
    with exclusive(out, "harvest", "store folder"):     # one writer per store folder, for the whole harvest
        if len(points) > 1:
            _check_multi_out(out, points)
        sinks = []
        for p in points:
            path = out if len(points) == 1 else store_dir(out, p.name)
            header = {**common, "hook_name": p.name, "hf_hook_name": p.hf_hook_name, "hook_module": p.module_path,
                      "hook_io": p.io, "d_in": widths[p.name]}
            sinks.append(_Sink(p, path, st.prepare(path, header, resume), st.DTYPES[cfg.dtype]))
        _run(lm, sinks, seq_iter, cfg, rule, seqs_per_shard=seqs_per_shard, progress=progress)
    stores = {s.point.name: st.ActivationStore.open(s.path) for s in sinks}
    return stores[names[0]] if len(names) == 1 else stores


def _run(lm: LoadedModel, sinks: list[_Sink], seq_iter: Iterator[torch.Tensor], cfg: HarvestConfig,
         rule: PositionRule, *, seqs_per_shard: int, progress: bool) -> None:
    n_seqs, batch_size = math.ceil(cfg.tokens / cfg.context), cfg.batch_size
    # Resume from the store that is furthest behind (a kill can fall between two hooks' writes).
    behind = min(sinks, key=lambda s: len(s.manifest["shards"]))
    shard = len(behind.manifest["shards"])
    seq0 = behind.manifest["shards"][-1]["seq_end"] if shard else 0
    names = [s.point.name for s in sinks]
    device = lm.device
    context = sinks[0].manifest["context"]
    background = spare_core(device)
    writer = _Writer(background)
    bar = progress_bar(total=n_seqs * context, initial=min(seq0, n_seqs) * context, unit="tok", unit_scale=True,
               disable=not progress, desc="harvest")
    # Packing (and tokenising, for uncached corpora) runs in its own thread when a core is spare.
    batches = _batched(itertools.islice(seq_iter, seq0, n_seqs), batch_size)
    if PREFETCH_BATCHES and background:
        batches = st.prefetched(batches, PREFETCH_BATCHES)
    try:
        for ids in batches:
            acts = run_to_hooks(lm.model, ids.to(device), names)
            norms = {name: _row_norms(a).cpu() for name, a in acts.items()}   # (b, ctx) each
            keep, skipped = _finite_rows(acts, norms, seq0, cfg.nan_policy)
            for sink in sinks:
                if shard >= sink.first_new_shard:
                    sink.skipped.extend(skipped)
                sink.add(acts[sink.point.name], norms[sink.point.name], ids, seq0, keep, shard, rule, writer)
            seq0 += ids.shape[0]
            bar.update(ids.numel())
            if seq0 - shard * seqs_per_shard == seqs_per_shard:
                _flush(sinks, writer, shard, shard * seqs_per_shard, seq0)
                shard += 1
        if seq0 > shard * seqs_per_shard:       # the last, partial shard
            _flush(sinks, writer, shard, shard * seqs_per_shard, seq0)
    finally:
        batches.close()
        bar.close()
        try:
            writer.close()
        finally:
            for sink in sinks:   # shards written but not committed when something failed
                st.atomic.discard_temp_files(sink.path)
    for sink in sinks:
        last = sink.manifest["shards"][-1]["seq_end"] if sink.manifest["shards"] else 0
        exhausted = last < n_seqs
        if exhausted:
            warnings.warn(f"the corpus ran out after {last} sequences of {context} tokens "
                          f"({last * context} of {n_seqs * context} requested tokens); {sink.path} holds what there is")
        sink.manifest = {**sink.manifest, "complete": True, "n_sequences": last, "corpus_exhausted": exhausted}
        st.atomic.write_json(sink.path / st.MANIFEST, sink.manifest)


def stream_activations(model: LoadedModel | str, hook: str, corpus: CorpusSpec | str, *, context: int,
                       batch_size: int, seed: int = 0, model_batch_size: int = 8, buffer_rows: int | None = None,
                       exclude_bos: bool = True, sink_factor: float | None = SINK_FACTOR,
                       passes: int | None = 1) -> Iterator[torch.Tensor]:
    """float32 ``[batch_size, d_in]`` batches straight from the model, mixed in a shuffle buffer.

    The buffer (``buffer_rows``, default 32 batches) is filled with activations of
    ``model_batch_size`` sequences at a time, shuffled, and its first half is yielded; consecutive
    positions of one sequence therefore rarely share a batch. ``passes=None`` repeats the corpus
    forever (pass p is shuffled with seed + p). The final partial batch is dropped.
    """
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    spec = CorpusSpec(corpus) if isinstance(corpus, str) else corpus
    resolve(lm.model, hook)
    rule = PositionRule(bos_token_id(lm.tokenizer) if exclude_bos else None, sink_factor)
    capacity = max(buffer_rows or 32 * batch_size, 2 * batch_size)
    gen = torch.Generator().manual_seed(seed)
    buf: list[torch.Tensor] = []
    n_buf = 0
    for p in itertools.count() if passes is None else range(passes):
        for ids in _batched(sequences(spec, lm.tokenizer, context, seed + p), model_batch_size):
            act = run_to_hooks(lm.model, ids.to(lm.device), [hook])[hook]
            x = act.reshape(-1, act.shape[-1]).float().cpu()                # (b*ctx, d)
            x = x[rule.keep(ids, _row_norms(act).cpu()).reshape(-1)]
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteActivation(f"non-finite activation (NaN/inf) at hook {hook} while streaming")
            buf.append(x)
            n_buf += x.shape[0]
            if n_buf >= capacity:
                mixed = torch.cat(buf)[torch.randperm(n_buf, generator=gen)]
                half = (n_buf // 2) // batch_size * batch_size
                for i in range(0, half, batch_size):
                    yield mixed[i:i + batch_size]
                buf, n_buf = [mixed[half:]], n_buf - half
    if n_buf >= batch_size:
        mixed = torch.cat(buf)[torch.randperm(n_buf, generator=gen)]
        for i in range(0, n_buf - batch_size + 1, batch_size):
            yield mixed[i:i + batch_size]
