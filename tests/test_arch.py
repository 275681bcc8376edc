"""The architecture registry (saelab.arch): lookups, FLOPs, and Matryoshka-BatchTopK end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from factories import make_synthetic_store
from saelab import arch
from saelab.arch.matryoshka import default_widths
from saelab.arch.rules import batch_topk_dense
from saelab.formats import load_sae
from saelab.sae import SAE, SAEConfig
from saelab.scaling import training_flops
from saelab.train import TrainConfig, train
from saelab.trainer import heldout_stats

MATRYOSHKA = "matryoshka_batchtopk"


def test_registry_lists_and_finds_every_architecture():
    assert arch.names() == ("relu", "topk", "batchtopk", "jumprelu", MATRYOSHKA)
    assert arch.get("topk").needs_k and not arch.get("relu").needs_k
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated'; choose one of relu, topk"):
        arch.get("gated")
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        SAE(SAEConfig(d_in=4, d_sae=8, architecture="gated"))


@pytest.mark.parametrize("saved,ours", [("standard", "relu"), ("topk", "topk"), ("jumprelu", "jumprelu"),
                                        ("batchtopk", "jumprelu"), (MATRYOSHKA, "jumprelu"), ("gated", None)])
def test_saelens_names_load_as(saved, ours):
    rule = arch.by_saved_name(saved)
    assert (rule.name if rule else None) == ours


def test_flops_are_each_architectures_count():
    d_in, d_sae, k, k_aux, tokens = 16, 64, 4, 8, 1000
    assert training_flops("topk", d_in, d_sae, k, k_aux, tokens) == (2 * 16 * 64 + 6 * 16 * 4 + 4 * 16 * 8) * 1000
    assert training_flops("batchtopk", d_in, d_sae, k, k_aux, tokens) == training_flops("topk", d_in, d_sae, k,
                                                                                        k_aux, tokens)
    assert training_flops("relu", d_in, d_sae, None, k_aux, tokens) == 12 * 16 * 64 * 1000
    assert training_flops(MATRYOSHKA, d_in, d_sae, k, k_aux, tokens) == (12 * 16 * 64 + 4 * 16 * 8) * 1000


def test_defaults_come_from_the_class():
    for name, lr in [("relu", 1e-4), ("topk", 2e-3), ("batchtopk", 2e-3), ("jumprelu", 2e-4), (MATRYOSHKA, 2e-3)]:
        cfg = TrainConfig(architecture=name, d_sae=64, k=4, tokens=4096, batch_size=256).resolved(16)
        assert cfg.lr == lr and (cfg.k == 4) == arch.get(name).needs_k


# -- Matryoshka-BatchTopK ---------------------------------------------------------------------------

def test_matryoshka_widths_resolve_and_are_checked():
    def widths(w, d_sae=64):
        return TrainConfig(architecture=MATRYOSHKA, d_sae=d_sae, k=1, matryoshka_widths=w, tokens=4096,
                           batch_size=256).resolved(16).matryoshka_widths
    assert widths(None) == [8, 16, 32, 64] == default_widths(64)
    assert widths(None, d_sae=3) == [1, 3]
    assert widths([10, 20]) == [10, 20, 64]
    for bad in ([20, 10], [0, 8], [8, 100], [8, 8]):
        with pytest.raises(ValueError, match="matryoshka_widths must increase strictly"):
            widths(bad)


def _hand_sae() -> SAE:
    """test_sae's hand-made SAE (d_in 2, d_sae 4): with k=1, batch top-2 keeps z = [[0,0,0,0],[0,2.5,3,0]]."""
    sae = SAE(SAEConfig(d_in=2, d_sae=4, architecture=MATRYOSHKA, k=1)).train()
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 1.0, 1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5, 0.0, 0.5]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
    return sae


def _loss(sae, x, widths, dead):
    cfg = SimpleNamespace(k=sae.cfg.k, matryoshka_widths=widths, k_aux=2, auxk_alpha=0.5)
    params = {n: p for n, p in sae.named_parameters() if p.requires_grad}
    return arch.get(MATRYOSHKA).loss(sae, params, x, cfg, 0, dead)


def test_matryoshka_loss_sums_each_prefix_reconstruction_by_hand():
    sae = _hand_sae()
    x = torch.tensor([[1.5, 1.5], [0.5, 2.5]])
    out = _loss(sae, x, [2, 4], torch.zeros(4, dtype=torch.bool))
    # prefix of 2: row 0 x̂ = b_dec, err (1, 2) → 5; row 1 x̂ = b_dec + 2.5·e₂ = (0.5, 2), err (0, .5) → 0.25
    # all 4: row 0 → 5; row 1 x̂ = (0.5, 2) + 3·(1, 1) = (3.5, 5), err (3, 2.5) → 15.25
    assert float(out.err_sq) == pytest.approx(20.25)
    assert float(out.loss) == pytest.approx((5.25 + 20.25) / 2)
    assert float(out.active) == 2 and float(out.min_kept) == 2.5 and out.fired.tolist() == [0, 1, 1, 0]


