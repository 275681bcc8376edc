import importlib
import json
import math

import pytest
import torch

from saelab import evaluate
from saelab.corpus import CorpusSpec, is_validation
from saelab.eval_report import compare
from saelab.formats import save_sae
from saelab.hooks import HookError, intervene, run_to_hooks
from saelab.models import load_model
from saelab.sae import SAE, SAEConfig

ev_mod = importlib.import_module("saelab.evaluate")  # the package re-exports the function under the same name
HOOK = "blocks.1.hook_resid_post"


def _ids(n=8, seq=32, seed=0):
    """Random token ids with BOS (id 0) at the start of each sequence and at a few places inside."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (n, seq), generator=g)
    ids[:, 0] = 0
    ids[::3, seq // 2] = 0
    return ids


def _perfect(d_in, scale=1.0):
    """relu SAE with W_enc = [I, −I], W_dec = [I; −I]: relu(x) − relu(−x) = x exactly."""
    sae = SAE(SAEConfig(d_in, 2 * d_in, "relu"))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0) * scale)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _zero(d_in, d_sae=64):
    sae = SAE(SAEConfig(d_in, d_sae, "relu"))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    return sae


def _topk(d_in, d_sae=96, k=4, seed=0):
    sae = SAE(SAEConfig(d_in, d_sae, "topk", k=k))
    sae.reset_parameters(seed=seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return sae


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]))


def _run(sae, lm, ids=None, **kw):
    kw.setdefault("hook", HOOK)
    ids = _ids() if ids is None else ids
    return evaluate(sae, lm, ids, tokens=kw.pop("tokens", ids.numel()), progress=False, **kw)


@pytest.mark.parametrize("family,hook", [("llama", HOOK), ("gpt2", "blocks.0.mlp.hook_post")])
def test_perfect_sae_gives_fvu_0_ce_recovered_1_kl_0(tiny_model_dirs, family, hook):
    lm = load_model(str(tiny_model_dirs[family]))
    d_in = 128 if hook.endswith("mlp.hook_post") else 32
    r = _run(_perfect(d_in), lm, hook=hook, ablations=("zero", "mean"))
    assert r.reconstruction.fvu == pytest.approx(0, abs=1e-12)
    assert r.reconstruction.mse == pytest.approx(0, abs=1e-12)
    assert r.reconstruction.cosine == pytest.approx(1, abs=1e-6)
    assert r.reconstruction.relative_norm == pytest.approx(1, abs=1e-6)
    assert r.sparsity.l0 == pytest.approx(d_in, abs=0.5)  # one of each ±pair fires per dimension
    d = r.downstream
    assert abs(d.ce_zero_ablated - d.ce_clean) > 1e-4  # else "recovered" would be meaningless
    assert d.ce_spliced == pytest.approx(d.ce_clean, abs=1e-6)
    assert d.ce_recovered_zero == pytest.approx(1, abs=1e-3)
    assert d.ce_recovered_mean == pytest.approx(1, abs=1e-3)
    assert d.kl_spliced == pytest.approx(0, abs=1e-9)
    assert r.self_check.ok and r.self_check.relative_diff < 1e-5
    assert r.tokens == 8 * 32 and d.predictions == 8 * 31


def test_zero_sae_matches_zero_ablation(llama):
    ids = _ids()
    r = _run(_zero(32), llama, ids)
    d = r.downstream
    assert d.ce_spliced == d.ce_zero_ablated  # x_hat = b_dec = 0: the very same forward
    assert d.ce_recovered_zero == 0
    assert d.kl_spliced > 0 and d.delta_loss == pytest.approx(d.ce_zero_ablated - d.ce_clean)
    assert r.sparsity.l0 == 0 and r.sparsity.dead == 64 and r.sparsity.dead_fraction == 1
    assert r.reconstruction.cosine == 0 and r.reconstruction.relative_norm == 0
    x = run_to_hooks(llama.model, ids, [HOOK])[HOOK].reshape(-1, 32).double()
    fvu = x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert r.reconstruction.fvu == pytest.approx(fvu.item(), rel=1e-6)


def test_metrics_match_an_independent_computation(llama, monkeypatch):
    ids, sae = _ids(), _topk(32)
    r = _run(sae, llama, ids, batch_size=3, ablations=("zero", "mean"))
    x = run_to_hooks(llama.model, ids, [HOOK])[HOOK].reshape(-1, 32)
    out = sae(x)
    err = (x - out.x_hat).double().pow(2)
    assert r.reconstruction.mse == pytest.approx(err.mean().item(), rel=1e-5)
    assert r.reconstruction.fvu == pytest.approx((err.sum() / (x - x.mean(0)).double().pow(2).sum()).item(), rel=1e-5)
    assert r.reconstruction.cosine == pytest.approx(torch.cosine_similarity(x, out.x_hat, dim=-1).mean().item(),
                                                    rel=1e-5)
    assert r.reconstruction.relative_norm == pytest.approx((out.x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(),
                                                           rel=1e-5)
    fired = (out.z != 0).float()
    assert r.sparsity.l0 == pytest.approx(fired.sum(1).mean().item())
    torch.testing.assert_close(r.feature_density, fired.mean(0))
    assert r.sparsity.dead == int((fired.sum(0) == 0).sum()) and r.sparsity.dense == int((fired.mean(0) > 0.1).sum())
    assert sum(b["count"] for b in r.sparsity.log10_density_histogram) == 96 - r.sparsity.dead
    with torch.no_grad():
        ce_clean = llama.model(input_ids=ids, labels=ids).loss.item()  # HF shifts: every position but the last
        with intervene(llama, {HOOK: lambda a: sae(a).x_hat}):
            ce_spliced = llama.model(input_ids=ids, labels=ids).loss.item()
    assert r.downstream.ce_clean == pytest.approx(ce_clean, rel=1e-5)
    assert r.downstream.ce_spliced == pytest.approx(ce_spliced, rel=1e-5)
    assert r.downstream.kl_spliced > 0
    # streaming: batch size and SAE chunking change nothing but float summation order
    monkeypatch.setattr(ev_mod, "SAE_CHUNK_ELEMENTS", 96 * 5)  # 5 rows at a time through the SAE
    r8 = _run(sae, llama, ids, batch_size=8, ablations=("zero", "mean"))
    assert r8.sparsity == r.sparsity
    assert r8.reconstruction.fvu == pytest.approx(r.reconstruction.fvu, rel=1e-6)
    assert r8.downstream.ce_mean_ablated == pytest.approx(r.downstream.ce_mean_ablated, rel=1e-6)


def test_error_term_splice_equals_clean(llama):
    r = _run(_topk(32), llama)
    assert r.self_check.ok and r.self_check.output == "logits"
    assert r.self_check.relative_diff <= 1e-6 and r.self_check.kl == pytest.approx(0, abs=1e-7)
    assert not any("SELF-CHECK" in w for w in r.warnings)


def test_self_check_flags_a_splice_at_the_wrong_place(llama, monkeypatch):
    real = ev_mod.intervene
    monkeypatch.setattr(ev_mod, "intervene", lambda model, edits: real(
        model, {"blocks.0.hook_resid_post": fn for fn in edits.values()}))
    r = _run(_topk(32), llama)
    assert not r.self_check.ok and r.self_check.relative_diff > r.self_check.tolerance
    assert any(w.startswith("SELF-CHECK FAILED") for w in r.warnings)
    assert "FAILED" in compare([r])


def test_compare_two_saes_side_by_side(llama):
    a = _run(_perfect(32), llama, name="perfect")
    b = _run(_zero(32), llama, name="zero")
    table = compare([a, b])
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "perfect", "zero"]
    fvu = next(line for line in lines if line.startswith("FVU")).split()
    assert fvu[1] == "0.0000" and fvu[2] == f"{b.reconstruction.fvu:.4f}"
    recovered = next(line for line in lines if line.startswith("CE recovered (zero")).split()
    assert recovered[-2:] == ["1.0000", "0.0000"]
    dead = next(line for line in lines if line.startswith("dead")).split()
    assert dead[-4:] == ["0", "(0.0%)", "64", "(100.0%)"]
    with pytest.raises(ValueError, match="at least one"):
        compare([])


def test_mismatched_d_in_names_both(llama):
    with pytest.raises(ValueError, match=r"d_in=16 .*blocks\.1\.hook_resid_post.* width 32"):
        _run(_perfect(16), llama)


def test_hook_missing_from_model_names_hook_and_model(llama):
    sae = _perfect(32)
    sae.provenance = {"hook_name": "blocks.7.hook_resid_post", "model_name": "some/other-model"}
    with pytest.raises(HookError, match=r"blocks\.7\.hook_resid_post.*llama.*some/other-model"):
        evaluate(sae, llama, _ids(), progress=False)


def test_sae_without_a_hook_asks_for_one(llama):
    with pytest.raises(ValueError, match="pass the hook"):
        evaluate(_perfect(32), llama, _ids(), progress=False)


def test_another_hook_than_recorded_is_a_warning(llama):
    sae = _perfect(32)
    sae.cfg.metadata["hook_name"] = "blocks.0.hook_resid_post"
    r = _run(sae, llama)
    assert any("trained on 'blocks.0.hook_resid_post'" in w for w in r.warnings)


def test_encoder_without_lm_head_reports_the_rest(tiny_model_dirs):
    bert = load_model(str(tiny_model_dirs["bert"]))
    r = _run(_topk(32), bert)
    assert r.downstream is None
    assert {"ce_clean", "ce_spliced", "ce_recovered", "kl"} <= set(r.unavailable)
    assert "no LM head" in r.unavailable["kl"]
    assert 0 < r.reconstruction.fvu and r.sparsity.l0 == pytest.approx(4)
    assert r.self_check.ok and r.self_check.output == "last_hidden_state" and r.self_check.kl is None
    table = compare([r])
    assert "unavailable: ce_clean" in table and "CE clean" in table and "n/a" in table
    assert json.loads(json.dumps(r.to_json()))["downstream"] is None


def test_bos_positions_excluded_when_trained_without(llama):
    ids = _ids()
    n_bos = int((ids == 0).sum())
    sae = _topk(32)
    assert _run(sae, llama, ids).reconstruction.tokens == ids.numel()
    sae.provenance = {"train_config": {"exclude_bos": True}}
    r = _run(sae, llama, ids)
    assert r.exclude_bos and r.reconstruction.tokens == ids.numel() - n_bos
    x = run_to_hooks(llama.model, ids, [HOOK])[HOOK][ids != 0]  # (n_kept, 32)
    assert r.reconstruction.mse == pytest.approx((x - sae(x).x_hat).pow(2).mean().item(), rel=1e-5)
    assert r.self_check.ok


def test_a_batch_of_only_excluded_bos_positions_is_fine(llama):
    ids = _ids(n=3)
    ids[1] = 0  # the whole second sequence is BOS
    r = _run(_topk(32), llama, ids, batch_size=1, exclude_bos=True)
    assert r.reconstruction.tokens == int((ids != 0).sum()) and math.isfinite(r.reconstruction.fvu)


def test_nan_activations_are_refused(tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs["llama"]))
    with torch.no_grad():
        lm.model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_post.*NaN or inf"):
        _run(_topk(32), lm)


@pytest.mark.parametrize("prov,metadata,expected", [
    ({}, {}, False),
    ({"exclude_bos": True}, {}, True),
    ({"train_config": {"exclude_bos": False}}, {}, False),
    ({"bos": {"token_id": 0, "excluded": True}}, {}, True),
    ({}, {"exclude_special_tokens": True}, True),
])
def test_trained_without_bos_reads_every_place_it_is_recorded(prov, metadata, expected):
    sae = _zero(4, 4)
    sae.provenance, sae.cfg.metadata = prov, metadata
    assert ev_mod.trained_without_bos(sae) is expected


def _corpus_dir(tmp_path, n_files=6):
    """Files whose names put them in the validation split (as is_validation decides)."""
    root = tmp_path / "corpus"
    root.mkdir()
    names = (f"m{i}.py" for i in range(10_000))
    for j, name in enumerate([n for n in names if is_validation(n)][:n_files]):
        (root / name).write_text("".join(f"def f{j}_{i}(x):\n    return x + {i * j}\n" for i in range(40)))
    return root


def test_defaults_come_from_provenance_and_are_deterministic(tiny_model_dirs, tmp_path):
    root = _corpus_dir(tmp_path)
    sae = _topk(32)
    sae.provenance = {"model_name": str(tiny_model_dirs["llama"]), "hook_name": HOOK, "context_size": 24,
                      "corpus": {"source": str(root), "split": "train", "seed": 3}}
    r = evaluate(sae, tokens=100, progress=False)
    assert r.model == str(tiny_model_dirs["llama"]) and r.hook == HOOK and r.context == 24
    assert r.corpus == {"source": str(root), "split": "validation", "seed": 0}
    assert r.tokens == 5 * 24  # rounded up to whole sequences
    again = evaluate(sae, tokens=100, progress=False)
    assert again.to_json() == r.to_json()
    other = evaluate(sae, tokens=100, seed=1, progress=False)  # another document order
    assert other.downstream.ce_clean != r.downstream.ce_clean


def test_context_is_capped_at_the_model_positions_and_short_corpora_fail(tiny_model_dirs, llama, tmp_path):
    root = _corpus_dir(tmp_path, n_files=1)
    r = evaluate(_topk(32), llama, CorpusSpec(str(root), "all"), hook=HOOK, tokens=10**6, progress=False)
    assert r.context == 128 and any("128 positions" in w for w in r.warnings)
    assert any("corpus gave only" in w for w in r.warnings)
    (tmp_path / "short.txt").write_text("x = 1\n")
    with pytest.raises(ValueError, match="fewer than 128 tokens"):
        evaluate(_topk(32), llama, CorpusSpec(str(tmp_path / "short.txt"), "all"), hook=HOOK, progress=False)


def test_report_json_is_standard_and_saved_atomically(llama, tmp_path):
    r = _run(_perfect(32), llama)
    r.reconstruction.fvu = float("nan")  # as when the activations had no variance
    path = r.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    data = json.loads(path.read_text())
    assert data["reconstruction"]["fvu"] is None and "fvu" in data["definitions"]
    assert data["sparsity"]["l0_quantiles"]["p50"] == 32 and "feature_density" not in data
    assert math.isclose(data["downstream"]["ce_recovered_zero"], 1, abs_tol=1e-3)


def test_cli_evaluates_several_sae_folders(tiny_model_dirs, tmp_path, capsys):
    pytest.importorskip("saelab.formats")
    from saelab.cli import main

    root = _corpus_dir(tmp_path)
    prov = {"model_name": str(tiny_model_dirs["llama"]), "hook_name": HOOK, "context_size": 32,
            "corpus": {"source": str(root), "split": "train", "seed": 0}}
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder, sae in zip(folders, [_perfect(32), _topk(32)]):
        save_sae(sae, folder, **prov)
    assert main(["eval", str(folders[0]), str(folders[1]), "--tokens", "128"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["metric", str(folders[0]), str(folders[1])]
    saved = [json.loads((f / "eval.json").read_text()) for f in folders]
    assert saved[0]["reconstruction"]["fvu"] == 0 and saved[1]["reconstruction"]["fvu"] > 0
    assert main(["eval", str(folders[1]), "--tokens", "64", "--json", "--no-save"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 64
    save_sae(_zero(32), tmp_path / "c", hook_name=HOOK)
    assert main(["eval", str(tmp_path / "c")]) == 2
    assert "does not record its model" in capsys.readouterr().err


def test_config_is_checked_first_and_recorded_whole(llama):
    from saelab.stage_config import EvalConfig

    with pytest.raises(ValueError, match="ablations"):
        EvalConfig(ablations=("mean",))
    with pytest.raises(TypeError, match="unknown options"):
        _run(_topk(32), llama, tokenz=5)
    r = _run(_topk(32), llama, config=EvalConfig(batch_size=3), seed=4)
    assert r.config["batch_size"] == 3 and r.config["seed"] == 4 and list(r.to_json()["config"]["ablations"]) == ["zero"]
