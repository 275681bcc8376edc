import math

import pytest
import torch

from saelab.builtin import MODEL_DIR
from saelab.builtin.make import BuiltinConfig, _Permutations, evaluate_bits_per_byte, lr_at, xz_bits_per_byte
from saelab.models import load_model


def test_bits_per_byte_scores_every_token_but_the_first_once(tmp_path, tiny_model_dirs):
    (tmp_path / "a.py").write_text("def f(x):\n    return x + 1\n" * 20)
    (tmp_path / "b.py").write_text("import os\nos.system(cmd)\n" * 15)
    lm = load_model(str(tiny_model_dirs["llama"]))
    seen = []

    class Uniform(torch.nn.Module):  # every token costs log(vocab) nats: the total is countable
        def forward(self, input_ids):
            seen.extend(input_ids.flatten().tolist())
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, 96)})()

    r = evaluate_bits_per_byte(Uniform(), lm.tokenizer, corpus=str(tmp_path), context=16, batch=3)
    assert r["tokens"] - 1 == len(seen)
    assert r["bits_per_byte"] == pytest.approx((r["tokens"] - 1) * math.log2(96) / r["bytes"], rel=1e-6)
    assert 0 < r["xz_bits_per_byte"] < 8
    real = evaluate_bits_per_byte(lm.model, lm.tokenizer, corpus=str(tmp_path), context=16, batch=3)
    assert real["bits_per_byte"] > 0


def test_xz_figure_is_compression_ratio():
    data = b"abc" * 100000
    assert xz_bits_per_byte(data) < 0.2
    assert xz_bits_per_byte(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())) > 7.5


def test_schedule_and_data_order_are_pure_functions_of_step():
    c = BuiltinConfig(warmup=10, lr=1.0, lr_min=0.1)
    assert lr_at(0, 100, c) == pytest.approx(0.1) and lr_at(9, 100, c) == pytest.approx(1.0)
    assert lr_at(100, 100, c) == pytest.approx(0.1)
    a, b = _Permutations(50, 0), _Permutations(50, 0)
    first = [a.batch(s, 8).tolist() for s in range(20)]
    assert [b.batch(s, 8).tolist() for s in (5, 6, 19)] == [first[5], first[6], first[19]]
    epoch0 = sum(first[:7], [])[:50]
    assert sorted(epoch0) == list(range(50))


@pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(), reason="builtin model not shipped yet")
def test_builtin_model_loads_through_the_hf_path():
    lm = load_model("builtin")
    assert lm.family == "llama" and lm.is_causal and lm.n_layers >= 4
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) < 25e6
    ids = lm.tokenizer("def f(self):\n    return self.x\n", return_tensors="pt").input_ids
    assert torch.isfinite(lm.model(input_ids=ids).logits).all()
