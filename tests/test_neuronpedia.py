"""Neuronpedia export: SAEDashboard's batch dataclasses round-trip it, every key Neuronpedia's converter reads is
there with true values (against brute force on a tiny model), bands agree with their edges, and explanation rows
fill every NOT NULL column of Neuronpedia's Explanation table."""

import gzip
import json

import pytest
import torch

from saelab.analyze import AnalyzeConfig, analyze, direct_logit_directions, token_batches
from saelab.cli import main
from saelab.featuredb import FeatureDB
from saelab.formats import save_sae
from saelab.hooks import run_to_hooks
from saelab.neuronpedia import DEFAULT_AUTHOR_ID, export_neuronpedia
from saelab.sae import SAE, SAEConfig

HOOK = "blocks.1.hook_resid_post"
CFG = dict(tokens=1200, batch_size=4, k_top=5, n_quantiles=3, per_quantile=2, n_random=3, split="all",
           map="pca", window_left=5, window_right=2, pool=16, context=16)

# What convert-saedashboard-to-neuronpedia-export.py (hijohnnylin/neuronpedia) reads with [...] (a KeyError if
# missing); "vector" and the dfa_* keys it reads only when present.
CONVERTER_BATCH_KEYS = ["model_id", "layer", "sae_id_suffix", "features"]
CONVERTER_FEATURE_KEYS = [
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
    "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1", "neg_str", "neg_values",
    "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "decoder_weights_dist", "activations"]
CONVERTER_ACTIVATION_KEYS = ["tokens", "values", "bin_contains", "bin_max", "bin_min", "qualifying_token_index"]
# Explanation's NOT NULL columns in apps/webapp/prisma/schema.prisma (the import inserts only the columns of
# the first row, so those without a database default must be in every row; the others are filled too).
EXPLANATION_NOT_NULL = ["id", "modelId", "layer", "index", "description", "authorId", "scoreV1", "createdAt",
                        "updatedAt"]


def make_sae(seed=0, **prov):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=32, d_sae=24, architecture="topk", k=4))
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
    sae.provenance = {"hook_name": HOOK, "context_size": 16, **prov}
    return sae.eval()


@pytest.fixture(scope="module")
def exported(lm, corpus, tmp_path_factory):
    """An SAE folder analysed (bands from a warm-up max) and exported: (sae, db, out folder, batches)."""
    root = tmp_path_factory.mktemp("np")
    sae = make_sae()
    save_sae(sae, root / "sae")
    db_path = analyze(root / "sae", lm, corpus, hook=HOOK, out=root / "features.db", progress=False, **CFG)
    out = root / "export"
    export_neuronpedia(db_path, out, batch_size=10, author_id="user-1")
    batches = [json.loads((out / f"batch-{n}.json").read_text(encoding="utf-8")) for n in range(3)]
    return sae, FeatureDB.open(db_path), out, batches


def dense(sae, lm, corpus):
    """Brute force over the pass: ids [n_seq, T], inputs x [n_seq·T, d_in] and latents z [n_seq·T, d_sae]
    with BOS tokens left out (rows dropped)."""
    ids = torch.cat([b for b, _ in token_batches(lm, corpus, AnalyzeConfig(**CFG), 16)])
    x = run_to_hooks(lm.model, ids, HOOK)[HOOK].reshape(-1, 32)
    keep = ids.reshape(-1) != lm.tokenizer.bos_token_id
    return ids, x[keep].double(), sae.encode(x[keep]).detach().double()


def features(batches):
    return [f for b in batches for f in b["features"]]


def test_round_trip_through_saedashboard_loses_nothing(exported, lm):
    dash = pytest.importorskip("sae_dashboard.neuronpedia.neuronpedia_dashboard",
                               reason="sae-dashboard not installed (pip install --no-deps sae-dashboard)")
    sae, db, out, batches = exported
    assert sorted(p.name for p in out.glob("batch-*.json")) == ["batch-0.json", "batch-1.json", "batch-2.json"]
    for batch in batches:
        assert dash.NeuronpediaDashboardBatch(**batch).to_dict() == batch
    feats = features(batches)
    assert [f["feature_index"] for f in feats] == list(range(sae.d_sae))
    n_random = AnalyzeConfig(**CFG).n_random
    for f in feats:
        i, row = f["feature_index"], db.feature(f["feature_index"])
        kept = len(db.examples(i, "top")) + len(db.examples(i, "quantile"))
        kept += sum(e["rank"] < n_random for e in db.examples(i, "random"))
        assert len(f["activations"]) == kept
        assert [a["tokens"] for a in f["activations"][:len(db.examples(i, "top"))]] == \
            [e["tokens"] for e in db.examples(i, "top")]
        assert f["pos_str"] == [t for t, _ in db.logit_effects(i)["positive"]]
        assert f["frac_nonzero"] == row["density"]
        assert sum(f["freq_hist_data_bar_heights"]) == row["count"]
        assert sum(f["logits_hist_data_bar_heights"]) == lm.model.config.vocab_size
        if row["count"]:
            assert f["correlated_neurons_indices"] and f["correlated_features_indices"]


