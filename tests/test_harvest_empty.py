"""An empty or too-small corpus is one clear error at the start of harvest, and leaves no store behind."""

import pytest

from saelab.cli import main


@pytest.mark.parametrize("text", ["", "x = 1\n"])
def test_empty_or_tiny_corpus_is_one_error_and_no_store(tmp_path, tiny_model_dirs, capsys, text):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(text)
    out = tmp_path / "acts"
    rc = main(["harvest", "--model", str(tiny_model_dirs["llama"]), "--hook", "blocks.0.hook_resid_post",
               "--corpus", str(corpus), "--split", "all", "--context", "64", "--tokens", "1000", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("saelab: error: corpus ") and "empty or too small" in err[-1], err
    assert not (out / "manifest.json").exists()
