"""One rule for BOS and attention sinks across harvest, evaluation, analysis and steering.

A tiny Llama is given two attention-sink-like outliers by a permanent hook on its first block: the
window start (BOS) and position 5 of every window are scaled ×300, as a real model's sinks are
(SmolLM2: ~25,000 vs a median of ~175). The store, the evaluation and the analysis must leave out
exactly the same positions, and eval's CE must equal an independent, BOS-led computation.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3

import pytest
import torch

from saelab.analyze import analyze
from saelab.corpus import CorpusSpec
from saelab.evaluate import evaluate
from saelab.harvest import harvest
from saelab.hooks import intervene, run_to_hooks
from saelab.models import load_model
from saelab.positions import PositionRule, window_median
from saelab.sae import SAE, SAEConfig
from saelab.steer import Clamp, steering
from saelab.generation import prompt_ids
from saelab.token_cache import sequences
from saelab.train import store_provenance

HOOK = "blocks.1.hook_resid_post"
SINK_POS, SCALE = 5, 300.0


@pytest.fixture(scope="module")
def sunk(tmp_path_factory):
    from tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("sinks")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {i + j}\n" for j in range(40)))
    lm = load_model(str(save_tiny_model("llama", root / "llama")))

    def make_sinks(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, 0] *= SCALE
        if h.shape[1] > SINK_POS:
            h[:, SINK_POS] *= SCALE
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = lm.model.model.layers[0].register_forward_hook(make_sinks)
    store = harvest(lm, HOOK, str(corpus), out=root / "acts", tokens=2048, context=32, batch_size=8, progress=False)
    sae = SAE(SAEConfig(32, 64, "topk", k=4))
    torch.manual_seed(0)
    with torch.no_grad():
        rows = torch.cat([store.read_shard(i)["acts"] for i in range(len(store.shards))])
        sae.W_dec.copy_(rows[torch.randperm(len(rows))[:64]] / rows.norm(dim=1).mean())
        sae.W_enc.copy_(sae.W_dec.T)
    sae.provenance = {**store_provenance(store), "feature_max_act": [1.0] * 64}
    yield {"lm": lm, "store": store, "sae": sae, "corpus": str(corpus), "root": root}
    handle.remove()


def test_the_store_leaves_out_bos_and_the_sink(sunk):
    store = sunk["store"]
    m = store.manifest
    assert m["positions"] == {"bos_token_id": m["bos"]["token_id"], "exclude_bos": True, "sink_factor": 5.0}
    pos = torch.cat([store.read_shard(i)["pos"] for i in range(len(store.shards))])
    tok = torch.cat([store.read_shard(i)["tokens"] for i in range(len(store.shards))])
    assert not (pos == 0).any() and not (pos == SINK_POS).any() and not (tok == m["bos"]["token_id"]).any()
    windows = torch.stack(list(sequences(sunk["corpus"], sunk["lm"].tokenizer, 32, 0))[:m["n_sequences"]])
    bos = m["bos"]["token_id"]
    assert m["excluded"]["sink"] == int((windows[:, SINK_POS] != bos).sum()) > 0   # the sink, unless BOS is there
    assert m["excluded"]["bos"] == int((windows == bos).sum())


def _bos_led_ce(lm, sae, ids, rule):
    """CE clean / spliced / zero-ablated by plain forwards: the SAE's reconstruction (or 0) at every
    position the rule keeps, the clean activation elsewhere; HF's own shifted loss."""
    x = run_to_hooks(lm.model, ids, [HOOK])[HOOK]
    keep = rule.keep(ids, x.norm(dim=-1))

    def ce(values=None):
        def put(a):
            out = a.clone()
            out[keep] = values(a[keep])
            return out
        with torch.no_grad(), (intervene(lm, {HOOK: put}) if values else contextlib.nullcontext()):
            return lm.model(input_ids=ids, labels=ids).loss.item()

    return ce(), ce(lambda a: sae(a).x_hat), ce(lambda a: torch.zeros_like(a)), keep