def test_every_converter_key_with_true_values(exported, lm, corpus):
    sae, db, out, batches = exported
    for b in batches:
        assert all(k in b for k in CONVERTER_BATCH_KEYS) and b["sae_id_suffix"] is None
        assert b["layer"] == 1 and b["sae_set"] == "saelab-resid-post-24"
    _, x, z = dense(sae, lm, corpus)
    D, W_U = direct_logit_directions(sae, lm, HOOK, db.sae_info()["final_rms"])   # at the analysis' mean RMS
    for f in features(batches):
        i = f["feature_index"]
        assert all(k in f for k in CONVERTER_FEATURE_KEYS)
        assert all(k in a for a in f["activations"] for k in CONVERTER_ACTIVATION_KEYS)
        w = sae.W_dec[i].detach()
        top = w.topk(10)
        assert f["neuron_alignment_indices"] == top.indices.tolist()
        assert f["neuron_alignment_l1"] == pytest.approx((top.values.abs() / w.abs().sum()).tolist(), rel=1e-5)
        eff = (D[i] @ W_U.T).double()
        heights = torch.histc(eff, bins=50, min=float(eff.min()), max=float(eff.max()))
        assert f["logits_hist_data_bar_heights"] == heights.long().tolist()
        assert f["logits_hist_data_bar_values"][0] == pytest.approx(float(eff.min() + (eff.max() - eff.min()) / 100), rel=1e-5)
        if not db.feature(i)["count"]:
            continue
        zi = z[:, i]
        # Pearson and cosine over the analysed tokens, as SAEDashboard's RollingCorrCoef computes them
        pear = torch.corrcoef(torch.cat([zi[None], x.T]))[0, 1:]
        cos = (zi @ x) / (zi.norm() * x.norm(dim=0))
        want = pear.topk(10).indices.tolist()
        assert f["correlated_neurons_indices"] == want
        assert f["correlated_neurons_pearson"] == pytest.approx(pear[want].tolist(), rel=1e-6, abs=1e-9)
        assert f["correlated_neurons_l1"] == pytest.approx(cos[want].tolist(), rel=1e-6, abs=1e-9)
        for j, p, c in zip(f["correlated_features_indices"], f["correlated_features_pearson"],
                           f["correlated_features_l1"]):  # exact here: k = 4 <= coact_top
            assert p == pytest.approx(float(torch.corrcoef(torch.stack([zi, z[:, j]]))[0, 1]), rel=1e-5, abs=1e-7)
            assert c == pytest.approx(float(zi @ z[:, j] / (zi.norm() * z[:, j].norm())), rel=1e-6)
        cofiring = [j for j in range(sae.d_sae) if j != i and float(zi @ z[:, j]) > 0]
        best = sorted(cofiring, key=lambda j: -float(torch.corrcoef(torch.stack([zi, z[:, j]]))[0, 1]))[:10]
        assert sorted(f["correlated_features_indices"]) == sorted(best)
        assert f["n_tokens_in_prompt"] == 16 and f["n_prompts_total"] == 1200 // 16


def check_bands(feats, db, nq):
    n_bands_checked = 0
    for f in feats:
        top = [a for a in f["activations"] if a["bin_min"] == -1]
        assert all(a["bin_contains"] == -1 and a["bin_max"] == db.feature(f["feature_index"])["max_act"] for a in top)
        for a in f["activations"][len(top):]:
            v = a["values"][a["qualifying_token_index"]]
            assert a["bin_min"] * (1 - 1e-6) <= v <= a["bin_max"] * (1 + 1e-6), (f["feature_index"], a)
            assert 0 < a["bin_contains"] <= 1
            n_bands_checked += 1
    assert n_bands_checked > 0


