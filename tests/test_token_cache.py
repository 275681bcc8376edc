"""The token cache gives exactly the sequences of on-the-fly tokenisation, and survives bad caches."""

import itertools
import json

import pytest
import torch

from saelab import token_cache
from saelab.corpus import CorpusSpec, documents
from saelab.token_cache import sequences
from tiny_models import tiny_tokenizer


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _corpus(root, n=40):
    root.mkdir(exist_ok=True)
    for i in range(n):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(i % 7 + 1))
        (root / f"m{i:02d}.py").write_text(body)
    (root / "empty.md").write_text("")          # skipped (empty) on both paths
    (root / "bad.txt").write_bytes(b"\xff\xfe")  # skipped (not UTF-8) on both paths
    return root


def _both(spec, tok, context, seed):
    cached = list(sequences(spec, tok, context, seed))
    fly = list(sequences(spec, tok, context, seed, cache=False))
    return cached, fly


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("split,seed,context", [("train", 0, 16), ("all", 7, 5), ("validation", None, 3),
                                                ("train", 1, 1000)])
def test_cached_sequences_equal_on_the_fly(tmp_path, cache_dir, tok, split, seed, context):
    spec = CorpusSpec(str(_corpus(tmp_path / "c")), split)
    cached, fly = _both(spec, tok, context, seed)
    assert _same(cached, fly) and (fly or context == 1000)
    assert all(s.dtype == torch.long and s.shape == (context,) for s in cached)
    assert len(list((cache_dir / "tokens").iterdir())) == 1


def test_jsonl_and_many_windows_per_document(tmp_path, cache_dir, tok):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "x = 1\n" * (i * 40)}) for i in range(12)] + ["", json.dumps({"text": ""})]
    path.write_text("\n".join(lines) + "\n")
    for split, seed in (("all", 0), ("train", 3)):
        cached, fly = _both(CorpusSpec(str(path), split), tok, 8, seed)
        assert len(fly) > 64 and _same(cached, fly)   # more than one chunk of windows


def test_document_starts_at_the_cut_keep_one_bos(tmp_path, cache_dir, tok):
    """Documents whose BOS + tokens exactly fill a window's piece: every later window starts at a
    document, and both paths drop that document's BOS the same way (one BOS per window)."""
    path = tmp_path / "d.jsonl"
    piece = tok("x = 1", add_special_tokens=False)["input_ids"]
    context = len(piece) + 2                           # BOS + (document BOS + its tokens)
    path.write_text("\n".join(json.dumps({"text": "x = 1"}) for _ in range(200)) + "\n")
    cached, fly = _both(CorpusSpec(str(path), "all"), tok, context, 0)
    assert len(fly) > 64 and _same(cached, fly)
    assert all(int(w[0]) == tok.bos_token_id and int(w[1]) != tok.bos_token_id for w in fly)


def test_stdlib_prefix_equal(cache_dir, tok):
    spec = CorpusSpec("stdlib", "validation")
    cached = list(itertools.islice(sequences(spec, tok, 64, 5), 300))
    fly = list(itertools.islice(sequences(spec, tok, 64, 5, cache=False), 300))
    assert _same(cached, fly)


def test_reused_then_rebuilt_when_the_corpus_changes(tmp_path, cache_dir, tok, monkeypatch):
    root = _corpus(tmp_path / "c")
    spec = CorpusSpec(str(root), "all")
    first = list(sequences(spec, tok, 16, 0))
    built = []
    real = token_cache._build
    monkeypatch.setattr(token_cache, "_build", lambda *a: (built.append(1), real(*a)))
    assert _same(list(sequences(spec, tok, 16, 0)), first) and not built      # read, not rebuilt
    (root / "m03.py").write_text("print('changed')\n" * 50)
    changed = list(sequences(spec, tok, 16, 0))
    assert built == [1] and not _same(changed, first)
    assert _same(changed, list(sequences(spec, tok, 16, 0, cache=False)))


def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, cache_dir, tok):
    spec = CorpusSpec(str(_corpus(tmp_path / "c")), "all")
    good = list(sequences(spec, tok, 16, 0))
    (entry,) = (cache_dir / "tokens").iterdir()
    data = bytearray((entry / "tokens.bin").read_bytes())
    data[100] ^= 0x01
    (entry / "tokens.bin").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"tokens.bin fails its checksum.*rebuilding"):
        again = list(sequences(spec, tok, 16, 0))
    assert _same(again, good)
    (entry / "index.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable index"):
        assert _same(list(sequences(spec, tok, 16, 0)), good)


def test_unwritable_cache_falls_back_to_on_the_fly(tmp_path, monkeypatch, tok):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SAELAB_CACHE", str(blocker / "cache"))   # cannot be created, even by root
    spec = CorpusSpec(str(_corpus(tmp_path / "c")), "all")
    with pytest.warns(UserWarning, match="could not write the token cache"):
        got = list(sequences(spec, tok, 16, 0))
    assert _same(got, list(sequences(spec, tok, 16, 0, cache=False)))


def test_write_failure_falls_back_to_on_the_fly(tmp_path, cache_dir, tok, monkeypatch):
    def full(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(token_cache, "_build", full)
    spec = CorpusSpec(str(_corpus(tmp_path / "c")), "all")
    with pytest.warns(UserWarning, match="could not write the token cache.*No space left"):
        got = list(sequences(spec, tok, 16, 0))
    assert _same(got, list(sequences(spec, tok, 16, 0, cache=False)))


def test_switched_off_and_uncacheable(tmp_path, cache_dir, tok, monkeypatch):
    spec = CorpusSpec(str(_corpus(tmp_path / "c")), "all")
    monkeypatch.setenv("SAELAB_TOKEN_CACHE", "0")
    assert list(sequences(spec, tok, 16, 0)) and not cache_dir.exists()
    monkeypatch.delenv("SAELAB_TOKEN_CACHE")
    monkeypatch.setattr(token_cache, "MAX_TEXT_BYTES", 10)
    assert token_cache.tokenized(spec, tok) is None and not cache_dir.exists()
    with pytest.raises(FileNotFoundError, match="no such file"):
        sequences(str(tmp_path / "missing"), tok, 16)


def test_cli_cache_info_and_clear(tmp_path, cache_dir, tok, capsys):
    from saelab.cli import main

    spec = CorpusSpec(str(_corpus(tmp_path / "c")), "all")
    n_tokens = sum(len(tok.encode(d.text, add_special_tokens=False)) for d in documents(spec))
    list(sequences(spec, tok, 16, 0))
    assert main(["cache", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    (entry,) = info["corpora"]
    assert info["enabled"] and entry["source"] == str(tmp_path / "c") and entry["files"] == 42
    assert entry["tokens"] == n_tokens   # BOS is added when packing, not stored
    assert main(["cache", "info"]) == 0 and "1 corpora" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0 and "MiB freed" in capsys.readouterr().out
    assert token_cache.entries() == []
