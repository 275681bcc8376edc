"""The analysis pass against brute-force dense computations on a tiny model, inspect and concept search."""

import json
import math
import random

import pytest
import torch

from factories import CODE_LINES
from saelab.analyze import AnalyzeConfig, analyze, direct_logit_directions, logit_effects, token_batches
from saelab.featuredb import FeatureDB
from saelab.hooks import run_to_hooks
from saelab.models import load_model
from saelab.sae import ARCHITECTURES, SAE, SAEConfig
from saelab.textfeatures import auroc, contrastive_search, inspect_text

HOOK = "blocks.1.hook_resid_post"


def make_sae(arch="topk", d_sae=24, seed=0, **prov):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=32, d_sae=d_sae, architecture=arch, k=4 if arch in ("topk", "batchtopk") else None))
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        if arch == "relu":
            sae.b_enc.fill_(-0.02)  # about a third of the latents fire on a token
        if arch in ("jumprelu", "batchtopk"):  # thresholds below zero too: no latent may come out negative
            sae.threshold.copy_(torch.linspace(-0.05, 0.1, d_sae) if arch == "jumprelu" else torch.full((d_sae,), 0.02))
    sae.provenance = {"hook_name": HOOK, "context_size": 16, **prov}
    return sae.eval()


CFG = dict(tokens=1200, batch_size=4, k_top=5, n_quantiles=3, per_quantile=2, n_random=3, split="all",
           map="pca", explain=False, window_left=5, window_right=2, pool=16)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def analysed(request, lm, corpus, tmp_path_factory):
    sae = make_sae(request.param)
    out = tmp_path_factory.mktemp("db") / "features.db"
    analyze(sae, lm, corpus, out=out, progress=False, **CFG)
    return sae, FeatureDB.open(out)


def dense_latents(sae, lm, corpus):
    """Brute force: every sequence of the pass, dense latents ``[n_seq, T, d_sae]`` and ids ``[n_seq, T]``."""
    cfg = AnalyzeConfig(**CFG)
    ids = torch.cat([b for b, _ in token_batches(lm, corpus, cfg, 16)])
    x = run_to_hooks(lm.model, ids, HOOK)[HOOK]
    z = sae.encode(x.reshape(-1, 32)).reshape(*ids.shape, -1).detach()
    z[ids == lm.tokenizer.bos_token_id] = 0  # BOS is left out of the analysis
    return ids, z


def test_stats_and_top_examples_match_brute_force(analysed, lm, corpus):
    sae, db = analysed
    ids, z = dense_latents(sae, lm, corpus)
    n_tokens = int((ids != lm.tokenizer.bos_token_id).sum())
    assert db.sae_info()["tokens_analysed"] == n_tokens
    assert int((z > 0).sum()) > n_tokens  # the case is not vacuous: features do fire
    for f in range(sae.d_sae):
        row, zf = db.feature(f), z[..., f]
        assert row["count"] == int((zf > 0).sum())
        assert row["max_act"] == pytest.approx(float(zf.max()), rel=1e-5)
        if row["count"]:
            assert row["mean_act"] == pytest.approx(float(zf[zf > 0].mean()), rel=1e-4)
        hist = db.histogram(f)
        assert hist["zeros"] + sum(hist["counts"]) == n_tokens
        per_seq = zf.max(1).values  # (n_seq,): one example per sequence, at its max
        want = per_seq[per_seq > 0].sort(descending=True).values[:5]
        top = db.examples(f, "top")
        assert [e["max_act"] for e in top] == pytest.approx(want.tolist(), rel=1e-5)
        for e in top:
            s, p, m = e["seq"], e["pos"], e["max_pos"]
            assert e["acts"][m] == pytest.approx(float(zf[s, p]), rel=1e-5)
            assert e["token_ids"] == ids[s, p - m:p - m + len(e["token_ids"])].tolist()
            assert e["acts"] == pytest.approx(zf[s, p - m:p - m + len(e["acts"])].tolist(), rel=1e-5, abs=1e-7)
            assert "".join(e["tokens"]) == lm.tokenizer.decode(e["token_ids"])