def test_bands_agree_with_their_edges(exported):
    sae, db, out, batches = exported
    check_bands(features(batches), db, 3)
    # not vacuous: some feature's max grew after the warm-up that fixed its bands, so its top band reaches
    # above 3/2 of its lower edge (the edges a final-max re-banding would have written wrongly)
    tops = [db.bands(i)[-1] for i in range(sae.d_sae) if db.bands(i)]
    assert any(b["hi"] > b["lo"] * 1.5 * (1 + 1e-6) for b in tops)


def test_band_fractions_match_brute_force_when_bands_are_fixed_from_the_start(lm, corpus, tmp_path):
    probe = make_sae()
    _, _, z = dense(probe, lm, corpus)
    hint = (z.max(0).values * 0.8).tolist()  # a training-time max below the analysis max: the top band stretches
    sae = make_sae(feature_max_act=hint)
    db = FeatureDB.open(analyze(sae, lm, corpus, hook=HOOK, out=tmp_path / "f.db", progress=False, explain=False,
                                **CFG))
    export_neuronpedia(db, tmp_path / "np", sae=sae)
    feats = features([json.loads(p.read_text()) for p in sorted((tmp_path / "np").glob("batch-*.json"))])
    check_bands(feats, db, 3)
    n = len(z)
    for f in feats:
        i = f["feature_index"]
        for b in db.bands(i):
            zi = z[:, i]
            assert b["tokens"] == n
            assert b["lo"] == pytest.approx(b["band"] * hint[i] / 3, rel=1e-6)
            inside = (zi > 0) & (zi >= b["lo"] * (1 - 1e-6)) & (zi < b["hi"] * (1 + 1e-6) if b["band"] < 2 else True)
            assert b["count"] == int(inside.sum()), (i, b)
        contains = {(a["bin_min"], a["bin_max"]): a["bin_contains"] for a in f["activations"] if a["bin_min"] >= 0}
        for b in db.bands(i):
            if (b["lo"], b["hi"]) in contains:
                assert contains[b["lo"], b["hi"]] == pytest.approx(b["count"] / n)


def test_explanation_rows_fill_the_explanation_table(exported):
    sae, db, out, batches = exported
    rows = [json.loads(line) for p in sorted((out / "explanations").glob("batch-*.jsonl.gz"))
            for line in gzip.decompress(p.read_bytes()).decode("utf-8").splitlines()]
    explained = [i for i in range(sae.d_sae) if db.feature(i)["explanation"]]
    assert explained and [int(r["index"]) for r in rows] == explained
    keys = set(rows[0])
    sql = (out / "explanation_types.sql").read_text()
    for r in rows:
        assert set(r) == keys  # the import takes its column list from the first row
        assert all(r[c] is not None and r[c] != "" for c in EXPLANATION_NOT_NULL), r
        assert r["modelId"] == batches[0]["model_id"] and r["layer"] == "1-saelab-resid-post-24"
        assert r["authorId"] == "user-1" and r["typeName"] == "saelab-offline" and r["explanationModelName"] is None
        assert r["description"] == db.feature(int(r["index"]))["explanation"]
        assert f"'{r['typeName']}'" in sql and len(r["id"]) == 25
    assert len({r["id"] for r in rows}) == len(rows)
    assert 'INSERT INTO "ExplanationType"' in sql and "'user-1'" in sql


def test_cli_export_and_errors(exported, tmp_path, capsys):
    sae, db, out, batches = exported
    assert main(["export", "neuronpedia", str(db.path), "--out", str(tmp_path / "a"), "--model-id", "tiny-llama",
                 "--sae-set", "res-test", "--sae-id-suffix", "v2"]) == 0
    assert "model tiny-llama, layer 1, source set res-test" in capsys.readouterr().out
    batch = json.loads((tmp_path / "a" / "batch-0.json").read_text())
    assert batch["sae_id_suffix"] == "v2" and batch["model_id"] == "tiny-llama"
    row = json.loads(gzip.decompress(next((tmp_path / "a" / "explanations").glob("*.gz")).read_bytes()).splitlines()[0])
    assert row["layer"] == "1-res-test__v2" and row["authorId"] == DEFAULT_AUTHOR_ID
    with pytest.raises(ValueError, match="letters, digits and dashes"):
        export_neuronpedia(db, tmp_path / "b", sae=sae, sae_set="res_test")
    with pytest.raises(ValueError, match=r"belongs to the SAE at .*\(d_sae 24.*not to the SAE \(d_sae 8"):
        export_neuronpedia(db, tmp_path / "c", sae=SAE(SAEConfig(d_in=32, d_sae=8, architecture="relu")))
