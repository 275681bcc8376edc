"""The ``chat:MODEL`` corpus: a chat model's own answers to a broad list of requests.

An SAE for a chat model should see chat: the model's answers in its chat template, not only prose written
by people. No chat data set may be downloaded here, so the model writes it: every request of
``saelab/prompts/chat_requests.toml`` (hand-written topics × templates: landmarks, science, history,
everyday life, programming, ...) is put to it as a user message, and it answers by plain sampling
(temperature :data:`TEMPERATURE`, a fixed seed per batch, up to :data:`MAX_NEW_TOKENS` tokens, cut at
its end-of-turn token). A document is the whole exchange in the chat template (system prompt, request,
answer), without its leading BOS, which the packer adds to every document.

Built once by ``saelab corpus chat MODEL`` into :func:`saelab.corpus.chat_path` with a record (model
identity, request list hash, settings, counts) beside it. The build appends a batch at a time to a
``.partial`` file, so an interrupted build resumes where it stopped; it is rebuilt when the model, the
request list or the settings change. The requests are saelab's; every answer is the model's. SmolLM2's
corpus ships built (``saelab/shipped/smollm2/chat_corpus.jsonl.gz``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Callable

from saelab import atomic
from saelab.chat_template import render_chat
from saelab.corpus import chat_path
from saelab.generation import prompt_ids
from saelab.locks import exclusive
from saelab.measures import generate_batch
from saelab.models import load_model

REQUESTS = Path(__file__).parent / "prompts" / "chat_requests.toml"
TEMPERATURE, MAX_NEW_TOKENS, BATCH, SEED = 0.8, 192, 32, 0
BUILD_VERSION = 1
"""Bumped when the way documents are made changes (so built corpora are rebuilt)."""


def requests(path: Path = REQUESTS) -> list[str]:
    """Every template × topic, section by section, in file order."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    return [t.format(topic) for section in data.values() for topic in section["topics"] for t in section["templates"]]


def settings(lm, request_list: list[str]) -> dict:
    return {"version": BUILD_VERSION, "model": lm.name, "weights_sha256": lm.weights_hash,
            "requests_sha256": hashlib.sha256("\n".join(request_list).encode()).hexdigest(),
            "temperature": TEMPERATURE, "max_new_tokens": MAX_NEW_TOKENS, "batch": BATCH, "seed": SEED}


def build(model: str, *, load=None, progress: Callable[[int, int], None] | None = None,
          request_list: list[str] | None = None) -> Path:
    """Build (or resume, or rebuild when stale) the corpus ``chat:MODEL`` at :func:`saelab.corpus.chat_path`.

    ``load``: how to load the model (default :func:`saelab.models.load_model`); ``request_list`` replaces the
    shipped requests (tests)."""
    lm = (load or load_model)(model)
    if not getattr(lm.tokenizer, "chat_template", None):
        raise ValueError(f"corpus 'chat:{model}': the model's tokenizer has no chat template, so it cannot be "
                         "asked questions; use a plain-text corpus for it")
    reqs = request_list if request_list is not None else requests()
    want = settings(lm, reqs)
    out = chat_path(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one builder per corpus: two at once would append to one partial file and record a torn corpus as done
    with exclusive(out, "chat corpus build", "corpus"):
        return _build(lm, model, reqs, want, out, progress, request_list)


def _build(lm, model: str, reqs: list[str], want: dict, out: Path, progress, request_list) -> Path:
    record_path, partial = out.with_suffix(".json"), out.with_suffix(".partial.jsonl")
    partial_record = out.with_suffix(".partial.json")
    if out.is_file() and record_path.is_file() and _settings_of(record_path) == want:
        return out
    if _settings_of(partial_record) != want:     # a partial build with other settings cannot be resumed
        partial.unlink(missing_ok=True)
        atomic.write_json(partial_record, want)
    done = _complete_lines(partial)
    with partial.open("a", encoding="utf-8") as f:
        for start in range(done, len(reqs), BATCH):
            batch = reqs[start:start + BATCH]
            docs = _answer(lm, batch, seed=SEED * 1_000_003 + start // BATCH)
            f.write("".join(json.dumps({"text": d, "source": f"chat:{model} request {start + i}"}, ensure_ascii=False)
                            + "\n" for i, d in enumerate(docs)))
            f.flush()
            os.fsync(f.fileno())
            if progress:
                progress(start + len(batch), len(reqs))
    lines = partial.read_text(encoding="utf-8").splitlines()
    atomic.write_bytes(out, ("\n".join(lines) + "\n").encode("utf-8"))
    atomic.write_json(record_path, {"name": f"chat:{model}", "settings": want, "documents": len(lines),
                                    "characters": sum(len(json.loads(ln)["text"]) for ln in lines),
                                    "requests_file": str(REQUESTS) if request_list is None else None,
                                    "written_by": "the model (every answer); saelab (the requests)"})
    partial.unlink()
    partial_record.unlink()
    return out


def _settings_of(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record.get("settings", record) if isinstance(record, dict) else None


def _complete_lines(partial: Path) -> int:
    """Whole batches already answered (a torn last line, or a torn batch, is dropped and redone)."""
    if not partial.is_file():
        return 0
    lines = partial.read_bytes().split(b"\n")
    whole = lines[:-1]  # the part after the last newline is torn (or empty)
    keep = len(whole) - len(whole) % BATCH
    atomic.write_bytes(partial, b"".join(ln + b"\n" for ln in whole[:keep]))
    return keep


def _answer(lm, batch: list[str], seed: int) -> list[str]:
    """Each request and the model's answer, in the chat template, without the leading BOS."""
    encoded = [prompt_ids(lm, r, chat=True) for r in batch]
    answers = generate_batch(lm, encoded, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, seed=seed)
    tok = lm.tokenizer
    bos = tok.bos_token or ""
    docs = []
    for req, (ans,) in zip(batch, answers):
        prompt = render_chat(tok, [{"role": "user", "content": req}], name=repr(lm.name))
        if bos and prompt.startswith(bos):
            prompt = prompt[len(bos):]                     # the packer puts BOS before every document
        ended = len(ans) < MAX_NEW_TOKENS                  # stopped at its end-of-turn token (cut off otherwise)
        docs.append(prompt + tok.decode(ans.tolist(), skip_special_tokens=True) + ((tok.eos_token or "") if ended else ""))
    return docs
