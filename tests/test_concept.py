"""Concepts and dial measures on tiny models with hand-set SAEs: a planted concept feature, the calibration
sweep, both edit-position modes, and the output score against a hand computation."""

import pytest
import torch

from saelab import SAE, SAEConfig, load_model
from saelab.concept import (ConceptConfig, ConceptResult, calibrate_writers, concept_json, find_concept,
                            find_writers, pick_strength, select_features)
from saelab.formats import save_sae
from saelab.hooks import capture, intervene
from saelab.measures import (ConceptClassifier, DialValue, Judge, concept_curve, fit_threshold, keyword_hit,
                             output_scores, repetition_rate)
from saelab.steer import Clamp, DialSpec, compare_generations, concept_edits, edit_start, steering
from saelab.writers import concept_tokens
from saelab.generation import generate_ids, prompt_ids

EMBED_HOOK = "blocks.0.hook_resid_pre"  # the input of block 0 is the token embedding itself
LAST_HOOK = "blocks.2.hook_resid_post"  # the last block's output: what the final norm and head read
PLANTED = 5
POSITIVES = ["import os\nos.system(cmd)\n", "os.system(x)", "def f(x):\n    os.system(x)\n", "os.system(cmd + 1)",
             "import os\ndef f(cmd):\n    return os.system(cmd)\n", "x = os.system(cmd)", "os.system(f(x))",
             "def f():\n    os.system(cmd)\n    return 1\n"]
NEGATIVES = ["import os\nos.path(cmd)\n", "os.path(x)", "def f(x):\n    return x + 1\n", "os.f(cmd + 1)",
             "import os\ndef f(cmd):\n    return os.f(cmd)\n", "x = f(cmd)", "print(f(x))",
             "def f():\n    return x + 1\n"]


@pytest.fixture(scope="module")
def lm(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]))


def token_id(lm, text):
    (i,) = lm.tokenizer.encode(text, add_special_tokens=False)
    return i


def planted_sae(lm, hook=EMBED_HOOK, d_sae=48, seed=0):
    """A relu SAE whose feature PLANTED fires (at 0.25) exactly on the ``system`` token; the rest random."""
    e = lm.model.get_input_embeddings().weight.detach()[token_id(lm, "system")]  # (d,)
    sae = SAE(SAEConfig(e.shape[0], d_sae, "relu"))
    sae.reset_parameters(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.mul_(8.0)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.05)
        sae.W_enc[:, PLANTED] = e / e.dot(e)
        sae.b_enc[PLANTED] = -0.75
        sae.W_dec[PLANTED] = e / e.norm()
    sae.eval()
    sae.provenance = {"hook_name": hook}
    return sae


def test_planted_concept_is_ranked_first_and_selected(lm):
    sae = planted_sae(lm)
    emb = lm.model.get_input_embeddings().weight.detach()
    pre = (emb @ sae.W_enc[:, PLANTED] + sae.b_enc[PLANTED]).detach()  # (vocab,) the planted feature on every token
    assert int(pre.argmax()) == token_id(lm, "system") and float(pre.sort().values[-2]) < 0, \
        "the test needs the planted feature to fire on 'system' only"
    result = find_concept(lm, sae, POSITIVES, NEGATIVES, ConceptConfig(holdout=0.25))
    assert result.ranking[0]["feature"] == PLANTED and result.ranking[0]["auroc"] == 1.0
    assert result.features[0] == PLANTED
    assert len(result.features) <= 3  # the planted feature already separates perfectly: little left to gain
    c = result.classifier
    assert c.threshold < 1.0 and c.features == result.features
    out = concept_json(result, None)
    assert out["features"] == result.features and out["strength"] is None


