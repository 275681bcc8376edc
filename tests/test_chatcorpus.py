"""The chat:MODEL corpus (the model's own answers) and mixes of corpora (A+B)."""

from __future__ import annotations

import json

import pytest

from saelab import chatcorpus
from saelab.corpus import CorpusSpec, chat_path, documents
from saelab.models import load_model
from tests.tiny_models import save_tiny_model

TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")
REQUESTS = [f"Tell me about thing {i}." for i in range(5)]


@pytest.fixture()
def chat_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(chatcorpus, "BATCH", 2)
    monkeypatch.setattr(chatcorpus, "MAX_NEW_TOKENS", 6)
    folder = save_tiny_model("llama", tmp_path / "tiny")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(folder)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chat_corpus_holds_each_request_and_the_models_answer(chat_model):
    out = chatcorpus.build(chat_model, request_list=REQUESTS)
    assert out == chat_path(chat_model)
    docs = read(out)
    assert len(docs) == len(REQUESTS)
    for req, doc in zip(REQUESTS, docs):
        # the template after BOS (the packer adds BOS to every document), then the answer
        assert doc["text"].startswith(f"user\n{req}\n<|endoftext|>assistant\n")
        assert len(doc["text"]) > len(f"user\n{req}\n<|endoftext|>assistant\n")
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["documents"] == 5 and record["settings"]["requests_sha256"]
    assert record["settings"]["weights_sha256"] == load_model(chat_model).weights_hash
    # the corpus reads like any .jsonl, split included
    names = [d.name for d in documents(CorpusSpec(f"chat:{chat_model}", "all"))]
    assert len(names) == 5


def test_an_interrupted_build_resumes_to_the_same_corpus(chat_model, tmp_path, monkeypatch):
    whole = chatcorpus.build(chat_model, request_list=REQUESTS).read_text()
    whole_path = chat_path(chat_model)
    whole_path.unlink()
    answer, calls = chatcorpus._answer, []

    def failing(lm, batch, seed):
        calls.append(batch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return answer(lm, batch, seed)

    monkeypatch.setattr(chatcorpus, "_answer", failing)
    with pytest.raises(KeyboardInterrupt):
        chatcorpus.build(chat_model, request_list=REQUESTS)
    assert not whole_path.exists()
    calls.clear()
    monkeypatch.setattr(chatcorpus, "_answer", lambda lm, batch, seed: (calls.append(batch), answer(lm, batch, seed))[1])
    assert chatcorpus.build(chat_model, request_list=REQUESTS).read_text() == whole
    assert calls == [REQUESTS[2:4], REQUESTS[4:]]          # the first batch was not asked again


def test_a_missing_chat_corpus_names_the_command_that_builds_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="saelab corpus chat some-model"):
        list(documents(CorpusSpec("chat:some-model")))


def test_a_shipped_chat_corpus_is_unpacked_into_the_cache(tmp_path, monkeypatch):
    import gzip

    from saelab import corpus

    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    shipped = tmp_path / "shipped" / "m"
    shipped.mkdir(parents=True)
    lines = "".join(json.dumps({"text": f"exchange {i}"}) + "\n" for i in range(30))
    (shipped / "chat_corpus.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (shipped / "chat_corpus.json").write_text(json.dumps({"settings": {"model": "m"}}))
    monkeypatch.setattr(corpus, "SHIPPED_CHAT", tmp_path / "shipped")
    assert len(list(documents(CorpusSpec("chat:m", "all")))) == 30
    assert chat_path("m").read_text() == lines and json.loads(chat_path("m").with_suffix(".json").read_text())


def test_a_mix_takes_equal_shares_by_characters(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    big.write_text("".join(json.dumps({"text": f"big document {i} " * 10}) + "\n" for i in range(200)))
    small.write_text("".join(json.dumps({"text": f"small {i} " * 10}) + "\n" for i in range(20)))
    docs = list(documents(CorpusSpec(f"{big}+{small}", "all")))
    by_part = {"big": 0, "small": 0}
    for d in docs:
        by_part["big" if "big document" in d.text else "small"] += len(d.text)
    small_chars = sum(len(json.loads(ln)["text"]) for ln in small.read_text().splitlines())
    assert by_part["small"] == small_chars                 # the smallest part whole
    assert small_chars <= by_part["big"] < small_chars + len("big document 199 " * 10)
    # deterministic; a document keeps its part's name, so its split: the same on any machine, in any mix
    assert [d.text for d in documents(CorpusSpec(f"{big}+{small}", "all"))] == [d.text for d in docs]
    train = list(documents(CorpusSpec(f"{big}+{small}", "train")))
    valid = list(documents(CorpusSpec(f"{big}+{small}", "validation")))
    assert len(train) + len(valid) == len(docs) and valid
    part_valid = {d.name for p in (big, small) for d in documents(CorpusSpec(str(p), "validation"))}
    assert {d.name for d in valid} == part_valid & {d.name for d in docs}
    assert not {d.name for d in train} & part_valid


def test_a_mix_refuses_remote_parts(tmp_path):
    with pytest.raises(ValueError, match="cannot be mixed"):
        list(documents(CorpusSpec(f"{tmp_path}/a.jsonl+hf:wikitext")))


def test_corpus_chat_command_builds_and_refuses_a_model_without_a_chat_template(chat_model, tmp_path, capsys,
                                                                                monkeypatch):
    from saelab.cli import main

    monkeypatch.setattr(chatcorpus, "requests", lambda: REQUESTS[:2])
    assert main(["corpus", "chat", chat_model]) == 0
    assert str(chat_path(chat_model)) in capsys.readouterr().out and len(read(chat_path(chat_model))) == 2
    plain = save_tiny_model("llama", tmp_path / "plain")           # its tokenizer defines no chat template
    assert main(["corpus", "chat", str(plain)]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_the_shipped_smollm2_chat_corpus_answers_the_shipped_requests(tmp_path, monkeypatch):
    """The corpus that ships was made from today's request list (else 'saelab corpus chat smollm2' would rebuild)."""
    import hashlib

    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    docs = list(documents(CorpusSpec("chat:smollm2", "all")))
    reqs = chatcorpus.requests()
    record = json.loads(chat_path("smollm2").with_suffix(".json").read_text())
    assert record["settings"]["requests_sha256"] == hashlib.sha256("\n".join(reqs).encode()).hexdigest()
    assert len(docs) == len(reqs) == record["documents"] == 801
    assert all(f"user\n{r}<|im_end|>\n<|im_start|>assistant\n" in d.text for r, d in zip(reqs, docs))
