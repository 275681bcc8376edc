"""Shared test factories (a helper module, like tiny_models.py: no test file imports another).

- a real ActivationStore of synthetic sparse rows, for training tests (:func:`make_synthetic_store`);
- the web run folder: a tiny random llama, a tiny TopK SAE saved with save_sae, features.db from
  saelab.analyze over a small corpus folder, eval.json from saelab.evaluate. One feature's explanation is
  replaced by an HTML/script payload to check escaping. conftest's ``web_run_dir`` builds it once per
  session for the API and browser tests; :func:`served` serves an app over it on a free loopback port.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from saelab import store as st
from saelab.locks import lock_path

# -- a synthetic activation store ---------------------------------------------------------------------

D_IN, N_FEATURES = 16, 48


def synthetic_rows(n: int, seed: int = 0) -> torch.Tensor:
    """Sparse ground truth: each row sums ~2.4 of 48 random unit directions with positive magnitudes."""
    g = torch.Generator().manual_seed(1234)
    dirs = torch.randn(N_FEATURES, D_IN, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    g.manual_seed(seed)
    on = (torch.rand(n, N_FEATURES, generator=g) < 0.05).float()
    mag = torch.rand(n, N_FEATURES, generator=g) * 2 + 0.5
    return (on * mag) @ dirs * 3 + 1.0                                # (n, D_IN)


def make_synthetic_store(path: Path, rows: int = 16384, shards: int = 4, seed: int = 0,
                         x: torch.Tensor | None = None) -> st.ActivationStore:
    """A real ActivationStore of synthetic rows (sequences of 32 positions); ``x [rows, d_in]`` replaces them."""
    x = synthetic_rows(rows, seed) if x is None else x
    rows = x.shape[0]
    header = {"format": st.FORMAT, "version": st.VERSION, "model_name": "synthetic", "hook_name": "blocks.0.hook_x",
              "hf_hook_name": "model.layers.0", "d_in": x.shape[1], "dtype": "float32", "context": 32,
              "corpus": {"source": "synthetic", "split": "train", "seed": seed}}
    manifest = st.prepare(path, header, resume=False)
    per = rows // shards
    for i in range(shards):
        seq = torch.arange(i * per, (i + 1) * per) // 32
        pos = torch.arange(per) % 32
        manifest = st.append_shard(path, manifest, x[i * per:(i + 1) * per], torch.zeros(per, dtype=torch.int32), seq,
                                   pos, seq_start=int(seq[0]), seq_end=int(seq[-1]) + 1)
    st.atomic.write_json(path / st.MANIFEST, {**manifest, "complete": True})
    return st.ActivationStore.open(path)


# -- the web run folder -------------------------------------------------------------------------------

XSS = "<img src=x onerror=alert(1)>"
PAYLOAD = f"{XSS} </script><script>alert(2)</script>"
HOOK = "blocks.1.hook_resid_post"
CORPUS = {
    "code.py": "import os\n\ndef run(cmd):\n    os.system(cmd)\n    return cmd + 1\n",
    "page.txt": f"html = '{XSS}'\nend = '</script>'\nprint(html, end)\n",
    "more.py": "class A:\n    def f(self, x):\n        return self.x * x\n",
}


def build_web_run(root: Path) -> Path:
    """A run folder (sae/, features.db, eval.json in sae/) over a tiny model; returns it."""
    from tiny_models import save_tiny_model

    from saelab.analyze import analyze
    from saelab.corpus import CorpusSpec
    from saelab.evaluate import evaluate
    from saelab.featuredb import FeatureDB
    from saelab.formats import load_sae, save_sae
    from saelab.sae import SAE, SAEConfig

    model_dir = save_tiny_model("llama", root / "model")
    corpus_tokenizer().save_pretrained(str(model_dir))
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in CORPUS.items():
        (corpus / name).write_text(text * 12)
    run = root / "run"
    sae = SAE(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4))
    sae.reset_parameters(seed=0)
    save_sae(sae, run / "sae", model_name=str(model_dir), hook_name=HOOK, context_size=32,
             corpus={"source": str(corpus), "split": "all"})
    analyze(run / "sae", tokens=1024, context=32, batch_size=8, split="all", progress=False, map="pca")
    evaluate(load_sae(run / "sae"), tokens=256, context=32, corpus=CorpusSpec(str(corpus), "all"),
             progress=False).save(run / "sae")
    # What the trainer writes, for the overview's training curve.
    (run / "sae" / "train_log.jsonl").write_text("".join(
        json.dumps({"step": s, "fvu": 1 / (s + 1), "l0": 4.0, "dead_fraction": 0.1, "loss": 2 / (s + 1)}) + "\n"
        for s in range(0, 50, 10)))
    with FeatureDB.open(run / "features.db", writable=True) as db:
        db.set_explanations([(xss_feature(db), PAYLOAD, "test", 0.5)])
    return run


def corpus_tokenizer():
    """A byte-level BPE tokenizer (96 entries, the tiny model's vocabulary) trained on CORPUS, so that every
    character of the payload has a token (tiny_models' tokenizer drops characters it never saw)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tiny_models import VOCAB
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(list(CORPUS.values()) * 10, trainer)
    assert tok.get_vocab_size() <= VOCAB
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special, pad_token=special)


def xss_feature(db) -> int:
    """The first live feature whose top examples show the corpus' ``<img ...>`` and ``</script>`` in full."""
    for f in db.live_features():
        texts = ["".join(e["tokens"]) for e in db.examples(f, "top")]
        if any(XSS in t for t in texts) and any("</script>" in t for t in texts):
            return f
    raise AssertionError("no feature's top examples contain the payload lines of the corpus")


@contextmanager
def served(run_dir, **config):
    """The app over ``run_dir`` served by uvicorn on a free loopback port: yields (base url, app)."""
    import uvicorn

    from saelab.web.app import create_app
    from saelab.web.guard import ServerConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(run_dir, config=ServerConfig(port=port, **config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)


CODE_LINES = ["def f(x):", "    return x + 1", "import os", "os.system(cmd)", "for i in range(10):", "    print(i)",
              "class A:", "    pass", "x = [1, 2, 3]", "if x: y = x"]


def write_code_corpus(folder: Path, n_docs: int = 200, seed: int = 0) -> str:
    """A ``.jsonl`` corpus of ``n_docs`` short documents of random lines of code; returns its path."""
    rng = random.Random(seed)
    path = Path(folder) / "code.jsonl"
    docs = ["\n".join(rng.choice(CODE_LINES) for _ in range(rng.randint(3, 12))) for _ in range(n_docs)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


# -- a lock held by another process ----------------------------------------------------------------------

def hold_lock(target: Path):
    """A child process holding the lock on ``target`` until killed. It follows saelab.locks' protocol
    (flock the sibling ``.<name>.lock``, write the PID) with bare fcntl: importing saelab (torch) in a
    child costs seconds on a loaded machine."""
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
            "print('locked', flush=True)\ntime.sleep(600)\n")
    lock_path(target).parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock_path(target))], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def write_function_corpus(folder: Path, n_files: int = 8, n_defs: int = 40) -> Path:
    """``n_files`` small Python files of one-line functions (a corpus folder for tiny-model runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (folder / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {i + j}\n" for j in range(n_defs)))
    return folder


def make_features_db(path: Path, sae, sae_path: Path | None = None, **meta) -> Path:
    """A minimal features.db built for ``sae`` (its identity in the meta table, one row per feature)."""
    from saelab.featuredb import build, sae_identity

    with build(path) as w:
        w.meta(model_name="m", hook_name="blocks.0.hook_x", sae_path=str(sae_path) if sae_path else None,
               **sae_identity(sae), **meta)
        w.features([{"id": i, "count": 1, "density": 0.1, "max_act": 1.0, "mean_act": 0.5} for i in range(sae.d_sae)])
    return path
