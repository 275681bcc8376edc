"""Issue 28 (red team, round 2): one test (or more) per finding, each failing before its fix.

Security: pickled model weights beside a decoy safetensors, chat templates that loop or escape their
sandbox, SAE weights that are FIFOs. Then inputs that used to end in tracebacks or be silently wrong.
The map's Plotly markup is checked in a real browser in test_web_browser.py. docs/reliability.md lists
which test proves which promise.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from saelab.cli import main
from saelab.errors import InvalidModel
from saelab.formats import save_sae
from saelab.models import MODEL_DIR, load_model
from saelab.sae import SAE, SAEConfig


class _System:
    """Unpickling this runs a shell command through os.system: it creates ``marker`` if ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def builtin_copy(folder: Path) -> Path:
    """The builtin model's config and tokenizer without its weights."""
    folder.mkdir(parents=True)
    for f in MODEL_DIR.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    return folder


def decoy_layouts(root: Path, marker: Path) -> list[Path]:
    """Folders whose real weights are a pickle that calls os.system, with a junk decoy.safetensors beside:
    a single pytorch_model.bin, and shards named by pytorch_model.bin.index.json."""
    payload = pickle.dumps({"model.embed_tokens.weight": _System(marker)})
    single = builtin_copy(root / "single")
    (single / "decoy.safetensors").write_bytes(b"junk that is not a safetensors file")
    (single / "pytorch_model.bin").write_bytes(payload)
    sharded = builtin_copy(root / "sharded")
    (sharded / "decoy.safetensors").write_bytes(b"junk")
    shard = "pytorch_model-00001-of-00001.bin"
    (sharded / shard).write_bytes(payload)
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": {"model.embed_tokens.weight": shard}}))
    index_only = builtin_copy(root / "index-only")   # the index alone already means pickled shards
    (index_only / "model.safetensors").write_bytes(b"junk")
    (index_only / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
    return [single, sharded, index_only]


def test_pickled_weights_beside_a_decoy_safetensors_are_refused_unopened(tmp_path, monkeypatch):
    marker = tmp_path / "ran"

    def never(*a, **k):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", never)
    for folder in decoy_layouts(tmp_path, marker):
        with pytest.raises(InvalidModel, match=rf"{folder}: holds pickle-format weight files \(pytorch_model"):
            load_model(str(folder))
    assert not marker.exists()


def test_sae_naming_a_pickled_model_folder_is_refused_with_one_line(tmp_path, capsys):
    marker = tmp_path / "ran"
    sae = SAE(SAEConfig(192, 8, "relu"))
    sae.reset_parameters(seed=0)
    for folder in decoy_layouts(tmp_path / "models", marker):
        save_sae(sae, tmp_path / folder.name, model_name=str(folder), hook_name="blocks.1.hook_resid_post")
        assert main(["steer", str(tmp_path / folder.name), "--prompt", "hi", "--feature", "0=1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds pickle-format weight files" in err and "Traceback" not in err
    assert not marker.exists()


def test_model_folder_without_transformers_safetensors_is_refused(tmp_path):
    folder = builtin_copy(tmp_path / "m")
    (folder / "decoy.safetensors").write_bytes(b"junk")
    with pytest.raises(InvalidModel, match=r"no model.safetensors or model.safetensors.index.json"):
        load_model(str(folder))
