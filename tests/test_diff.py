"""Model diffing on tiny models: a planted change is found and named, identical models show none, models that
cannot share an SAE are refused, adapters load, and the CLI gate fails a build with one line."""

import copy
import json
from collections import Counter

import pytest
import torch

from saelab import SAE, SAEConfig, load_model, save_sae
from saelab.adapters import peft_available, with_adapter
from saelab.cli import main
from saelab.diff import Concept, DiffConfig, DiffRefused, gate, read_concept
from saelab.diff_run import load_pair, load_stats, run_diff, write_diff
from saelab.models import LoadedModel

from tests.factories import write_code_corpus
from tests.tiny_models import save_tiny_model, tiny_config

HOOK = "blocks.0.hook_resid_pre"   # the embedding output: a change planted in one embedding row shows here as is
TOKEN = 7                          # the token whose inputs get the planted direction
FEATURE = 5                        # the SAE feature aligned with it
D_IN, D_SAE = 32, 64
CFG = DiffConfig(resamples=200, batch_size=8)


def direction() -> torch.Tensor:
    return torch.randn(D_IN, generator=torch.Generator().manual_seed(1))


def make_sae() -> SAE:
    """A ReLU SAE with random unit features, one of which (FEATURE) reads the planted direction. The others are
    made orthogonal to it: in 32 dimensions random directions overlap ~6× more than in a real model's 576."""
    sae = SAE(SAEConfig(D_IN, D_SAE, "relu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        v = torch.nn.functional.normalize(direction(), dim=0)
        dirs = torch.randn(D_SAE, D_IN, generator=g)                                  # (d_sae, d_in)
        dirs = torch.nn.functional.normalize(dirs - (dirs @ v)[:, None] * v, dim=-1)
        dirs[FEATURE] = v
        sae.W_enc.copy_(dirs.T * 20)
        sae.W_dec.copy_(dirs)
        sae.b_enc.fill_(-0.05)
        sae.b_dec.zero_()
    sae.provenance = {"hook_name": HOOK, "exclude_bos": True, "context_size": 32,
                      "feature_max_act": [1.0] * D_SAE}
    return sae.eval()


def planted(base: LoadedModel, strength: float = 0.5, token: int = TOKEN) -> LoadedModel:
    """A copy of ``base`` whose embedding of ``token`` carries ``strength`` × the planted direction."""
    module = copy.deepcopy(base.model)
    with torch.no_grad():
        module.get_input_embeddings().weight[token] += strength * direction()
    return LoadedModel(module, base.tokenizer, "planted", base.family, base.is_causal)


def texts(n: int = 32, length: int = 32, seed: int = 0) -> torch.Tensor:
    """``[n, length]`` random ids, BOS (0) first, TOKEN on about a tenth of the positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (n, length), generator=g)
    ids[torch.rand(n, length, generator=g) < 0.1] = TOKEN
    ids[:, 0] = 0
    return ids


@pytest.fixture(scope="module")
def base(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]))


def test_planted_change_ranks_its_feature_first_and_the_gate_fires(base):
    sae, ids = make_sae(), texts()
    r = run_diff(sae, base, planted(base), ids, CFG, [Concept("planted", [FEATURE]), Concept("other", [1, 2])],
                 eval_tokens=256)
    assert r.features.rising[0] == FEATURE
    assert r.features.score_ci[0, FEATURE] > 0
    planted_rise, other = r.concepts
    assert gate(planted_rise, 2.0) and not gate(other, 2.0)
    assert planted_rise.top_texts[0][1] > 0
    assert r.baselines.kl > 0 and r.baselines.mean_diff_norm > 0
    assert set(r.fit) == {"base", "tuned"} and r.fit["base"]["fvu"] > 0


def test_too_few_texts_claim_nothing(base):
    r = run_diff(make_sae(), base, planted(base), texts(n=4), CFG, [Concept("planted", [FEATURE])], eval_tokens=0)
    assert r.features.score[FEATURE] > 0                     # the estimate is there ...
    assert r.features.rising == [] and not gate(r.concepts[0], 2.0)   # ... but 4 texts are too few to call it


def test_identical_models_show_no_change(base):
    sae, ids = make_sae(), texts()
    r = run_diff(sae, base, base, ids, CFG, [Concept("planted", [FEATURE])], eval_tokens=0)
    assert r.features.rising == [] and r.features.falling == []
    assert r.features.appear == [] and r.features.vanish == []
    assert torch.all(r.features.score_ci[0] <= 0) and torch.all(r.features.score_ci[1] >= 0)
    assert not gate(r.concepts[0], 1.01)
    assert r.baselines.kl == pytest.approx(0, abs=1e-6) and r.baselines.mean_diff_norm == 0


def test_a_copy_with_noise_changes_within_its_interval_more_often_than_not(base):
    """Two texts samples of the same pair of models: each feature's interval holds the other sample's estimate
    for most features (the interval means what it says), and the planted feature is not confused with noise."""
    sae = make_sae()
    tuned = planted(base, strength=0.0)
    with torch.no_grad():
        for p in tuned.model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    a = run_diff(sae, base, tuned, texts(seed=1), CFG, eval_tokens=0).features
    b = run_diff(sae, base, tuned, texts(seed=2), CFG, eval_tokens=0).features
    inside = ((b.score >= a.score_ci[0] - 1e-9) & (b.score <= a.score_ci[1] + 1e-9)).float().mean()
    assert inside > 0.6


def test_different_widths_and_tokenizers_are_refused(base, tmp_path):
    import transformers as tf

    cfg = tiny_config("llama")
    cfg.hidden_size = 48
    wide = LoadedModel(tf.AutoModelForCausalLM.from_config(cfg).eval(), base.tokenizer, "wide", "llama", True)
    with pytest.raises(DiffRefused, match="different widths at blocks.0.hook_resid_pre"):
        run_diff(make_sae(), base, wide, texts(), CFG, eval_tokens=0)
    other = tf.PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(base.tokenizer.backend_tokenizer))
    other.add_tokens(["<extra>"])
    odd = LoadedModel(base.model, other, "other-tokenizer", "llama", True)
    with pytest.raises(DiffRefused, match="different tokenizers"):
        run_diff(make_sae(), base, odd, texts(), CFG, eval_tokens=0)


def test_concept_files(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"name": "unsafe", "features": [3, {"id": 9}]}))
    (tmp_path / "plain.txt").write_text("1, 2\n3")
    assert read_concept(tmp_path / "c.json") == Concept("unsafe", [3, 9])
    assert read_concept(tmp_path / "plain.txt") == Concept("plain", [1, 2, 3])
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x", "features": []}))
    with pytest.raises(ValueError, match="non-empty 'features'"):
        read_concept(tmp_path / "bad.json")


def test_report_round_trip_escapes_text(base, tmp_path):
    r = run_diff(make_sae(), base, planted(base), texts(), CFG, [Concept("<b>x</b>", [FEATURE])], eval_tokens=0)
    html = write_diff(tmp_path, r, "saelab diff …", base.tokenizer, labels={FEATURE: "<script>alert(1)</script>"})
    page = html.read_text()
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "&lt;b&gt;x" in page
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["rising"][0]["feature"] == FEATURE
    st = load_stats(tmp_path / "texts.safetensors")
    assert torch.equal(st.fire, r.stats.fire)


@pytest.fixture
def cli_models(tmp_path, base):
    """Base folder, planted folder, SAE folder and a corpus on disk, as a user would have them."""
    base_dir = tmp_path / "base"
    base.model.save_pretrained(str(base_dir))
    base.tokenizer.save_pretrained(str(base_dir))
    corpus = write_code_corpus(tmp_path, n_docs=300)
    common = Counter(base.tokenizer(open(corpus).read())["input_ids"]).most_common(1)[0][0]
    tuned_dir = tmp_path / "tuned"
    tuned = planted(base, strength=1.0, token=common)   # a token every text has
    tuned.model.save_pretrained(str(tuned_dir))
    base.tokenizer.save_pretrained(str(tuned_dir))
    sae = make_sae()
    save_sae(sae, tmp_path / "sae", **sae.provenance)
    return base_dir, tuned_dir, tmp_path / "sae", corpus


def test_cli_gate_fails_the_build_with_one_line(cli_models, tmp_path, capsys):
    base_dir, tuned_dir, sae_dir, corpus = cli_models
    args = ["diff", str(base_dir), str(tuned_dir), "--sae", str(sae_dir), "--corpus", corpus, "--tokens", "2048",
            "--resamples", "200", "--eval-tokens", "0"]
    assert main(args + ["--out", str(tmp_path / "ok"), "--gate-features", "1,2", "--max-rise", "2"]) == 0
    code = main(args + ["--out", str(tmp_path / "d"), "--gate-features", str(FEATURE), "--max-rise", "1.5"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("saelab:")]   # not progress bars
    assert code == 1
    assert len(err) == 1 and "gate failed" in err[0] and "rose" in err[0] and f"features {FEATURE}" in err[0]
    assert (tmp_path / "d" / "report.html").is_file()


@pytest.mark.skipif(not peft_available(), reason="peft is not installed (pip install 'saelab[finetune]')")
def test_adapter_folder_is_merged_onto_the_base(cli_models, tmp_path):
    import peft

    base_dir = cli_models[0]
    base = load_model(str(base_dir))
    torch.manual_seed(0)
    tuned = peft.get_peft_model(copy.deepcopy(base.model), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                           init_lora_weights=False))
    tuned.save_pretrained(str(tmp_path / "adapter"))
    ids = texts(2, 16)
    want = tuned(input_ids=ids).logits
    b, t = load_pair(str(base_dir), str(tmp_path / "adapter"))
    torch.testing.assert_close(t.model(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(b.model(input_ids=ids).logits, want)   # the base itself is untouched
    assert with_adapter(b, tmp_path / "adapter").name.endswith("adapter")


def test_pickled_or_missing_adapters_are_refused(base, tmp_path):
    from saelab.errors import InvalidModel

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(InvalidModel, match="never loads pickled"):
        with_adapter(base, tmp_path)
    with pytest.raises(InvalidModel, match="not a PEFT adapter folder"):
        with_adapter(base, tmp_path / "nowhere")


def test_a_feature_dead_in_training_is_not_divided_by_zero():
    from saelab.diff import scales

    sae = make_sae()
    sae.provenance["feature_max_act"] = [0.0] + [2.0] * (D_SAE - 1)
    assert scales(sae)[0] == 2.0 and scales(sae)[1] == 2.0
