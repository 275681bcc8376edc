"""ActivationStore: format checks, corruption detection, shuffled/resumable/sharded batches, stats."""

import json

import pytest
import torch

from saelab import store as st
from saelab.store import ActivationStore, RunningStats, StoreError

D = 6
CTX = 8


def make_store(path, n_shards=5, seqs_per_shard=4, dtype="float32", complete=True):
    """Shards of whole sequences; acts[:, 0] is a unique row id so tests can track rows."""
    manifest = st.prepare(path, {"format": st.FORMAT, "version": st.VERSION, "model_name": "m",
                                 "hook_name": "blocks.0.hook_resid_post", "d_in": D, "dtype": dtype,
                                 "context": CTX}, resume=False)
    gen = torch.Generator().manual_seed(0)
    row = 0
    for k in range(n_shards):
        seq = torch.arange(k * seqs_per_shard, (k + 1) * seqs_per_shard).repeat_interleave(CTX)
        n = len(seq)
        acts = torch.randn(n, D, generator=gen)
        acts[:, 0] = torch.arange(row, row + n, dtype=torch.float32)
        row += n
        manifest = st.append_shard(path, manifest, acts.to(st.DTYPES[dtype]), torch.zeros(n, dtype=torch.long), seq,
                                   torch.arange(n) % CTX, seq_start=int(seq[0]), seq_end=int(seq[-1]) + 1)
    if complete:
        st.atomic.write_json(path / st.MANIFEST, {**manifest, "complete": True})
    return ActivationStore.open(path, allow_incomplete=not complete)


def ids(batches):
    return torch.cat([b[:, 0] for b in batches]).long()


