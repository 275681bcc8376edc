"""StreamSource: activations streamed from a model, and the provenance of exactly those activations."""

from __future__ import annotations

from argparse import Namespace

import torch

from saelab.sources import StreamSource

HOOK = "blocks.1.hook_resid_post"


def test_stream_source_records_its_rule(tiny_llama):
    source = StreamSource.open(tiny_llama.lm, HOOK, tiny_llama.corpus, context=32, seed=2)
    prov = source.provenance
    bos = tiny_llama.lm.tokenizer.bos_token_id
    assert prov.exclude_bos and prov.sink_factor == 5.0 and prov.bos_token_id == bos
    assert prov.position_rule() == source.rule
    assert prov.corpus == {"source": tiny_llama.corpus, "split": "train", "seed": 2}
    x = next(source.batches(64))
    assert x.shape == (64, 32) and torch.isfinite(x).all()
    kept = StreamSource.open(tiny_llama.lm, HOOK, tiny_llama.corpus, context=32, exclude_bos=False, sink_factor=None)
    assert not kept.provenance.exclude_bos and kept.provenance.to_json()["exclude_special_tokens"] is False


def test_the_cli_stream_records_the_rule(tiny_llama):
    from saelab.cli.train_eval import train_source

    args = Namespace(acts=None, model=tiny_llama.model_dir, hook=HOOK, corpus=tiny_llama.corpus, context=32, seed=0)
    batches, prov = train_source(args, 256)
    bos = tiny_llama.lm.tokenizer.bos_token_id
    assert prov["bos"]["excluded"] and prov["positions"] == {"bos_token_id": bos, "exclude_bos": True,
                                                             "sink_factor": 5.0}
    assert prov["exclude_special_tokens"] == [bos] and prov["context_size"] == 32