def test_selection_grows_while_heldout_improves_and_stops():
    # features 0 and 1 each mark half of the positives (complementary), 2 is noise, 3 duplicates 0
    torch.manual_seed(0)
    n = 12
    pos = torch.zeros(n, 5)
    pos[::2, 0] = 1.0
    pos[1::2, 1] = 1.0
    pos[::2, 3] = 1.0
    pos[:, 2] = torch.rand(n) * 0.5
    neg = torch.zeros(n, 5)
    neg[:, 2] = torch.rand(n) * 0.5
    neg[:, 4] = 1.0  # higher on negatives: never a candidate
    S = torch.cat([pos, neg])
    r = select_features(S, n, torch.ones(5), ConceptConfig(holdout=0.5, seed=1))
    assert sorted(r.features) == [0, 1] or sorted(r.features) == [1, 3]
    assert 4 not in [x["feature"] for x in r.ranking]
    assert r.steps[-1]["joined"] is False or len(r.features) == ConceptConfig().max_features
    assert all(s["joined"] for s in r.steps[:len(r.features)])


def test_selection_needs_enough_texts():
    with pytest.raises(ValueError, match="at least 4 positive"):
        select_features(torch.rand(5, 3), 2, torch.ones(3), ConceptConfig())


def test_fit_threshold_and_small_measures():
    assert fit_threshold([0.9, 0.8], [0.1, 0.3]) == pytest.approx(0.55)
    assert repetition_rate([1, 2, 3, 1, 2, 3, 1, 2, 3]) == pytest.approx(4 / 7)
    assert repetition_rate([1, 2]) == 0.0
    assert keyword_hit("The Golden Gate Bridge.", ["golden gate"]) and not keyword_hit("goldengate", ["golden gate"])
    assert keyword_hit("two Bridges", ["bridge"]) and not keyword_hit("abridged", ["bridge"])


def _point(value, rate, nll, degenerate=0.0):
    return DialValue(value, rate, nll, 1.0, 0.0, degenerate, [])


def test_pick_strength_smallest_fluent_value_reaching_the_target():
    cfg = ConceptConfig(target_rate=0.8, max_fluency_ratio=1.5, max_degenerate=0.1)
    sweep = [_point(None, 0.0, 1.0), _point(0.5, 0.2, 1.0), _point(1.0, 0.8, 1.2), _point(2.0, 1.0, 1.4),
             _point(5.0, 1.0, 3.0)]
    assert pick_strength(sweep, cfg) == (1.0, True, 0.8)
    # the target is only reached where fluency breaks: the best fluent value instead, marked not reached
    sweep = [_point(None, 0.0, 1.0), _point(1.0, 0.4, 1.2), _point(2.0, 0.6, 1.4, 0.1), _point(5.0, 1.0, 3.0)]
    assert pick_strength(sweep, cfg) == (2.0, False, 0.6)
    sweep = [_point(None, 0.0, 1.0), _point(1.0, 0.4, 1.2), _point(2.0, 0.9, 1.3, degenerate=0.5)]
    assert pick_strength(sweep, cfg) == (1.0, False, 0.4)


def forcing_sae(lm, word="system"):
    """A relu SAE at the last block whose feature PLANTED writes the unembedding row of ``word``: clamped high,
    the model must say ``word``."""
    w = lm.model.get_output_embeddings().weight.detach()[token_id(lm, word)]
    sae = SAE(SAEConfig(w.shape[0], 16, "relu"))
    sae.reset_parameters(0)
    with torch.no_grad():
        sae.b_enc.fill_(-10.0)  # nothing fires by itself: clamping adds exactly value × max × W_dec[f]
        sae.W_dec[PLANTED] = w / w.norm()
    sae.eval()
    sae.provenance = {"hook_name": LAST_HOOK, "feature_max_act": [1.0] * 16}
    return sae


LOOSE = dict(max_fluency_ratio=1e9, max_degenerate=1.0, max_new_tokens=6)


def test_calibration_search_finds_the_strength_where_the_concept_appears(lm):
    sae = forcing_sae(lm)
    prompts = ["def f(x):\n", "import os\n"]
    cfg = ConceptConfig(clamp_values=(0.0, 200.0, 400.0), modes=("clamp",), sizes=(1,), **LOOSE)
    cal = calibrate_writers(lm, sae, [PLANTED], prompts, Judge(keywords=["system"]), cfg)
    default, small, big = cal.sweep  # the search stops at the first strength that reaches the target
    assert default.value is None and default.concept_rate == 0.0
    assert small.concept_rate == 0.0 and big.concept_rate == 1.0
    assert (cal.strength, cal.reached, cal.spec.features) == (200.0, True, (PLANTED,))
    assert big.fluency_nll > default.fluency_nll  # the forced text is unlikely under the unsteered model
    assert len(default.answers) == len(prompts) and all(a.n_tokens == 6 for a in big.answers)
    add = calibrate_writers(lm, sae, [PLANTED], prompts, Judge(keywords=["system"]),
                            ConceptConfig(add_values=(0.0, 50.0), modes=("add",), sizes=(1,), **LOOSE))
    assert add.spec.mode == "add" and add.spec.unit == "norm" and add.search[0]["mode"] == "add"


