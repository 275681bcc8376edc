"""Issue 28 (red team, round 2): one test (or more) per finding, each failing before its fix.

Security: pickled model weights beside a decoy safetensors, chat templates that loop or escape their
sandbox, SAE weights that are FIFOs. Then inputs that used to end in tracebacks or be silently wrong.
The map's Plotly markup is checked in a real browser in test_web_browser.py. docs/reliability.md lists
which test proves which promise.
"""

from __future__ import annotations

import json
import re
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


# -- 4. chat templates: bounded in time and size, escapes refused in one line -------------------------

LOOP = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        "{{ messages[0]['content'] }}")
RICH = ("{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "<|endoftext|>{{ m['role'] }} {{ ns.n }}\n{{ m['content'] | tojson }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")
ESCAPE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
STOPPED = r"ran (more than 2,000,000 steps|longer than 10 s)"   # whichever bound a loaded machine meets first


def with_template(src: Path, out: Path, template: str) -> Path:
    """A copy of the model folder ``src`` whose tokenizer has ``template`` as its chat template."""
    shutil.copytree(src, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_model

    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


def test_bounded_rendering_matches_transformers(tiny_llama, tmp_path):
    from saelab.chat_template import chat_ids, render_chat

    tok = load_model(str(with_template(tiny_llama, tmp_path / "m", RICH))).tokenizer
    msgs = [{"role": "user", "content": 'say "hi" <b>'}, {"role": "assistant", "content": "hi"}]
    for gen in (True, False):
        assert render_chat(tok, msgs, gen) == tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        assert chat_ids(tok, msgs, gen) == list(tok.apply_chat_template(
            msgs, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"])


@pytest.mark.parametrize("template, message", [
    (LOOP, STOPPED),
    ("{{ 'x' * 10**12 }}", "built a sequence of more than"),
    ("{{ 'x' * 900000 + 'y' * 900000 }}", "built a sequence of more than"),
    ("{{ 7 ** 100000000 }}", "raised a number to the power"),
    ("{{ '%0999999999d' % 1 }}", "formatted a field wider than"),
    ("{% for i in range(100000) %}{{ 'abcdefghijkl' }}{% endfor %}", "wrote more than 1,000,000 characters"),
    (ESCAPE, "tried something the sandbox forbids"),
    ("{{ raise_exception('only user and assistant roles') }}", "failed: TemplateError: only user and assistant"),
    ("{% for %}", "does not compile"),
])
def test_chat_templates_that_loop_grow_or_escape_end_in_one_clear_error(tiny_llama, tmp_path, template, message):
    import time

    from saelab.errors import ChatTemplateError
    from saelab.generation import prompt_ids

    lm = load_model(str(with_template(tiny_llama, tmp_path / "m", template)))
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=message if message == STOPPED else re.escape(message)):
        prompt_ids(lm, "hi", chat=True)
    assert time.monotonic() - start < 30


def test_cli_chat_with_a_looping_or_escaping_template_prints_one_line(tiny_llama, tmp_path, capsys):
    sae = SAE(SAEConfig(32, 8, "relu"))
    sae.reset_parameters(seed=0)
    for name, template, says in (("loop", LOOP, STOPPED), ("escape", ESCAPE, "the sandbox forbids")):
        model = with_template(tiny_llama, tmp_path / name, template)
        save_sae(sae, tmp_path / f"sae-{name}", model_name=str(model), hook_name="blocks.1.hook_resid_post")
        assert main(["steer", str(tmp_path / f"sae-{name}"), "--prompt", "hi", "--feature", "0=1", "--chat"]) == 2
        err = capsys.readouterr().err  # (transformers' own progress bar may precede the line)
        lines = [ln for ln in err.splitlines() if ln.startswith("saelab: error:")]
        assert "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith(f"saelab: error: the chat template of {str(model)!r} ") and re.search(says, lines[0])


def test_served_chat_request_with_a_looping_template_frees_the_model(web_run_dir, tmp_path):
    """A looping template is stopped with a 422; the next request runs (no 503: the model gate is free)."""
    from fastapi.testclient import TestClient

    from saelab.formats import load_sae
    from saelab.provenance import Provenance
    from saelab.web.app import create_app
    from saelab.web.guard import ServerConfig

    model = with_template(Path(Provenance.of(load_sae(web_run_dir / "sae")).model_name), tmp_path / "m", LOOP)
    app = create_app(web_run_dir, model=str(model), config=ServerConfig(max_new_tokens=4))
    with TestClient(app, base_url="http://127.0.0.1:8765") as client:
        body = {"prompt": "hi", "max_new_tokens": 2, "features": [{"id": 0, "value": 1, "mode": "clamp"}]}
        r = client.post("/api/steer", json={**body, "chat": True})
        assert r.status_code == 422 and re.search(STOPPED, r.json()["detail"])
        assert client.post("/api/steer", json={**body, "chat": False}).status_code == 200


# -- 5. FIFOs (and other non-regular files) where a file is read --------------------------------------

def test_fifo_in_place_of_an_sae_file_is_refused_without_blocking(tmp_path):
    from saelab.errors import NotAFile
    from saelab.formats import load_sae

    sae = SAE(SAEConfig(8, 4, "relu"))
    sae.reset_parameters(seed=0)
    for name in ("sae_weights.safetensors", "cfg.json", "saelab.json"):
        folder = tmp_path / name
        save_sae(sae, folder)
        (folder / name).unlink()
        os.mkfifo(folder / name)
        with pytest.raises(NotAFile, match=rf"{folder / name}: the SAE (weights file|config|file) is a FIFO"):
            load_sae(folder)
        with pytest.raises(NotAFile, match="is a FIFO"):
            load_sae(folder / name)
    os.mkfifo(tmp_path / "params.npz")
    with pytest.raises(NotAFile, match="is a FIFO"):
        load_sae(tmp_path / "params.npz")


def test_fifo_in_place_of_a_shard_manifest_database_gguf_or_model_weights_is_refused(tmp_path, tiny_llama):
    from factories import make_synthetic_store

    from saelab import store as st
    from saelab.errors import NotAFile
    from saelab.featuredb import FeatureDB
    from saelab.models import gguf_folder

    store = make_synthetic_store(tmp_path / "acts", rows=256, shards=2)
    shard = store.path / store.shards[0]["file"]
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(NotAFile, match="activation shard is a FIFO"):
        st.ActivationStore.open(store.path)
    (store.path / st.MANIFEST).unlink()
    os.mkfifo(store.path / st.MANIFEST)
    with pytest.raises(NotAFile, match="store manifest is a FIFO"):
        st.ActivationStore.open(store.path)
    os.mkfifo(tmp_path / "features.db")
    with pytest.raises(NotAFile, match="feature database is a FIFO"):
        FeatureDB.open(tmp_path / "features.db")
    os.mkfifo(tmp_path / "m.gguf")
    with pytest.raises(NotAFile, match="GGUF file is a FIFO"):
        gguf_folder(tmp_path / "m.gguf")
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")
    with pytest.raises(NotAFile, match="model weights file is a FIFO"):
        load_model(str(model))


# -- GGUF: damaged files, a full disk, leftovers of a killed conversion, the cache listing -------------

@pytest.fixture(scope="module")
def tiny_gguf_file(tmp_path_factory, tiny_llama) -> Path:
    pytest.importorskip("gguf")
    from tiny_models import write_tiny_gguf

    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(tiny_llama, out)
    return out


def damaged_ggufs(good: bytes) -> dict[str, bytes]:
    """Broken GGUF files: the magic alone, truncations, a tensor count of 2^62, a key of 2^60 bytes."""
    import struct

    magic, version = good[:4], good[4:8]
    n_kv = good[16:24]
    return {
        "magic-only": b"GGUF",
        "cut-64": good[:64],
        "cut-half": good[:len(good) // 2],
        "count-2^62": magic + version + struct.pack("<Q", 2**62) + n_kv + good[24:],
        "string-2^60": magic + version + good[8:24] + struct.pack("<Q", 2**60) + good[32:],
        "not-gguf": b"PK\x03\x04" + good[4:],
    }


def test_damaged_gguf_files_end_in_one_line(tiny_gguf_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    for name, data in damaged_ggufs(tiny_gguf_file.read_bytes()).items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(data)
        with pytest.raises(InvalidModel, match=re.escape(str(bad)) + ": not a (readable )?GGUF"):
            load_model(str(bad))
        assert main(["hooks", str(bad)]) == 2
        err = capsys.readouterr().err
        # the progress line saying a conversion starts may come first; then one error line, no traceback
        lines = [line for line in err.splitlines() if not line.startswith("saelab: converting ")]
        assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"saelab: error: {bad}: not a"), \
            (name, err)
    assert not list((tmp_path / "cache" / "models").glob("*")) if (tmp_path / "cache" / "models").exists() else True


def test_gguf_conversion_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_gguf_file, tmp_path, monkeypatch):
    import errno

    from transformers import PreTrainedModel

    from saelab.errors import StorageError

    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    with pytest.raises(StorageError, match="No space left on device"):
        load_model(str(tiny_gguf_file))
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_killed_conversions_leftovers_are_removed_and_cache_info_lists_models(tiny_gguf_file, tmp_path,
                                                                              monkeypatch, capsys):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    models = tmp_path / "cache" / "models"
    dead = _dead_pid()
    stale, live = models / f".gguf-0123abcd.tmp-{dead}", models / f".gguf-4567cdef.tmp-{os.getpid()}"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    lm = load_model(str(tiny_gguf_file))
    assert not stale.exists() and live.exists()   # a running conversion's folder is left alone
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "1 models" in out and f"{lm.path}  from {tiny_gguf_file}" in out


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# -- training and sweep inputs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from factories import make_synthetic_store

    return make_synthetic_store(tmp_path_factory.mktemp("store") / "acts", rows=2048, shards=2)


def cli_error(capsys, args: list[str]) -> str:
    """The error line ``saelab ARGS`` prints on stderr (exit code 2), checked to be the only one (argparse's
    usage line and progress bars aside), no traceback."""
    try:
        code = main(args)
    except SystemExit as e:     # argparse refused an option: usage, then its error line
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    lines = [ln.strip() for ln in err.splitlines() if ln.startswith("saelab") and "error: " in ln]  # not bars
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


SWEEP_ARGS = ["--tokens", "2048", "--batch-size", "256", "--lr", "3e-3", "--checkpoint-every", "2"]


@pytest.mark.parametrize("cmd, args, says", [
    ("train", ["--latents", "1000000000000", "--k", "4"], "need about"),
    ("sweep", ["--latents", "1000000000000,16", "--k", "4"], "need about"),
    ("sweep", ["--latents", "²,16"], "'²' is not one"),
    ("train", ["--seed", str(2**70)], "seeds are integers from 0 to 2^63 - 1"),
    ("train", ["--init-seed", "-1"], "seeds are integers from 0 to 2^63 - 1"),
    ("sweep", ["--latents", "8,16", "--k", "12"], "k=12 is more than the smallest number of latents (8)"),
])
def test_training_inputs_are_refused_before_any_folder_is_made(small_store, tmp_path, capsys, cmd, args, says):
    out = tmp_path / "out"
    line = cli_error(capsys, [cmd, "--acts", str(small_store.path), "--out", str(out), *SWEEP_ARGS, *args])
    assert says in line
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_sweep_resume_with_another_plan_or_of_a_finished_sweep_is_refused(small_store, tmp_path, capsys):
    out = tmp_path / "sweep"
    run = ["sweep", "--acts", str(small_store.path), "--out", str(out), *SWEEP_ARGS, "--k", "4"]

    class Stop(Exception):
        pass

    def stop_after(first):
        def log(name, rec):
            if rec.get("step", 0) >= 4:
                raise Stop
        return log

    from saelab.sweep import INDEX, sweep
    from saelab.train_config import TrainConfig

    base = TrainConfig(k=4, tokens=2048, batch_size=256, lr=3e-3, checkpoint_every=2, log_every=1)
    with pytest.raises(Stop):
        sweep(small_store, base, out, latents=[16, 32], log=stop_after(True), progress=False)
    line = cli_error(capsys, [*run, "--latents", "16,48", "--resume"])
    assert "started as members latents-00016, latents-00032" in line and "latents-00016, latents-00048" in line
    assert not (out / "latents-00048").exists()
    sweep(small_store, base, out, latents=[16, 32], resume=True, progress=False)
    index = (out / INDEX).read_bytes()
    line = cli_error(capsys, [*run, "--latents", "16,32", "--resume"])
    assert "already holds a finished sweep (sweep.json): there is nothing to resume" in line
    assert (out / INDEX).read_bytes() == index


# -- numbers and ids on the command line ----------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin_sae(tmp_path_factory) -> Path:
    sae = SAE(SAEConfig(192, 16, "relu"))
    sae.reset_parameters(seed=0)
    folder = tmp_path_factory.mktemp("bsae") / "sae"
    save_sae(sae, folder, model_name="builtin", hook_name="blocks.1.hook_resid_post", feature_max_act=[1.0] * 16)
    return folder


@pytest.mark.parametrize("args, says", [
    (["steer", "{sae}", "--prompt", "hi", "--feature", "5=1e308"], "must be a finite number within ±1e+06"),
    (["steer", "{sae}", "--prompt", "hi", "--feature", "5=-inf"], "must be a finite number within ±1e+06"),
    (["steer", "{sae}", "--prompt", "hi", "--feature", "5=1", "--samples", "0"], "not a positive integer"),
    (["steer", "{sae}", "--prompt", "hi", "--feature", "5=1", "--seed", str(2**70)], "seeds are integers"),
    (["experiment", "unsafe-code", "{tmp}", "--samples", "0"], "--samples: 0 is not a positive integer"),
    (["experiment", "builtin-dial", "{tmp}", "--values", "1,nan"], "'nan' is not a finite number"),
    (["experiment", "builtin-dial", "{tmp}", "--values", "1e308"], "'1e308' is not a finite number"),
    (["dial", "{sae}", "--prompts", "{prompts}", "--features", "5,5", "--keywords", "x"], "lists a feature twice"),
    (["dial", "{sae}", "--prompts", "{prompts}", "--features", "1.5", "--keywords", "x"], "'1.5' is not an integer"),
    (["families", "{tmp}", "--tau", "nan"], "--tau must be a number from 0 to 1, got nan"),
    (["families", "{tmp}", "--tau", "-1"], "--tau must be a number from 0 to 1"),
    (["families", "{tmp}", "--cover", "5"], "--cover must be a number from 0 to 1, got 5.0"),
])
def test_bad_numbers_on_the_command_line_are_one_line(builtin_sae, tmp_path, capsys, args, says):
    (tmp_path / "prompts.txt").write_text("def f():\n")
    args = [a.format(sae=builtin_sae, tmp=tmp_path, prompts=tmp_path / "prompts.txt") for a in args]
    assert says in cli_error(capsys, args)


@pytest.mark.parametrize("args, says", [
    (["--model-id", "../../evil"], "model id '../../evil' must be letters"),
    (["--model-id", "a/b"], "model id 'a/b' must be letters"),
    (["--sae-id-suffix", "../x"], "source id suffix '../x' must be letters"),
    (["--layer", "-5"], "layer must be a layer number (0 or more), got -5"),
])
def test_export_refuses_path_like_ids_and_negative_layers(web_run_dir, tmp_path, capsys, args, says):
    out = tmp_path / "export"
    line = cli_error(capsys, ["export", "neuronpedia", str(web_run_dir / "features.db"), "--sae",
                              str(web_run_dir / "sae"), "--out", str(out), *args])
    assert says in line and not out.exists()


# -- files with bad content: one line naming the file ----------------------------------------------------

def test_sae_config_with_a_negative_context_size_is_refused_naming_the_file(tmp_path):
    from saelab.errors import InvalidSAE
    from saelab.formats import load_sae

    sae = SAE(SAEConfig(8, 4, "relu"))
    save_sae(sae, tmp_path / "sae", context_size=16)
    cfg_file = tmp_path / "sae" / "cfg.json"
    for value in (-1, 0):
        cfg = json.loads(cfg_file.read_text())
        cfg["metadata"]["context_size"] = value
        cfg_file.write_text(json.dumps(cfg))
        with pytest.raises(InvalidSAE, match=rf"{cfg_file}: metadata.context_size must be a positive integer, "
                                             rf"got {value}"):
            load_sae(tmp_path / "sae")


def test_concept_files_that_are_not_json_or_not_utf8_are_named(tmp_path):
    from saelab.texts import read_texts

    bad_json = tmp_path / "pos.jsonl"
    bad_json.write_text('"fine"\n{"text": oops}\n')
    with pytest.raises(ValueError, match=rf"{bad_json}:2: not valid JSON \(Expecting value at column 10\)"):
        read_texts(bad_json)
    latin = tmp_path / "neg.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{latin}: not UTF-8 text \(byte 3: invalid continuation byte\)"):
        read_texts(latin)


def test_concept_with_the_same_positive_and_negative_texts_says_they_do_not_separate(builtin_sae, tmp_path, capsys):
    texts = tmp_path / "same.txt"
    texts.write_text("".join(f"def f{i}(x):\n" for i in range(8)))
    line = cli_error(capsys, ["concept", str(builtin_sae), "--positive", str(texts), "--negative", str(texts),
                              "--no-calibrate"])
    assert "the positive and negative texts are the same texts, so they do not separate" in line


def test_sweep_json_with_bad_members_is_one_line(tmp_path, capsys):
    good = {"name": "latents-00016", "d_sae": 16, "k": 4, "arch": "topk", "path": "latents-00016"}
    for members, says in (([{**good, "extra": 1}], "members[0] has unknown key(s) extra"),
                          ([{k: v for k, v in good.items() if k != "path"}], "members[0] lacks path"),
                          ([good, "latents-00032"], "members[1] must be an object, found str"),
                          ([{**good, "d_sae": "16"}], "members[0].d_sae has the wrong type ('16')"),
                          ({"a": 1}, "'members' must be a non-empty list")):
        (tmp_path / "sweep.json").write_text(json.dumps({"format": "saelab-sweep", "version": 1, "members": members}))
        assert says in cli_error(capsys, ["scaling", str(tmp_path)])


def test_scaling_names_the_members_whose_loss_cannot_be_fitted():
    from saelab.scaling import fits

    rows = [{"name": f"latents-{n:05d}", "d_sae": n, "k": 4, "flops": n * 10, "fvu": f}
            for n, f in ((16, 0.5), (32, float("nan")), (64, 0.2))]
    with pytest.raises(ValueError, match=r"cannot fit fvu against d_sae: latents-00032 \(d_sae 32, fvu nan\)"):
        fits(rows)


def test_families_refuse_a_sample_with_nan_rows(tmp_path):
    from factories import make_synthetic_store, synthetic_rows

    from saelab.family_io import sample_rows

    x = synthetic_rows(512)
    x[300, 2] = float("nan")
    store = make_synthetic_store(tmp_path / "acts", x=x, shards=2)
    with pytest.raises(ValueError, match=rf"{store.path}: 1 of the 512 sampled rows hold NaN/inf values "
                                         r"\(first rows \[300\]\)"):
        sample_rows(store, 512, 0.0)


def test_steer_prints_escape_and_bell_characters_escaped(builtin_sae, capsys):
    assert main(["steer", str(builtin_sae), "--prompt", "x = 1\x1b[2J\x07\n", "--feature", "0=1",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "x = 1\\x1b[2J\\x07\n" in out


# -- bad content inside a valid features.db; a damaged families.json --------------------------------------

@pytest.fixture
def damaged_run(web_run_dir, tmp_path) -> Path:
    """A copy of the web run where feature 3's max_act is text, feature 5's top examples are torn JSON and
    feature 7's map position is text."""
    import sqlite3

    run = tmp_path / "run"
    shutil.copytree(web_run_dir, run)
    with sqlite3.connect(run / "features.db") as c:
        c.execute("UPDATE features SET max_act = 'abc' WHERE id = 3")
        c.execute("UPDATE examples SET tokens = '[broken' WHERE feature = 5")
        c.execute("UPDATE features SET x = 'abc' WHERE id = 7")
    return run


def test_damaged_rows_give_one_error_for_their_feature_and_the_rest_is_served(damaged_run, capsys):
    from fastapi.testclient import TestClient

    from saelab.web.app import create_app

    db = damaged_run / "features.db"
    with TestClient(create_app(damaged_run), base_url="http://127.0.0.1:8765") as client:
        for path, says in (("/api/features/3", "feature 3: max_act holds 'abc', not a number"),
                           ("/api/features/3/summary", "feature 3: max_act holds 'abc', not a number"),
                           ("/api/features/5", "feature 5: top example 0: tokens is not valid JSON")):
            r = client.get(path)
            assert r.status_code == 500 and r.json()["detail"].startswith(f"{db}: {says}"), (path, r.text)
        page = client.get("/features/5")
        assert page.status_code == 500 and "text/html" in page.headers["content-type"]
        assert "feature 5: top example 0: tokens is not valid JSON" in page.text
        for path in ("/", "/features", "/features?order_by=max_act", "/api/features?order_by=max_act", "/map",
                     "/features/4", "/api/features/2"):
            assert client.get(path).status_code == 200, path
        points = client.get("/api/map").json()
        assert 7 not in points["ids"] and 3 in points["ids"] and len(points["ids"]) == 63
    assert main(["feature", str(db), "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"saelab: error: {db}: feature 5: top example 0: tokens is not valid JSON") and \
        err.count("\n") == 1


def test_a_damaged_families_json_does_not_stop_the_server(damaged_run, caplog):
    from fastapi.testclient import TestClient

    from saelab.web.app import create_app

    (damaged_run / "sweep.json").write_text("{}")
    for text in ("{not json", json.dumps({"format": "saelab-families", "sizes": [{"path": "sae", "d_sae": 64}]})):
        (damaged_run / "families.json").write_text(text)
        with TestClient(create_app(damaged_run), base_url="http://127.0.0.1:8765") as client:
            assert client.get("/api/map").status_code == 200 and client.get("/features/2").status_code == 200
        assert "ignoring the families.json" in caplog.text


# -- locks: one chat-corpus builder, one explain, no explain during an analysis ------------------------------

def test_explain_and_chat_corpus_take_their_locks(web_run_dir, tmp_path, monkeypatch, capsys):
    from factories import hold_lock

    from saelab import chatcorpus
    from saelab.corpus import chat_path
    from saelab.errors import FolderLocked

    db = tmp_path / "features.db"
    shutil.copy(web_run_dir / "features.db", db)
    proc = hold_lock(db)                     # e.g. an analysis writing this database, or another explain
    try:
        line = cli_error(capsys, ["explain", str(db), "--features", "0-3"])
        assert f"process {proc.pid} is writing it" in line
    finally:
        proc.kill()
        proc.wait()
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))

    class Tok:
        chat_template = "{{ messages[0]['content'] }}"

    class LM:
        tokenizer, name, weights_hash = Tok(), "m", "0" * 64

    out = chat_path("m")
    proc = hold_lock(out)
    try:
        with pytest.raises(FolderLocked, match=f"process {proc.pid}"):
            chatcorpus.build("m", load=lambda name: LM(), request_list=["hi"])
    finally:
        proc.kill()
        proc.wait()
    assert not out.with_suffix(".partial.jsonl").exists()


@pytest.mark.slow
def test_served_looping_template_leaves_the_server_stoppable_by_sigterm(web_run_dir, tmp_path):
    """saelab serve, a chat steer request whose template loops, then SIGTERM: the request ends (422) and the
    server exits, as the bounded rendering frees the model (it used to hold it forever and ignore SIGTERM)."""
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time

    import httpx

    from saelab.formats import load_sae
    from saelab.provenance import Provenance

    model = with_template(Path(Provenance.of(load_sae(web_run_dir / "sae")).model_name), tmp_path / "m", LOOP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "saelab", "serve", str(web_run_dir), "--model", str(model),
                             "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stderr.readline()
        url, answers = f"http://127.0.0.1:{port}", []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(url + "/api/info", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        body = {"prompt": "hi", "max_new_tokens": 2, "chat": True, "features": [{"id": 0, "value": 1}]}
        asker = threading.Thread(target=lambda: answers.append(httpx.post(url + "/api/steer", json=body,
                                                                          timeout=120)))
        asker.start()
        time.sleep(2)                                   # the request is rendering the template now
        proc.send_signal(signal.SIGTERM)
        asker.join(120)
        assert proc.wait(timeout=60) is not None
        assert answers and answers[0].status_code == 422 and re.search(STOPPED, answers[0].json()["detail"])
    finally:
        proc.kill()
        proc.wait()
