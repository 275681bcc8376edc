"""Typed provenance: written where the data comes from (a store, a stream), read back by Provenance.of;
a streamed SAE records the position rule it was trained under, so eval scores the same positions."""

from __future__ import annotations

import json
from types import SimpleNamespace

from saelab.evaluate import evaluate
from saelab.formats import load_sae, save_sae
from saelab.harvest import harvest
from saelab.provenance import Provenance
from saelab.sae import SAE, SAEConfig
from saelab.sources import StreamSource
from saelab.train import TrainConfig, store_provenance, train

HOOK = "blocks.1.hook_resid_post"
MANIFEST = {"model_name": "m", "model_weights_sha256": "abc", "hook_name": HOOK, "hf_hook_name": "model.layers.1",
            "hook_io": "output", "corpus": {"source": "stdlib", "split": "train", "seed": 3}, "context": 64,
            "gguf_sha256": None, "bos": {"token_id": 1, "prepended_per_document": True, "window_start": "bos",
                                         "excluded": True},
            "positions": {"bos_token_id": 1, "exclude_bos": True, "sink_factor": 5.0}}


def _sae_with(provenance: dict) -> SimpleNamespace:
    return SimpleNamespace(provenance=provenance, cfg=SimpleNamespace(metadata={}))


def test_a_store_is_recorded_as_before_and_read_back_whole():
    store = SimpleNamespace(manifest=MANIFEST)
    written = Provenance.from_store(store).to_json()
    assert written == {"model_name": "m", "model_weights_sha256": "abc", "hook_name": HOOK,
                       "hf_hook_name": "model.layers.1", "hook_io": "output", "corpus": MANIFEST["corpus"],
                       "context_size": 64, "prepend_bos": True, "exclude_special_tokens": [1],
                       "bos": MANIFEST["bos"], "positions": MANIFEST["positions"]}
    assert written == store_provenance(store)
    back = Provenance.of(_sae_with(written))
    assert back == Provenance.from_store(store)
    assert back.position_rule().bos_id == 1 and back.position_rule().sink_factor == 5.0


def test_a_store_without_a_rule_records_none():
    old = {k: v for k, v in MANIFEST.items() if k not in ("bos", "positions")}
    written = Provenance.from_store(SimpleNamespace(manifest=old)).to_json()
    assert not {"bos", "positions", "exclude_special_tokens", "prepend_bos"} & set(written)
    prov = Provenance.of(_sae_with(written))
    assert not prov.exclude_bos and prov.sink_factor is None and not prov.rule_recorded


def test_training_record_fields():
    prov = Provenance.of(_sae_with({"held_out": {"fvu": 0.1}, "train_config": {"heldout_fraction": 0.2},
                                    "tokens_trained": 4096}))
    assert prov.held_out == {"fvu": 0.1} and prov.heldout_fraction == 0.2 and prov.tokens_trained == 4096
    assert Provenance.of(_sae_with({})).heldout_fraction == 0.05


# -- a streamed SAE against a store-trained twin -----------------------------------------------------

def test_streamed_sae_evaluates_like_its_store_trained_twin(tiny_llama, tmp_path):
    """What ``saelab train --model M --hook H`` does (cli/train_eval.train_source), with a short held-out eval."""
    out = tmp_path / "streamed"
    source = StreamSource.open(tiny_llama.lm, HOOK, tiny_llama.corpus, context=32)
    cfg = TrainConfig(d_sae=64, k=4, tokens=2048, batch_size=256, eval_tokens=1024, checkpoint_every=0)
    train(source.batches(cfg.batch_size), cfg, out=out, progress=False, provenance=source.provenance.to_json())
    record = json.loads((out / "saelab.json").read_text())
    bos = tiny_llama.lm.tokenizer.bos_token_id
    assert record["bos"]["excluded"] is True and record["bos"]["token_id"] == bos
    assert record["positions"] == {"bos_token_id": bos, "exclude_bos": True, "sink_factor": 5.0}
    streamed = load_sae(out)
    store = harvest(tiny_llama.lm, HOOK, tiny_llama.corpus, out=tmp_path / "acts", tokens=2048, context=32, batch_size=8,
                    progress=False)
    twin = SAE(SAEConfig(streamed.d_in, streamed.d_sae, streamed.cfg.architecture, streamed.cfg.k))
    twin.load_state_dict(streamed.state_dict())
    save_sae(twin, tmp_path / "twin", **store_provenance(store), feature_max_act=[1.0] * twin.d_sae)
    twin = load_sae(tmp_path / "twin")
    ours, theirs = (evaluate(s, tiny_llama.lm, tiny_llama.corpus, tokens=2048, batch_size=8, progress=False).to_json()
                    for s in (streamed, twin))
    for key in ("positions", "reconstruction", "sparsity", "downstream", "exclude_bos"):
        assert ours[key] == theirs[key], key
    assert ours["positions"]["excluded_bos"] > 0
    # before the fix the stream recorded no rule: eval then scored the BOS positions it never trained on
    bare = SAE(SAEConfig(streamed.d_in, streamed.d_sae, streamed.cfg.architecture, streamed.cfg.k))
    bare.load_state_dict(streamed.state_dict())
    bare.provenance = {k: v for k, v in streamed.provenance.items()
                       if k not in ("bos", "positions", "exclude_special_tokens")}
    everything = evaluate(bare, tiny_llama.lm, tiny_llama.corpus, tokens=2048, batch_size=8, progress=False).to_json()
    assert everything["reconstruction"]["tokens"] > ours["reconstruction"]["tokens"]