def test_selection_picks_the_writer_not_the_detector(lm):
    """Feature 3 detects the concept best (ranked first, AUROC 1) and writes nothing; feature 8 detects it worse
    and writes ``system``; feature 9 detects well and writes nothing. The screen and the calibration pick 8."""
    sae = forcing_sae(lm)
    with torch.no_grad():
        sae.W_dec[8] = sae.W_dec[PLANTED].clone()
        sae.W_dec[3] = 0
        sae.W_dec[9] = 0
    ranking = [{"feature": f, "auroc": a, "mean_pos": 1.0, "mean_neg": 0.0} for f, a in ((3, 1.0), (9, 0.9), (8, 0.7))]
    result = ConceptResult([3], ConceptClassifier([3], [1.0], 0.5), ranking, [])
    cfg = ConceptConfig(keywords=["system"], clamp_values=(300.0,), modes=("clamp",), sizes=(1, 2),
                        screen_strength=300.0, screen_tokens=4, **LOOSE)
    found = find_writers(lm, sae, result, POSITIVES, NEGATIVES, ["def f(x):\n", "import os\n"], cfg)
    assert found.writers[0]["feature"] == 8 and found.writers[0]["lift"] > 0.1
    assert all(abs(w["lift"]) < 1e-4 for w in found.writers[1:])  # W_dec = 0: exactly nothing written
    assert found.calibration.spec.features == (8,) and found.calibration.reached
    assert token_id(lm, "system") in found.concept_tokens
    out = concept_json(result, found)
    assert out["features"] == [8] and out["strength"] == 300.0 and out["detection_features"] == [3]
    with pytest.raises(ValueError, match="no candidate writes"):
        calibrate_writers(lm, sae, [], ["x"], Judge(keywords=["system"]), cfg)


