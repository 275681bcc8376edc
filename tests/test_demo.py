"""End-to-end: every stage of the demo on a tiny random model, then a re-run that skips them all."""

import json
import pytest

from saelab.demo import DemoConfig, format_summary, run_demo
from saelab.featuredb import FeatureDB


@pytest.mark.slow(ci=True)
def test_demo_runs_every_stage_then_skips_them(tmp_path, tiny_model_dirs):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n\nimport os\nos.system(cmd)\n" * 6)
    config = DemoConfig(run=tmp_path / "run", model=str(tiny_model_dirs["llama"]), hook="blocks.1.hook_resid_post",
                        corpus=str(corpus), context=32, harvest_tokens=8192, latents=64, k=4, eval_tokens=1024,
                        analyze_tokens=2048, map_method="pca")
    said = []
    summary = run_demo(config, say=said.append)
    for stage in ("harvest", "train", "eval", "analyze"):
        assert any(m.startswith(f"[{stage}] done") for m in said), said
    assert {"acts", "sae", "eval.json", "features.db"} <= {p.name for p in config.run.iterdir()}
    assert 0 <= summary["fvu"] < 1.5 and summary["l0"] <= 4
    with FeatureDB.open(config.run / "features.db") as db:
        assert db.n_features == 64
        live = len(db.live_features())
    text = format_summary(summary, "http://x/")
    assert "browse: http://x/" in text and "Ctrl-C" in text
    # the counts said are eval's dead and analysis' live, each with the tokens it was counted on
    report = json.loads((config.run / "eval.json").read_text())
    dead, tokens = report["sparsity"]["dead"], report["reconstruction"]["tokens"]
    assert f"{dead} of 64 features" in text and f"on the {tokens:,} eval tokens" in text
    assert f"; {live} fired on some" in text
    said.clear()
    run_demo(config, say=said.append)
    assert all("skipped" in m for m in said) and len(said) == 4


def test_demo_with_a_shipped_sae_skips_harvest_and_training(tmp_path, tiny_model_dirs):
    """The real-model demo's path: a trained SAE folder is copied in; eval and analysis run on it."""
    import torch

    from saelab.formats import save_sae
    from saelab.sae import SAE, SAEConfig

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 8)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(32, 64, "topk", k=4))
    shipped = tmp_path / "shipped" / "tiny"
    save_sae(sae.half(), shipped, model_name=str(tiny_model_dirs["llama"]), hook_name="blocks.1.hook_resid_post",
             corpus={"source": str(corpus), "split": "train", "seed": 0}, context_size=32,
             feature_max_act=[1.0] * 64)
    (shipped / "README.md").write_text("how it was made")
    config = DemoConfig(run=tmp_path / "run", model=str(tiny_model_dirs["llama"]), hook="blocks.1.hook_resid_post",
                        corpus=str(corpus), context=32, eval_tokens=1024, analyze_tokens=2048, map_method="pca",
                        shipped_sae=shipped)
    said = []
    run_demo(config, say=said.append)
    assert any(m.startswith("[sae] done") for m in said) and not any(m.startswith(("[harvest]", "[train]")) for m in said)
    assert not (config.run / "acts").exists() and (config.run / "features.db").is_file()
    assert {p.name for p in (config.run / "sae").iterdir()} >= {"cfg.json", "sae_weights.safetensors", "saelab.json"}
    assert not (config.run / "sae" / "README.md").exists()
    said.clear()
    run_demo(config, say=said.append)
    assert all("skipped" in m for m in said) and len(said) == 3


def test_demo_cli_refuses_mixed_options(capsys):
    from saelab.cli import main

    assert main(["demo", "--model", "smollm2", "--quick", "--no-serve"]) == 2
    assert "--quick is for the builtin model" in capsys.readouterr().err
    assert main(["demo", "--full", "--no-serve"]) == 2
    assert "--full is for --model smollm2" in capsys.readouterr().err


def test_smollm2_demo_config_uses_the_shipped_sae():
    from saelab.demo import SHIPPED

    c = DemoConfig.smollm2()
    assert c.shipped_sae == SHIPPED / "smollm2" and (c.shipped_sae / "cfg.json").is_file()
    assert c.model == "smollm2" and c.corpus == "english+chat:smollm2" and c.hook == "blocks.15.hook_resid_post"
    from saelab.provenance import Provenance
    from saelab import load_sae

    made = Provenance.of(load_sae(c.shipped_sae))
    assert made.corpus["source"] == c.corpus and made.hook_read == c.hook   # the config that --full runs made it
    assert DemoConfig.smollm2(full=True).shipped_sae is None
    size = sum(p.stat().st_size for p in c.shipped_sae.iterdir())
    assert size < 25 * 2**20                                     # the budget for committed weights
