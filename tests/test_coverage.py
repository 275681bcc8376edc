"""Concept coverage: the best single feature per concept and size, scored on held-out texts."""

import random

import pytest
import torch

from saelab.concept import split
from saelab.coverage import CoverageConfig, best_feature, concept_coverage, read_concepts

SHIPPED = "saelab/prompts/concepts-builtin"


def planted(n_pos: int = 12, n_neg: int = 12, d: int = 10, seed: int = 0) -> torch.Tensor:
    """Max activations ``[texts, d]``: feature 3 is 1 on positives and 0 on negatives; the rest noise in [0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(n_pos + n_neg, d, generator=g) * 0.5
    S[:, 3] = 0.0
    S[:n_pos, 3] = 1.0
    return S


def test_best_feature_is_the_planted_one_with_held_out_auroc_one():
    got = best_feature(planted(), 12, CoverageConfig())
    assert got.feature == 3 and got.train_auroc == 1.0 and got.heldout_auroc == 1.0


def test_held_out_auroc_is_measured_on_the_held_out_texts_only():
    """Feature 3 separates the training texts perfectly but is reversed on the held-out ones."""
    S = planted()
    cfg = CoverageConfig(seed=4)
    rng = random.Random(cfg.seed)
    (_, ho_p), (_, ho_n) = split(12, cfg.holdout, rng), split(12, cfg.holdout, rng)
    S[ho_p, 3], S[[12 + i for i in ho_n], 3] = 0.0, 1.0
    got = best_feature(S, 12, cfg)
    assert got.feature == 3 and got.train_auroc == 1.0 and got.heldout_auroc == 0.0


def test_no_feature_higher_on_positives_means_chance():
    S = planted()
    S[:12] = 0.0
    assert best_feature(S, 12, CoverageConfig()) == (None, 0.5, 0.5)


def test_the_shipped_builtin_concepts_read(tmp_path):
    concepts = read_concepts(SHIPPED)
    assert len(concepts) >= 8 and all(len(p) >= 12 and len(n) >= 12 for p, n in concepts.values())
    assert any("\n" in t for t in concepts["docstrings"][0])       # .jsonl texts span lines
    (tmp_path / "a.pos.txt").write_text("x\ny\nz\nw\n")
    with pytest.raises(FileNotFoundError, match="no negative texts"):
        read_concepts(tmp_path)
    (tmp_path / "a.neg.txt").write_text("x\ny\n")
    with pytest.raises(ValueError, match="at least 4 positive and 4 negative"):
        read_concepts(tmp_path)
    with pytest.raises(ValueError, match="no concepts"):
        read_concepts(_empty(tmp_path))


def _empty(root):
    folder = root / "empty"
    folder.mkdir()
    return folder


def test_coverage_end_to_end_on_a_tiny_model(web_run_dir):
    """Two sizes of the web run's SAE on its tiny model: the document's shape, and coverage as the share of
    concepts whose best held-out AUROC reaches the threshold (recomputed here from the per-concept rows)."""
    from saelab.formats import load_sae
    from saelab.models import load_model
    from saelab.provenance import Provenance

    sae = load_sae(web_run_dir / "sae").eval()
    lm = load_model(Provenance.of(sae).model_name)
    concepts = {"calls": (["os.system(cmd)", "run(cmd)", "print(html, end)", "self.f(x)"],
                          ["x = 1", "return x", "end = 2", "class A:"]),
                "defs": (["def f(x):", "def run(cmd):", "class A:", "def g():"],
                         ["os.system(cmd)", "x + 1", "html", "return cmd"])}
    cfg = CoverageConfig(threshold=0.75)
    doc = concept_coverage(lm, [sae, sae], ["a", "b"], concepts, cfg)
    assert doc["sizes"] == ["a", "b"] and set(doc["concepts"]) == {"calls", "defs"}
    for t in range(2):
        covered = sum(doc["concepts"][c][t]["heldout_auroc"] >= 0.75 for c in concepts) / 2
        assert doc["covered"][t] == covered
    same = [{k: v for k, v in row.items() if k != "size"} for row in doc["concepts"]["calls"]]
    assert same[0] == same[1]                                             # the same SAE twice: the same answer


def test_one_pass_for_all_saes_equals_one_pass_each(web_run_dir):
    """texts_max_acts (one forward per text for every SAE) gives text_max_acts of each SAE."""
    from saelab.concept import text_max_acts
    from saelab.coverage import texts_max_acts
    from saelab.formats import load_sae
    from saelab.models import load_model
    from saelab.provenance import Provenance
    from saelab.steer import sae_hook_name

    sae = load_sae(web_run_dir / "sae").eval()
    lm = load_model(Provenance.of(sae).model_name)
    texts = ["os.system(cmd)", "def f(x):\n    return x", "print(html, end)"]
    both = texts_max_acts([sae, sae], lm, texts)
    alone = text_max_acts(sae, lm, texts, sae_hook_name(sae))
    assert len(both) == 2 and all(torch.equal(S, alone) for S in both)
