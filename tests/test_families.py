"""Feature families: hand-built dictionaries with a planted split, persist, new and vanished features.

Activations live in R^16 with orthonormal ground-truth directions e_0.. e_15. Each token carries one of
five concepts with a random magnitude in [1, 2], plus a little noise:

    A: e_0    B: e_1    Q: e_2    V: e_3    N: e_4

The small SAE (4 latents) has P = (e_0 + e_1)/√2, which fires on the union of A and B tokens, Q = e_2,
V = e_3 and a dead latent e_5. The large SAE (6 latents, shuffled) has A = e_0 and B = e_1 (P's children),
Q' = e_2 (Q persists), N = e_4 (new: nothing in the small SAE fires on N tokens) and two dead latents;
V has no counterpart (vanishes). Encoders are the decoders' transposes (tied), so each SAE is exact.
"""

import json

import pytest
import torch
from factories import make_synthetic_store

from saelab.cli import main
from saelab.families import FamilyConfig, encode_sample, families, families_json, match
from saelab.family_io import feature_family, read_families, run_families
from saelab.formats import save_sae
from saelab.sae import SAE, SAEConfig

D_IN = 16
E = torch.eye(D_IN)
SMALL_DIRS = [(E[0] + E[1]) / 2 ** 0.5, E[2], E[3], E[5]]      # P, Q, V, dead
LARGE_DIRS = [E[6], E[2], E[1], E[4], E[0], E[7]]              # dead, Q', B, N, A, dead
HUGE_DIRS = [E[0], E[1], E[2], E[4], E[8], E[9], E[10], E[11]]  # A, B, Q', N persist; 4 dead (new)


def tokens(n: int = 4000, seed: int = 0, noise: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    concept = torch.tensor([0, 1, 2, 3, 4])[torch.randint(0, 5, (n,), generator=g)]
    mag = 1 + torch.rand(n, generator=g)
    return mag[:, None] * E[concept] + noise * torch.randn(n, D_IN, generator=g)   # (n, D_IN)


def hand_sae(dirs, arch: str = "topk") -> SAE:
    W = torch.stack(dirs)                                                          # (d_sae, D_IN)
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=len(dirs), architecture=arch, k=1 if arch == "topk" else None))
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_enc.fill_(-0.2 if arch == "relu" else 0.0)      # relu: ignore the noise
        sae.threshold.fill_(0.2)                              # jumprelu: the same
        sae.b_dec.zero_()
    return sae.eval()


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_planted_split_persist_new_and_vanished_are_recovered(arch):
    small, large = hand_sae(SMALL_DIRS, arch), hand_sae(LARGE_DIRS, arch)
    x = tokens()
    cfg = FamilyConfig(block=3)                                # blocks smaller than d_S: the running argmax is used
    step = match(small, encode_sample(small, x), large, encode_sample(large, x), cfg)
    assert step.relation_small == ["split", "persist", "vanished", "vanished"]
    assert sorted(step.children[0]) == [2, 4] and step.children[1] == [1]
    assert step.relation_large == ["new", "persist", "split", "new", "split", "new"]
    assert step.parent.tolist() == [-1, 1, 0, -1, 0, -1]
    assert step.counts == {"persist": 1, "split": 1, "vanished": 2, "new": 3, "split_children": 2}
    # a two-way split of equally common halves: cos = 1/√2, ρ near it (magnitudes vary); the persisting pair ≈ 1
    assert step.cos[[2, 4]].tolist() == pytest.approx([2 ** -0.5] * 2, abs=1e-4)
    assert all(0.5 < c < 0.8 for c in step.co[[2, 4]].tolist())
    assert float(step.score[1]) > 0.95
    assert float(step.coverage[0]) > 0.95                     # A and B fire wherever P does
    if arch != "topk":                                        # (TopK's k = 1 makes e_5 fire faintly on noise)
        assert torch.isnan(step.coverage[3])                  # the dead latent never fired


