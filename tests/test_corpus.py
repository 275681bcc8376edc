import json

import pytest

from saelab.corpus import CorpusSpec, documents, is_validation, pack, token_stream
from saelab.token_cache import sequences
from tiny_models import tiny_tokenizer


def test_stdlib_split_is_stable_and_about_five_percent():
    val = list(documents(CorpusSpec("stdlib", "validation")))
    train_names = [d.name for d in documents(CorpusSpec("stdlib", "train"))]
    assert val and train_names
    assert not set(d.name for d in val) & set(train_names)
    frac = len(val) / (len(val) + len(train_names))
    assert 0.03 < frac < 0.08
    assert all(is_validation(d.name) for d in val)
    assert train_names == sorted(train_names)  # fixed order
    assert any(name.startswith("test/") for name in train_names)  # tests are included (documented)


def test_directory_jsonl_and_errors(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.md").write_text("# hi\n")
    (tmp_path / "skip.bin").write_bytes(b"\0\1")
    docs = list(documents(CorpusSpec(str(tmp_path), "all")))
    assert [d.name for d in docs] == ["a.py", "b.md"]
    jl = tmp_path / "t.jsonl"
    jl.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert [d.text for d in documents(CorpusSpec(str(jl), "all"))] == ["hello", "world"]
    jl.write_text('{"nottext": 1}\n')
    with pytest.raises(ValueError, match="t.jsonl:1"):
        list(documents(CorpusSpec(str(jl), "all")))
    with pytest.raises(FileNotFoundError, match="no such file"):
        documents(CorpusSpec(str(tmp_path / "missing"), "all"))
    with pytest.raises(ValueError, match="unknown split"):
        CorpusSpec("stdlib", "dev")


def test_packing_is_bos_separated_and_deterministic(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 3)
    tok = tiny_tokenizer()
    a = [s.tolist() for s in sequences(CorpusSpec(str(tmp_path), "all"), tok, context=16, seed=1)]
    b = [s.tolist() for s in sequences(CorpusSpec(str(tmp_path), "all"), tok, context=16, seed=1)]
    c = [s.tolist() for s in sequences(CorpusSpec(str(tmp_path), "all"), tok, context=16, seed=2)]
    assert a == b and a != c
    assert all(len(s) == 16 for s in a)
    assert all(s[0] == tok.bos_token_id for s in a)          # every window starts with BOS (the sink rule)
    flat = [t for s in a for t in s[1:]]
    assert flat.count(tok.bos_token_id) >= 3                  # documents are still separated by BOS (one may start a window)
    stream = list(token_stream(documents(CorpusSpec(str(tmp_path), "all")), tok, bos_id=0, seed=None))
    assert [s.tolist() for s in pack(stream, 16, 99)] == [[99] + stream[i:i + 15]
                                                          for i in range(0, len(stream) - 14, 15)]
    with pytest.raises(ValueError):
        list(pack([1, 2, 3], 1, 0))


def test_a_window_starting_at_a_document_start_has_one_bos(tmp_path):
    for i in range(6):
        (tmp_path / f"f{i}.py").write_text(f"v{i} = {i}\n" * (i + 1))
    tok = tiny_tokenizer()
    bos = tok.bos_token_id
    windows = [s.tolist() for s in sequences(CorpusSpec(str(tmp_path), "all"), tok, context=8, seed=0)]
    assert windows[0][0] == bos and windows[0][1] != bos          # the corpus' first window: one BOS
    assert all(w[0] == bos and w[1] != bos for w in windows)      # and every other window
    # Hand-cut stream (BOS = 0): documents [5 6 7] [8 9] [] [1 2 3 4]; the second window starts at a
    # document, so its BOS stands for that document's; an empty document's BOS is dropped with it.
    stream = [0, 5, 6, 7, 0, 8, 9, 0, 0, 1, 2, 3, 4]
    assert [s.tolist() for s in pack(stream, 4, 0)] == [[0, 5, 6, 7], [0, 8, 9, 0], [0, 1, 2, 3]]
    assert [s.tolist() for s in pack([0, 1, 2, 0, 3, 4], 3, 0)] == [[0, 1, 2], [0, 3, 4]]


def test_roff_to_text_keeps_words_and_joins_filled_lines():
    from saelab.english import roff_to_text

    page = ('.\\" a comment\n.TH OPEN 2\n.SH NAME\nopen \\- open a file\n.SH DESCRIPTION\nThe\n.BR open ()\n'
            'call opens\n.I pathname\nfor \\fBreading\\fP.\n.PP\n.nf\nint fd;\nfd = open(p);\n.fi\n')
    assert roff_to_text(page) == ("Name\nopen - open a file\n\nDescription\nThe open() call opens pathname for reading."
                                  "\n\nint fd;\nfd = open(p);")


def test_weighted_mix_takes_shares_by_characters(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": "a" * 10}) + "\n" for _ in range(50)))
    b.write_text("".join(json.dumps({"text": "b" * 10}) + "\n" for _ in range(5)))
    chars = {}
    for d in documents(CorpusSpec(f"{a}*3+{b}", "all")):
        chars[d.text[0]] = chars.get(d.text[0], 0) + len(d.text)
    assert chars == {"a": 150, "b": 50}                     # 3 shares of the smaller part's 50 characters
    with pytest.raises(ValueError, match="whole number of shares"):
        documents(CorpusSpec(f"{a}*x+{b}", "all"))