def test_quantile_and_random_examples_are_real_firings(analysed, lm, corpus):
    sae, db = analysed
    ids, z = dense_latents(sae, lm, corpus)
    for f in range(sae.d_sae):
        for kind in ("quantile", "random"):
            for e in db.examples(f, kind):
                act = float(z[e["seq"], e["pos"], f])
                assert e["acts"][e["max_pos"]] == pytest.approx(act, rel=1e-5, abs=1e-7)
                assert e["max_act"] == pytest.approx(max(e["acts"]) if e["rank"] >= 3 and kind == "random"
                                                     else act, rel=1e-5, abs=1e-7)
        bands = {e["quantile"] for e in db.examples(f, "quantile")}
        assert bands <= {0.0, 1 / 3, 2 / 3}
        firing = [e for e in db.examples(f, "random") if e["rank"] < 3]
        assert all(e["acts"][e["max_pos"]] > 0 for e in firing)


def test_coactivation_matches_brute_force(analysed, lm, corpus):
    sae, db = analysed
    if sae.cfg.architecture != "topk":
        pytest.skip("exact only when every active latent is counted (k <= coact_top)")
    _, z = dense_latents(sae, lm, corpus)
    active = (z.reshape(-1, sae.d_sae) > 0).float()
    co = active.T @ active  # (d_sae, d_sae)
    for f in range(sae.d_sae):
        for other, count in db.coactivation(f):
            assert count == int(co[f, other])


def test_logit_effects_match_explicit_computation(lm):
    sae = make_sae()
    D, W_U = direct_logit_directions(sae, lm, HOOK)
    explicit = (sae.W_dec * lm.model.model.norm.weight) @ lm.model.lm_head.weight.T  # (d_sae, vocab)
    pv, pi, nv, ni = logit_effects(D, W_U, n=10, block=7)
    want = explicit.topk(10, dim=1)
    assert torch.allclose(pv, want.values, atol=1e-5) and torch.equal(pi, want.indices)
    assert torch.allclose(nv, explicit.topk(10, dim=1, largest=False).values, atol=1e-5)


def test_logit_effects_layernorm_centres_and_scales(tiny_model_dirs):
    gpt2 = load_model(str(tiny_model_dirs["gpt2"]))
    sae = make_sae()
    D, _ = direct_logit_directions(sae, gpt2, HOOK)
    ln = gpt2.model.transformer.ln_f
    assert torch.allclose(D, (sae.W_dec - sae.W_dec.mean(1, keepdim=True)) * ln.weight, atol=1e-6)


def test_db_logit_rows_and_neighbours(analysed):
    sae, db = analysed
    effects = db.logit_effects(3)
    assert len(effects["positive"]) == 10 and effects["positive"][0][1] >= effects["positive"][-1][1]
    dec = db.neighbours(3, "decoder")
    U = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    cos = U @ U[3]
    cos[3] = -2
    assert [n["other"] for n in dec] == cos.topk(10).indices.tolist()


def test_contrastive_search_recovers_planted_feature(lm):
    """Feature 5 reads the embedding of the ' system' token at resid_pre 0 (= the token embeddings)."""
    tok = lm.tokenizer
    target = tok.encode("os.system", add_special_tokens=False)[-1]
    emb = lm.model.get_input_embeddings().weight.detach()  # (vocab, d)
    u = emb[target] / emb[target].norm()
    others = torch.cat([emb[:target], emb[target + 1:]]) @ u
    sae = make_sae("relu", d_sae=32, seed=1)
    with torch.no_grad():
        sae.W_enc[:, 5] = u
        sae.b_enc[5] = -(float(emb[target] @ u) + float(others.max())) / 2  # only the target token passes
    rng = random.Random(1)
    plain = [l for l in CODE_LINES if "system" not in l]
    positives = ["\n".join(rng.sample(plain, 3) + ["os.system(cmd)"]) for _ in range(8)]
    negatives = ["\n".join(rng.sample(plain, 3) + ["os.path(cmd)"]) for _ in range(8)]
    hits = contrastive_search(sae, lm, positives, negatives, top=5, hook="blocks.0.hook_resid_pre")
    assert hits[0]["feature"] == 5 and hits[0]["auroc"] == 1.0 and hits[0]["mean_neg"] == 0.0