def test_round_trip_and_columns(tmp_path):
    store = make_store(tmp_path / "s")
    assert store.n_rows == 5 * 4 * CTX and store.d_in == D and store.context == CTX
    assert store.hook_name == "blocks.0.hook_resid_post" and store.model_name == "m"
    t = store.read_shard(2)
    assert t["acts"].shape == (32, D) and sorted(set(t["seq"].tolist())) == [8, 9, 10, 11]
    assert store.verify() == []
    batches = list(store.batches(16, shuffle=False, split="all", epochs=1))
    assert ids(batches).tolist() == list(range(store.n_rows))
    assert all(b.dtype == torch.float32 and b.shape == (16, D) for b in batches)


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ActivationStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ActivationStore.open(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        ActivationStore.open(tmp_path / "bad")
    make_store(tmp_path / "unfinished", complete=False)
    with pytest.raises(StoreError, match="unfinished harvest"):
        ActivationStore.open(tmp_path / "unfinished")


def test_truncated_shard_named_on_open(tmp_path):
    store = make_store(tmp_path / "s")
    f = store.path / "shard-00003.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(StoreError, match="shard-00003.safetensors is truncated"):
        ActivationStore.open(store.path)
    (store.path / "shard-00001.safetensors").unlink()
    with pytest.raises(StoreError, match="shard-00001.safetensors is missing"):
        ActivationStore.open(store.path)


def test_bit_flip_detected_on_first_read_and_verify(tmp_path):
    store = make_store(tmp_path / "s")
    f = store.path / "shard-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[-7] ^= 0x10
    f.write_bytes(bytes(data))
    store = ActivationStore.open(store.path)  # same size: open passes
    problems = store.verify()
    assert len(problems) == 1 and "shard-00002.safetensors is corrupt" in problems[0]
    with pytest.raises(StoreError, match="shard-00002.safetensors is corrupt"):
        list(ActivationStore.open(store.path).batches(8, split="all", epochs=1))


def test_shape_mismatch_named(tmp_path):
    store = make_store(tmp_path / "s")
    m = json.loads((store.path / "manifest.json").read_text())
    m["d_in"] = D + 1
    (store.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"shard-00000.safetensors: acts is \(32, 6\)"):
        ActivationStore.open(store.path).read_shard(0)


def test_batches_deterministic_and_cover_each_row_once(tmp_path):
    store = make_store(tmp_path / "s")
    a = ids(store.batches(10, seed=3, split="all", epochs=1))
    b = ids(store.batches(10, seed=3, split="all", epochs=1))
    c = ids(store.batches(10, seed=4, split="all", epochs=1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a) == (store.n_rows // 10) * 10 and len(set(a.tolist())) == len(a)  # partial batch dropped
    assert a.tolist() != sorted(a.tolist())                                     # actually shuffled
    two = ids(store.batches(10, seed=3, split="all", epochs=2))
    assert torch.equal(two[:len(a)], a) and not torch.equal(two[len(a):], a)    # next epoch reshuffled


@pytest.mark.parametrize("start", [1, 7, 15, 16, 23])
def test_start_batch_resumes_exactly(tmp_path, start):
    store = make_store(tmp_path / "s")
    full = list(store.batches(10, seed=1, split="train", epochs=2))
    resumed = list(store.batches(10, seed=1, split="train", epochs=2, start_batch=start))
    assert len(resumed) == len(full) - start
    assert all(torch.equal(x, y) for x, y in zip(full[start:], resumed))


def test_start_batch_skips_without_reading(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s")
    store.n_rows_in("all")  # caches the split index (reads seq columns)
    reads = []
    real = store.read_shard
    monkeypatch.setattr(store, "read_shard", lambda i, verify=None: reads.append(i) or real(i, verify))
    it = store.batches(10, split="all", shuffle=False, start_batch=10, prefetch=0, window_shards=1)
    next(it)
    # batch 10 is rows 100-109, in shard 3 (rows 96-127): shards 0-2 are never read; 4 is read ahead
    assert reads[0] == 3 and set(reads) <= {3, 4}


def test_rank_slicing_matches_single_rank(tmp_path):
    store = make_store(tmp_path / "s")
    one = list(store.batches(12, seed=5, epochs=1))
    ranks = [list(store.batches(4, seed=5, epochs=1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(r) == len(one) for r in ranks)
    for g, batch in enumerate(one):
        assert torch.equal(torch.cat([ranks[r][g] for r in range(3)]), batch)


def test_heldout_split_whole_sequences_disjoint(tmp_path):
    store = make_store(tmp_path / "s", n_shards=6, seqs_per_shard=20)
    train = set(ids(store.batches(1, split="train", epochs=1, heldout_fraction=0.2)).tolist())
    held = set(ids(store.batches(1, split="heldout", epochs=1, heldout_fraction=0.2)).tolist())
    assert train.isdisjoint(held) and len(train) + len(held) == store.n_rows
    assert len(held) == store.n_rows_in("heldout", 0.2) and 0.05 < len(held) / store.n_rows < 0.4
    assert len(held) % CTX == 0  # whole sequences: ids are consecutive per sequence of CTX rows
    assert all(r // CTX * CTX in held for r in held)


def test_too_few_rows_and_bad_args(tmp_path):
    store = make_store(tmp_path / "s", n_shards=1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        store.batches(1000)
    with pytest.raises(ValueError, match="unknown split"):
        store.batches(4, split="test")
    with pytest.raises(ValueError, match="bad batches"):
        store.batches(4, rank=2, world_size=2)


def test_half_precision_upcast(tmp_path):
    store = make_store(tmp_path / "s", dtype="bfloat16", n_shards=2)
    b = next(iter(store.batches(8, epochs=1, split="all")))
    assert b.dtype == torch.float32


def test_running_stats_merge_and_json():
    x = torch.randn(1000, D, dtype=torch.float64) * torch.arange(1, D + 1) + 3
    s = RunningStats(D)
    for chunk in x.split(137):
        s.update(chunk.float(), torch.linalg.vector_norm(chunk, dim=1))
    assert torch.allclose(s.mean, x.mean(0), atol=1e-5)
    assert torch.allclose(s.m2 / s.count, x.var(0, unbiased=False), rtol=1e-5)
    norms = torch.linalg.vector_norm(x, dim=1)
    assert s.norm_mean == pytest.approx(float(norms.mean()), rel=1e-6)
    assert s.norm_quantile(0.5) == pytest.approx(float(norms.median()), rel=0.05)
    again = RunningStats.from_json(json.loads(json.dumps(s.to_json())))
    assert torch.equal(again.mean, s.mean) and torch.equal(again.hist, s.hist) and again.count == s.count


def test_prepare_refuses_foreign_and_different(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and is not an activation store"):
        make_store(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    store = make_store(tmp_path / "s", complete=False)
    before = {p.name: p.read_bytes() for p in store.path.iterdir()}
    header = {k: v for k, v in store.manifest.items() if k not in ("shards", "n_rows", "complete")}
    with pytest.raises(ValueError, match="d_in: store has 6, now 7"):
        st.prepare(store.path, {**header, "d_in": 7}, resume=True)
    with pytest.raises(FileExistsError, match="pass --resume"):
        st.prepare(store.path, header, resume=False)
    assert {p.name: p.read_bytes() for p in store.path.iterdir()} == before
