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
