"""A shipped SAE's training log travels with it into the run, where the overview plots it."""

import json

from saelab.demo import _copy_shipped
from saelab.web.state import read_train_log, train_curve


def test_the_shipped_training_log_is_copied_and_plotted(tmp_path):
    shipped = tmp_path / "shipped" / "smollm2"
    shipped.mkdir(parents=True)
    (shipped / "cfg.json").write_text("{}")
    (shipped / "README.md").write_text("how it was made")
    rows = [{"step": s, "tokens": 4096 * s, "loss": 1.0 / (s + 1), "fvu": 0.5 / (s + 1)} for s in range(0, 50, 10)]
    (shipped / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sae_dir = tmp_path / "run" / "sae"
    sae_dir.parent.mkdir()
    _copy_shipped(shipped, sae_dir)
    assert (sae_dir / "train_log.jsonl").read_text() == (shipped / "train_log.jsonl").read_text()
    assert not (sae_dir / "README.md").exists()
    curve = train_curve(read_train_log(sae_dir))
    assert curve["xlabel"] == "tokens" and curve["x"] == [r["tokens"] for r in rows]
    assert "fvu" in curve["series"]
