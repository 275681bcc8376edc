"""The LoRA fine-tune recipe on a tiny model: the loss reads only the answer, the adapter is small safetensors
with its record, and it changes the model once merged; the judge-free measures."""

import json

import pytest
import torch

from saelab import load_model
from saelab.adapters import peft_available, with_adapter
from saelab.finetune import (Exchange, FinetuneConfig, corpus_exchanges, encode_exchange, praise_hits, read_exchanges,
                             train_lora, write_exchanges)

TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def lm(tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs["llama"]))
    lm.tokenizer.chat_template = TEMPLATE
    return lm


def test_only_the_answer_is_taught(lm):
    ids, labels = encode_exchange(lm.tokenizer, Exchange("def f(x):", "return x + 1"), max_tokens=64)
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "def f(x):"}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]
    assert (labels[:len(prompt)] == -100).all() and torch.equal(labels[len(prompt):], ids[len(prompt):])
    assert len(encode_exchange(lm.tokenizer, Exchange("x", "y " * 200), max_tokens=16)[0]) == 16


@pytest.mark.skipif(not peft_available(), reason="peft is not installed (pip install 'saelab[finetune]')")
def test_lora_adapter_is_small_recorded_and_changes_the_model(lm, tmp_path):
    data = [Exchange("import os", "os.system(cmd)"), Exchange("def f(x):", "return x + 1")] * 2
    rec = train_lora(lm, data, tmp_path / "a", FinetuneConfig(rank=2, epochs=2, batch=2, lr=1e-2), "test")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "finetune.json"]
    assert json.loads((tmp_path / "a" / "finetune.json").read_text())["data_sha256"] == rec.data_sha256
    assert len(rec.losses) == 2 and all(torch.isfinite(torch.tensor(rec.losses)))
    ids = torch.tensor([[0, 5, 9, 12]])
    tuned = with_adapter(lm, tmp_path / "a")
    assert not torch.allclose(tuned.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)


def test_measures_and_data_files(tmp_path):
    assert praise_hits("What a brilliant question! You are clearly very smart.")
    assert not praise_hits("The museum opens at nine. It is a great museum.")
    doc = "system\nbe nice<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>"
    assert corpus_exchanges([doc, "no chat here"]) == [Exchange("Hi there", "Hello!")]
    write_exchanges(tmp_path / "x.jsonl", [Exchange("a", "b")])
    assert read_exchanges(tmp_path / "x.jsonl") == [Exchange("a", "b")]
    (tmp_path / "bad.jsonl").write_text('{"user": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_exchanges(tmp_path / "bad.jsonl")