def test_children_that_do_not_cover_the_parent_are_no_split():
    """P's children A and B, but only A tokens occur: coverage is full for A alone; with cover above
    what both give, P persists as its best child and the other becomes new."""
    small, large = hand_sae(SMALL_DIRS), hand_sae(LARGE_DIRS)
    x = tokens()
    strict = FamilyConfig(tau=0.3, cover=1.01)                # no set of children can cover more than everything
    step = match(small, encode_sample(small, x), large, encode_sample(large, x), strict)
    assert step.relation_small[0] == "persist" and len(step.children[0]) == 1
    assert step.relation_large.count("split") == 0 and step.counts["split"] == 0
    assert step.parent[[2, 4]].tolist().count(0) == 1         # one of A, B keeps P as parent


def test_three_sizes_chain_into_a_family_tree_and_json():
    saes = [hand_sae(SMALL_DIRS, "relu"), hand_sae(LARGE_DIRS, "relu"), hand_sae(HUGE_DIRS, "relu")]
    steps = families(saes, tokens())
    assert [steps[1].relation_small[j] for j in (1, 2, 3, 4)] == ["persist"] * 4
    members = [{"name": f"s{i}", "path": f"/x/s{i}", "d_sae": s.cfg.d_sae} for i, s in enumerate(saes)]
    doc = json.loads(json.dumps(families_json(steps, members, FamilyConfig(), {"rows": 4000})))
    assert doc["format"] == "saelab-families" and doc["version"] == 1 and doc["rule"]["tau"] == 0.45
    assert [s["counts"]["split"] for s in doc["steps"]] == [1, 0]
    # A (huge 0) ← A (large 4) ← P (small 0); N (huge 3) ← N (large 3), new at size 1
    assert doc["roots"][2][0] == [0, 0] and doc["roots"][2][1] == [0, 0]
    assert doc["roots"][2][3] == [1, 3] and doc["roots"][2][4] == [2, 4]
    assert doc["steps"][0]["small_features"]["coverage"][3] is None       # NaN → null
    fam = feature_family(doc, 1, 4)                                       # A in the middle size
    assert fam["relation"] == "split" and fam["parent"]["id"] == 0
    assert fam["child_relation"] == "persist" and [c["id"] for c in fam["children"]] == [0]


def test_cosine_alone_does_not_match_features_that_never_fire_together():
    """Same direction, disjoint tokens: a small feature that never fires in the sample has ρ = 0, so its
    score is cos/2 = 0.5 — a parent only when tau allows it."""
    small, large = hand_sae([E[5], E[2]], "relu"), hand_sae([E[5], E[2], E[0]], "relu")
    x = tokens()
    codes = encode_sample(small, x), encode_sample(large, x)
    loose = match(small, codes[0], large, codes[1], FamilyConfig(tau=0.45))
    tight = match(small, codes[0], large, codes[1], FamilyConfig(tau=0.55))
    assert loose.parent.tolist() == [0, 1, -1] and tight.parent.tolist() == [-1, 1, -1]


# -- the command ---------------------------------------------------------------------------------------

def save_sweep(root, dirs_list, names=None, hook="blocks.0.hook_x"):
    sweep = root / "sweep"
    members = []
    for i, dirs in enumerate(dirs_list):
        name = (names or [f"latents-{len(d):05d}" for d in dirs_list])[i]
        save_sae(hand_sae(dirs), sweep / name, model_name="synthetic", hook_name=hook,
                 train_config={"heldout_fraction": 0.25})
        members.append({"name": name, "d_sae": len(dirs), "k": 1, "arch": "topk", "path": name})
    (sweep / "sweep.json").write_text(json.dumps({"format": "saelab-sweep", "version": 1, "config": {},
                                                  "members": members}))
    return sweep


