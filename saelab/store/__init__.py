"""ActivationStore: a folder of ``manifest.json`` + ``shard-NNNNN.safetensors``.

Each shard holds ``acts [n, d_in]`` (storage dtype), ``tokens [n]`` (int32), ``seq [n]`` (int64,
index of the corpus sequence the row came from) and ``pos [n]`` (int32, position in it). A shard
is listed in the manifest (with its row count, byte size and sha256) only after it is complete on
disk, and the manifest is replaced atomically: a crash leaves the last complete state.

Reading checks every shard's size and tensor shapes, and its sha256 the first time a store object
reads it (``verify`` re-checks all of them). Rows are always returned as float32.

Shuffled reading (``batches``): each epoch permutes the shard order, groups shards into windows
of ``window_shards`` shards and permutes the rows within each window; the epoch's row stream is the
concatenation of the windows and is cut into global batches of ``batch_size * world_size`` rows.
Everything depends only on (seed, epoch, split, heldout_fraction, batch size), so training can
resume at any batch index without reading the batches before it.

The parts: :mod:`~saelab.store.format` (names, constants, manifest, running statistics),
:mod:`~saelab.store.writing` (shards and folders), :mod:`~saelab.store.reading` (the store object,
batches, summary). Everything is importable from ``saelab.store``.
"""

from saelab import atomic
from saelab.store.format import (DTYPES, FORMAT, HIST_BINS, HIST_HI, HIST_LO, MANIFEST, REQUIRED, SPLITS, VERSION,
                                 RunningStats, StoreError, read_manifest, shard_name)
from saelab.store.reading import ActivationStore, prefetched, summary
from saelab.store.writing import (IDENTITY, PendingShard, append_shard, commit_shard, identity_diff, prepare,
                                  shard_columns, write_shard)

__all__ = ["ActivationStore", "DTYPES", "FORMAT", "HIST_BINS", "HIST_HI", "HIST_LO", "IDENTITY", "MANIFEST",
           "PendingShard", "REQUIRED", "RunningStats", "SPLITS", "StoreError", "VERSION", "append_shard", "atomic",
           "commit_shard", "identity_diff", "prefetched", "prepare", "read_manifest", "shard_columns", "shard_name",
           "summary", "write_shard"]