def test_matryoshka_gradients_equal_a_from_scratch_reference():
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(d_in=6, d_sae=12, architecture=MATRYOSHKA, k=3)).train()
    sae.reset_parameters(seed=1)
    x = torch.randn(10, 6, generator=g)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[5, 9, 11]] = True
    out = _loss(sae, x, [3, 7, 12], dead)
    ours = {n: getattr(sae, n).grad.clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    sae.zero_grad()
    pre = sae.pre_acts(x)
    z = batch_topk_dense(pre, 3)
    loss = sum((z[:, :w] @ sae.W_dec[:w] + sae.b_dec - x).pow(2).sum(-1).mean() for w in (3, 7, 12))
    e = (x - z @ sae.W_dec - sae.b_dec).detach()
    z_aux = torch.zeros_like(pre)
    vals, idx = pre.masked_fill(~dead, float("-inf")).topk(2, dim=-1)
    z_aux = z_aux.scatter(-1, idx, torch.relu(vals))
    loss = loss + 0.5 * (z_aux @ sae.W_dec - e).pow(2).sum(-1).mean()
    loss.backward()
    assert float(out.loss) == pytest.approx(float(loss.detach()), rel=1e-5)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, getattr(sae, name).grad, msg=name)


def _config(architecture: str) -> TrainConfig:
    return TrainConfig(architecture=architecture, d_sae=96, k=4, batch_size=256, tokens=256 * 200, lr=3e-3,
                       checkpoint_every=0, eval_tokens=4096, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store = make_synthetic_store(tmp_path_factory.mktemp("store") / "acts")
    out = tmp_path_factory.mktemp("run") / "sae"
    return store, out, train(store, _config(MATRYOSHKA), out=out, progress=False)


def _prefix_fvu(sae: SAE, x: torch.Tensor, width: int) -> float:
    """FVU of x̂ from the first ``width`` latents alone."""
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = z[:, :width] @ sae.W_dec[:width] + sae.b_dec
    return float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_the_first_prefix_reconstructs_on_its_own(trained, tmp_path):
    """What the nested losses buy: the first 12 of 96 latents explain more than BatchTopK's first 12."""
    store, _, matryoshka = trained
    plain = train(store, _config("batchtopk"), out=tmp_path / "plain", progress=False)
    x = store.read_shard(3)["acts"][-1024:]
    assert _prefix_fvu(matryoshka, x, 12) < 0.8 * _prefix_fvu(plain, x, 12)


def test_matryoshka_trains_saves_in_saelens_format_and_loads_back(trained):
    store, out, sae = trained
    held = sae.provenance["held_out"]
    assert held["fvu"] < 0.45, held                       # random init: FVU ≈ 1 or more
    cfg = json.loads((out / "cfg.json").read_text())
    # SAELens saves a trained Matryoshka-BatchTopK as a JumpReLU SAE (its docstring), with these v6 keys
    assert cfg["architecture"] == "jumprelu"
    assert set(cfg) == {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                        "normalize_activations", "reshape_activations", "metadata"}
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    loaded = load_sae(out)
    assert loaded.cfg.architecture == "jumprelu"
    assert loaded.provenance["trained_architecture"] == MATRYOSHKA
    assert loaded.provenance["train_config"]["matryoshka_widths"] == [12, 24, 48, 96]
    theta = loaded.threshold.detach()
    assert float(theta.min()) == float(theta.max()) > 0   # one global θ, learned
    x = store.read_shard(0)["acts"][:64]
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    # evaluating the loaded SAE on the held-out split gives what training recorded
    batches = store.batches(256, split="heldout", heldout_fraction=0.05, shuffle=False, epochs=1)
    try:
        again = heldout_stats(loaded, batches, 4096)
    finally:
        batches.close()
    assert again["fvu"] == pytest.approx(held["fvu"], rel=1e-4) and again["l0"] == pytest.approx(held["l0"])


def test_matryoshka_folder_loads_in_saelens(trained):
    sae_lens = pytest.importorskip("sae_lens")
    _, out, sae = trained
    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    x = torch.randn(8, sae.d_in)
    torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)


def test_cli_trains_matryoshka_with_its_widths(trained, tmp_path, capsys):
    from saelab.cli import main

    store = trained[0]
    assert main(["train", "--acts", str(store.path), "--arch", MATRYOSHKA, "--latents", "64", "--k", "4",
                 "--matryoshka-widths", "16,32", "--tokens", str(256 * 20), "--batch-size", "256",
                 "--out", str(tmp_path / "sae"), "--json"]) == 0
    sae = load_sae(tmp_path / "sae")
    assert sae.provenance["trained_architecture"] == MATRYOSHKA
    assert sae.provenance["train_config"]["matryoshka_widths"] == [16, 32, 64]
    capsys.readouterr()
    assert main(["train", "--acts", str(store.path), "--arch", MATRYOSHKA, "--latents", "64", "--k", "4",
                 "--matryoshka-widths", "16,128", "--tokens", "512", "--batch-size", "256",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "matryoshka_widths must increase strictly within 1..d_sae (64)" in capsys.readouterr().err