def test_inspect_text_keeps_exact_tokens(lm):
    sae = make_sae()
    text = "import os\nos.system(cmd)"
    rows = inspect_text(sae, lm, text, top=3, hook=HOOK)
    assert "".join(r.token for r in rows) == text
    for r in rows:
        assert 0 < len(r.features) <= 3
        assert [a for _, a in r.features] == sorted((a for _, a in r.features), reverse=True)


def test_auroc_matches_definition():
    pos, neg = torch.tensor([[3.0], [1.0]]), torch.tensor([[1.0], [0.0], [2.0]])
    # pairs: 3>1, 3>0, 3>2, 1=1 (½), 1>0, 1<2 → (4 + 0.5) / 6
    assert auroc(pos, neg).item() == pytest.approx(4.5 / 6)


def test_user_errors(lm, corpus):
    sae = make_sae()
    with pytest.raises(ValueError, match="give out="):
        analyze(sae, lm, corpus, progress=False, **CFG)
    bare = make_sae()
    bare.provenance = {}
    with pytest.raises(ValueError, match="hook"):
        analyze(bare, lm, corpus, out="x.db", progress=False, **CFG)
    with pytest.raises(TypeError, match="unknown options"):
        analyze(sae, lm, corpus, out="x.db", tokenz=5)
    with pytest.raises(ValueError, match="positive and negative"):
        contrastive_search(sae, lm, ["a"], [], hook=HOOK)


def test_short_corpus_is_reported(lm, tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": line}) + "\n" for line in CODE_LINES))
    out = analyze(make_sae(), lm, str(short), out=tmp_path / "f.db", progress=False, **{**CFG, "tokens": 10**7})
    info = FeatureDB.open(out).sae_info()
    assert info["tokens_read"] < 10**7 and "has only" in info["note"]
    assert math.isfinite(info["tokens_per_s"])


def test_cli_analyze_inspect_search(lm, corpus, tmp_path, capsys):
    from saelab.cli import main
    from saelab.formats import save_sae

    sae = make_sae(model_name=str(lm.path), corpus={"source": corpus, "split": "all"})
    save_sae(sae, tmp_path / "sae", **sae.provenance)
    assert main(["analyze", str(tmp_path / "sae"), "--tokens", "300", "--split", "all", "--map", "pca",
                 "--batch-size", "4"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    db = tmp_path / "features.db"
    assert FeatureDB.open(db).sae_info()["sae_path"] == str((tmp_path / "sae").resolve())
    assert main(["feature", str(db), "0"]) == 0
    assert "feature 0" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "sae"), "--text", r"import os\nos.system(cmd)", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert "".join(r["token"] for r in rows) == "import os\nos.system(cmd)"
    (tmp_path / "pos.txt").write_text("os.system(cmd)\nos.system(x)\n")
    (tmp_path / "neg.jsonl").write_text('{"text": "def f(x):\\n    return x"}\n"print(i)"\n')
    assert main(["search", str(tmp_path / "sae"), "--positive", str(tmp_path / "pos.txt"), "--negative",
                 str(tmp_path / "neg.jsonl"), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits and all(h["mean_pos"] > h["mean_neg"] for h in hits)
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    assert main(["search", str(tmp_path / "sae"), "--positive", str(tmp_path / "pos.txt"), "--negative",
                 str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "nope")]) == 2