def test_eval_matches_an_independent_bos_led_computation(sunk):
    lm, sae, store = sunk["lm"], sunk["sae"], sunk["store"]
    spec = CorpusSpec(sunk["corpus"], "train")
    r = evaluate(sae, lm, spec, tokens=2048, batch_size=8, progress=False)
    ids = torch.stack(list(sequences(spec, lm.tokenizer, 32, 0))[:64])
    rule = PositionRule(store.manifest["bos"]["token_id"], 5.0)
    clean, spliced, zero, keep = _bos_led_ce(lm, sae, ids, rule)
    d = r.downstream
    assert d.ce_clean == pytest.approx(clean, rel=1e-5)
    assert d.ce_spliced == pytest.approx(spliced, rel=1e-5)
    assert d.ce_zero_ablated == pytest.approx(zero, rel=1e-5)
    assert d.ce_recovered_zero == pytest.approx((zero - spliced) / (zero - clean), rel=1e-4)
    # the same positions as the store: the same windows, so the same counts
    assert r.reconstruction.tokens == int(keep.sum()) == store.n_rows
    assert r.positions["excluded_sinks"] == store.manifest["excluded"]["sink"]
    assert r.positions["excluded_bos"] == store.manifest["excluded"]["bos"]
    # an SAE that records no rule is evaluated on every position, sinks included: another figure
    bare = SAE(sae.cfg)
    bare.load_state_dict(sae.state_dict())
    bare.provenance = {k: v for k, v in sae.provenance.items() if k not in ("positions", "bos", "exclude_special_tokens")}
    r_all = evaluate(bare, lm, spec, tokens=2048, batch_size=8, progress=False)
    assert r_all.reconstruction.tokens == ids.numel() and r_all.positions["excluded_sinks"] == 0
    assert abs(r_all.reconstruction.fvu - r.reconstruction.fvu) > 0.05


def test_analysis_mines_only_the_kept_positions(sunk, tmp_path):
    lm, sae, store = sunk["lm"], sunk["sae"], sunk["store"]
    db = analyze(sae, lm, sunk["corpus"], out=tmp_path / "features.db", tokens=2048, split="train", map="none",
                 explain=False, progress=False)
    con = sqlite3.connect(db)
    meta = {k: json.loads(v) for k, v in con.execute("select key, value from meta").fetchall()}
    assert meta["tokens_analysed"] == store.n_rows
    con.close()


def test_steering_leaves_the_sinks_alone(sunk):
    lm, sae = sunk["lm"], sunk["sae"]
    ids = prompt_ids(lm, "def f1(x):\n    return x * 2\n")
    assert ids.shape[1] > SINK_POS + 1
    with torch.no_grad():
        clean = run_to_hooks(lm.model, ids, [HOOK])[HOOK][0]
        with steering(lm, sae, {3: Clamp(5.0)}):
            edited = run_to_hooks(lm.model, ids, [HOOK])[HOOK][0]
    moved = (edited - clean).norm(dim=-1) > 1e-4
    assert not moved[0] and not moved[SINK_POS] and moved[1:SINK_POS].all()


def test_window_median_ignores_left_out_positions():
    norms = torch.tensor([[100.0, 1.0, 2.0, 3.0, 50.0], [7.0, 7.0, 7.0, 7.0, 7.0]])
    counted = torch.tensor([[False, True, True, True, True], [False, False, False, False, False]])
    assert window_median(norms, counted).tolist() == [[2.0], [float("inf")]]   # the lower middle value
    rule = PositionRule(bos_id=0, sink_factor=5.0)
    ids = torch.tensor([[0, 4, 4, 4, 4]])
    assert rule.keep(ids, norms[:1]).tolist() == [[False, True, True, True, False]]


def test_inspected_text_has_no_latents_at_the_sinks(sunk):
    from saelab.textfeatures import text_latents

    lm, sae = sunk["lm"], sunk["sae"]
    ids, z = text_latents(sae, lm, "def f1(x):\n    return x * 2\n", HOOK)
    assert len(ids) == z.shape[0] > SINK_POS
    fired = (z != 0).any(1)
    assert not fired[SINK_POS - 1] and fired[: SINK_POS - 1].all()      # BOS is not listed: the sink is one earlier