def test_cli_writes_families_json_from_the_store_beside_the_sweep(tmp_path, capsys):
    make_synthetic_store(tmp_path / "acts", x=tokens(8192, seed=1), shards=2)
    sweep = save_sweep(tmp_path, [SMALL_DIRS, LARGE_DIRS])
    assert main(["families", str(sweep), "--tokens", "3000"]) == 0
    out = capsys.readouterr().out
    assert "latents-00004 → latents-00006" in out and "families.json" in out
    doc = json.loads((sweep / "families.json").read_text())
    assert doc["sample"]["split"] == "heldout" and 1024 <= doc["sample"]["rows"] <= 3000
    assert doc["steps"][0]["counts"] == {"persist": 1, "split": 1, "vanished": 2, "new": 3, "split_children": 2}
    found = read_families(sweep / "latents-00006")
    assert found is not None and found[1] == 1
    assert main(["families", str(sweep / "latents-00004"), str(sweep / "latents-00006"), "--acts",
                 str(tmp_path / "acts"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["steps"][0]["counts"] == doc["steps"][0]["counts"] and "written" not in listed
    # a sweep over latents × k (saelab.sweep's train_config key): one k at a time
    index = json.loads((sweep / "sweep.json").read_text())
    index["members"].insert(1, {**index["members"][0], "k": 2})
    (sweep / "sweep.json").write_text(json.dumps({"format": "saelab-sweep", "version": 1, "train_config": {},
                                                  "members": index["members"]}))
    assert main(["families", str(sweep)]) == 2
    assert "scans k as well" in capsys.readouterr().err
    assert main(["families", str(sweep), "--k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"][0]["counts"] == doc["steps"][0]["counts"]


def test_clear_errors(tmp_path, capsys):
    make_synthetic_store(tmp_path / "acts", x=tokens(4096, seed=1), shards=2)
    assert main(["families", str(tmp_path)]) == 2
    assert "no sweep.json" in capsys.readouterr().err
    sweep = save_sweep(tmp_path, [SMALL_DIRS, LARGE_DIRS])
    (sweep / "sweep.json").write_text("{not json")
    assert main(["families", str(sweep)]) == 2
    assert "unreadable sweep.json" in capsys.readouterr().err
    (sweep / "sweep.json").write_text(json.dumps({"format": "something-else"}))
    assert main(["families", str(sweep)]) == 2
    assert "not a saelab sweep" in capsys.readouterr().err
    one = save_sweep(tmp_path / "one", [SMALL_DIRS])
    assert main(["families", str(one), "--acts", str(tmp_path / "acts")]) == 2
    assert "at least two SAE sizes" in capsys.readouterr().err
    other = save_sweep(tmp_path / "hooks", [SMALL_DIRS], names=["other"], hook="blocks.1.hook_x") / "other"
    assert main(["families", str(sweep / "latents-00004"), str(other), "--acts", str(tmp_path / "acts")]) == 2
    assert "families compare SAEs of one hook" in capsys.readouterr().err
    with pytest.raises(ValueError, match="sizes must grow"):
        run_families([sweep / "latents-00006", sweep / "latents-00004"], acts=tmp_path / "acts")
    with pytest.raises(ValueError, match="which activation store"):
        run_families([sweep / "latents-00004", sweep / "latents-00006"])


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_best_parents_equal_a_dense_computation(arch):
    """The sparse co-firing path against the whole [d_S, d_L] matrices: cos, Pearson ρ, s, argmax."""
    from saelab.families import best_parents

    g = torch.Generator().manual_seed(3)
    small, large = (SAE(SAEConfig(d_in=D_IN, d_sae=d, architecture=arch, k=3 if arch == "topk" else None))
                    for d in (24, 40))
    for i, sae in enumerate((small, large)):
        sae.reset_parameters(seed=i)
        with torch.no_grad():
            sae.b_enc.fill_(-0.5 if arch == "relu" else 0.0)
    x = torch.randn(600, D_IN, generator=g)
    parent, cos, co, score = best_parents(small.W_dec, encode_sample(small, x), large.W_dec, encode_sample(large, x),
                                          block=7)
    zs, zl = small.encode(x).detach(), large.encode(x).detach()                       # (n, d)
    rho = torch.corrcoef(torch.cat([zs, zl], 1).T)[:24, 24:].nan_to_num(0.0)          # (24, 40)
    c = torch.nn.functional.normalize(small.W_dec.detach(), dim=1) @ torch.nn.functional.normalize(
        large.W_dec.detach(), dim=1).T
    s = (c.clamp_min(0) + rho.clamp_min(0)) / 2
    torch.testing.assert_close(score, s.max(0).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(s[parent, torch.arange(40)], s.max(0).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(cos, c[parent, torch.arange(40)], atol=1e-5, rtol=0)
    torch.testing.assert_close(co, rho[parent, torch.arange(40)], atol=1e-4, rtol=0)