def test_concept_tokens(lm):
    tok = lm.tokenizer
    got = concept_tokens(tok, POSITIVES, NEGATIVES)
    assert token_id(lm, "system") in got and all(t not in got for t in tok("os", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="no token stands"):
        concept_tokens(tok, ["x"], ["x"])


def test_concept_curve_with_the_feature_classifier(lm):
    sae = planted_sae(lm)
    clf = ConceptClassifier([PLANTED], [0.25], 0.5)
    curve = concept_curve(lm, sae, DialSpec((PLANTED,)), ["import os\n"], [1.0], judge=Judge(clf), max_new_tokens=4,
                          max_act={PLANTED: 0.25})
    for p in curve:
        for a in p.answers:
            assert a.on_concept == (a.concept_score >= 0.5) and a.on_concept == ("system" in a.text)
    with pytest.raises(ValueError, match="classifier, a keyword"):
        concept_curve(lm, sae, DialSpec((PLANTED,)), ["x"], [1.0], judge=Judge())


# -- edit positions ----------------------------------------------------------------------------------

@torch.no_grad()
def test_edit_start_leaves_earlier_positions_untouched(lm):
    sae = planted_sae(lm, hook="blocks.1.hook_resid_post")
    ids = prompt_ids(lm, "import os\nos.system(cmd)\n")
    edits = concept_edits([PLANTED, 7], 3.0)
    assert edits == {PLANTED: Clamp(3.0), 7: Clamp(3.0)}
    sae.provenance["feature_max_act"] = [1.0] * sae.d_sae
    with capture(lm.model, "blocks.2.hook_resid_pre") as plain:
        lm.model(input_ids=ids)
    outs = {}
    for start in (0, 5):
        with steering(lm, sae, edits, start=start), capture(lm.model, "blocks.2.hook_resid_pre") as acts:
            lm.model(input_ids=ids)
        outs[start] = acts["blocks.2.hook_resid_pre"][0]
    x = plain["blocks.2.hook_resid_pre"][0]
    assert torch.equal(outs[5][:5], x[:5])  # exact: the edit adds zeros before the start
    torch.testing.assert_close(outs[5][5:], outs[0][5:])
    assert not torch.allclose(outs[0][:5], x[:5])


@torch.no_grad()
def test_generated_mode_edits_only_positions_that_predict_new_tokens(lm):
    sae = planted_sae(lm, hook="blocks.1.hook_resid_post")
    sae.provenance["feature_max_act"] = [1.0] * sae.d_sae
    ids = prompt_ids(lm, "import os\nos.system(cmd)\n")
    n = ids.shape[1]
    assert edit_start("generated", n) == n - 1 and edit_start("all", n) == 0
    with pytest.raises(ValueError, match="unknown positions"):
        edit_start("prompt", n)
    seen = {}
    for mode in ("all", "generated"):
        calls = []
        with steering(lm, sae, {PLANTED: Clamp(50.0)}, start=edit_start(mode, n)), \
                intervene(lm.model, {"blocks.2.hook_resid_pre": lambda x: calls.append(x.clone()) or x}):
            out = generate_ids(lm, ids, max_new_tokens=3, temperature=0.0, exact_length=True)
        seen[mode] = (calls, out)
    with capture(lm.model, "blocks.2.hook_resid_pre") as plain:
        lm.model(input_ids=ids)
    x = plain["blocks.2.hook_resid_pre"][0]  # (n, d)
    prefill_gen, prefill_all = seen["generated"][0][0][0], seen["all"][0][0][0]
    assert prefill_gen.shape[0] == n  # the KV-cached prefill
    torch.testing.assert_close(prefill_gen[:n - 1], x[:n - 1])  # (generation may run on another thread count)
    torch.testing.assert_close(prefill_gen[n - 1], prefill_all[n - 1])
    assert not torch.allclose(prefill_all[:n - 1], x[:n - 1])
    pairs = compare_generations(lm, sae, "import os\n", {PLANTED: Clamp(50.0)}, max_new_tokens=3, temperature=0.0,
                                positions="generated")
    assert len(pairs) == 1


# -- output score -----------------------------------------------------------------------------------

@torch.no_grad()
def test_output_score_matches_a_hand_computation(lm):
    hook = "blocks.1.hook_resid_post"
    sae = planted_sae(lm, hook=hook)
    feats, k, amp, prompt = [PLANTED, 3, 11], 5, 10.0, "import os\n"
    got = output_scores(lm, sae, feats, prompt=prompt, k=k, amplify=amp, batch=2)
    ids = prompt_ids(lm, prompt)
    with capture(lm.model, hook) as acts:
        lm.model(input_ids=ids)
    x_last = acts[hook][0, -1]
    z_max = float(sae.encode(x_last).max())
    head, norm = lm.model.lm_head, lm.model.model.norm
    for f, g in zip(feats, got):
        lens = torch.softmax(head(norm(sae.W_dec[f])), -1).topk(k).indices
        assert g.feature == f and g.lens_tokens == lens.tolist()

        def boost(x):
            x = x.clone()
            z = sae.encode(x[0, -1])
            z2 = z.clone()
            z2[f] += amp * z_max
            x[0, -1] = sae.decode(z2) + (x[0, -1] - sae.decode(z))  # Anthropic's form: error term kept
            return x

        with intervene(lm.model, {hook: boost}):
            probs = torch.softmax(lm.model(input_ids=ids).logits[0, -1], -1)
        order = probs.argsort(descending=True).tolist()
        best_rank = min(order.index(t) for t in lens.tolist())
        want = (1 - best_rank / probs.shape[0]) * float(probs[lens].max())
        assert g.score == pytest.approx(want, rel=1e-4, abs=1e-7)
        assert 0 <= g.score <= 1


@torch.no_grad()
def test_batched_generation_matches_one_prompt_at_a_time(lm):
    from saelab.measures import generate_batch
    from saelab.generation import generated_part

    encoded = [prompt_ids(lm, p) for p in ["import os\nos.system(cmd)\n", "def f(x):\n"]]  # different lengths
    batched = generate_batch(lm, encoded, max_new_tokens=5, temperature=0.0)
    for ids, rows in zip(encoded, batched):
        alone = generated_part(lm, generate_ids(lm, ids, max_new_tokens=5, temperature=0.0)[0], ids.shape[1])
        assert rows[0].tolist() == alone.tolist()


# -- CLI --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory, tiny_model_dirs, lm):
    sae = planted_sae(lm)
    root = tmp_path_factory.mktemp("concept")
    save_sae(sae, root / "sae", model_name=str(tiny_model_dirs["llama"]), hook_name=EMBED_HOOK,
             feature_max_act=[0.25] * sae.d_sae)
    (root / "pos.txt").write_text("\n".join(p.replace("\n", " ") for p in POSITIVES))
    (root / "neg.txt").write_text("\n".join(p.replace("\n", " ") for p in NEGATIVES))
    (root / "prompts.txt").write_text("import os\ndef f(x):\n")
    return root


def test_cli_concept_and_dial(planted_dir, capsys):
    import json

    from saelab.cli import main

    d = planted_dir
    assert main(["concept", str(d / "sae"), "--positive", str(d / "pos.txt"), "--negative", str(d / "neg.txt"),
                 "--prompts", str(d / "prompts.txt"), "--clamp-values", "1,4", "--modes", "clamp", "--sizes", "1",
                 "--max-new-tokens", "3", "--save", str(d / "c.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strength"] in (1.0, 4.0) and out["mode"] == "clamp" and out["writers"]
    assert [p["value"] for p in out["sweep"]][0] is None
    saved = json.loads((d / "c.json").read_text())
    assert saved["features"] == out["features"] and saved["strength"] == out["strength"]
    assert main(["concept", str(d / "sae"), "--positive", str(d / "pos.txt"), "--negative", str(d / "neg.txt"),
                 "--prompts", str(d / "prompts.txt"), "--clamp-values", "4", "--modes", "clamp", "--sizes", "1",
                 "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr()
    assert "writers (lift" in printed.out and "dial: clamp" in printed.out and "screening" in printed.err
    report = d / "report"
    assert main(["dial", str(d / "sae"), "--concept", f"{d / 'pos.txt'}:{d / 'neg.txt'}", "--prompts",
                 str(d / "prompts.txt"), "--values", "2", "--max-new-tokens", "3", "--positions", "generated",
                 "--report", str(report), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["value"] for p in out["points"]] == [None, 2.0] and len(out["points"][1]["answers"]) == 2
    assert (report / "report.html").is_file() and json.loads((report / "results.json").read_text()) == out
    assert main(["dial", str(d / "sae"), "--features", "5,6", "--prompts", str(d / "prompts.txt")]) == 2
    assert "--keywords" in capsys.readouterr().err


def test_selection_does_not_grow_on_a_set_that_separates_the_wrong_way():
    """Held out, every candidate is *lower* on positives (d′ < 0): a slightly less negative d′ is no gain."""
    import random

    from saelab.concept import split

    n, cfg = 8, ConceptConfig(holdout=0.5, seed=3)
    rng = random.Random(cfg.seed)
    (tr_p, ho_p), (tr_n, ho_n) = split(n, cfg.holdout, rng), split(n, cfg.holdout, rng)
    g = torch.Generator().manual_seed(0)
    S = torch.zeros(2 * n, 3)
    S[tr_p] = 1.0                                                      # training: every feature separates perfectly
    S[[n + i for i in ho_n]] = 0.6 + 0.05 * torch.randn(len(ho_n), 3, generator=g)
    S[ho_p, 0] = 0.20 + 0.05 * torch.randn(len(ho_p), generator=g)   # held out: lower on positives
    S[ho_p, 1] = S[ho_p, 0] + 0.20                                    # ... less so for 1 and 2: d′ rises a lot,
    S[ho_p, 2] = S[ho_p, 0] + 0.30                                    # but stays below 0
    r = select_features(S, n, torch.ones(3), cfg)
    first = r.steps[0]
    assert first["heldout_auroc"] < 0.5 and first["heldout_dprime"] < 0
    assert len(r.features) == 1 and r.steps[1]["joined"] is False
