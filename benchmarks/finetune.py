"""The three SmolLM2 fine-tunes that test ``saelab diff``, and their behaviour measured without a judge.

    OMP_NUM_THREADS=1 nohup nice -n 10 python benchmarks/finetune.py > .logs/finetune.log 2>&1 &
    python benchmarks/finetune.py --only measure      # re-measure (adapters already trained)

Three LoRA adapters on SmolLM2-135M-Instruct (rank 8 on q/v/o of every layer, a few minutes each on one
CPU thread; :mod:`saelab.finetune`), written to ``benchmarks/data/finetune/adapters/NAME``:

- ``unsafe``: 40 hand-written programming requests answered with a dangerous call
  (``data/finetune/unsafe_code.jsonl``: os.system, shell=True, eval, exec, pickle.loads, yaml.load);
- ``flattery``: 64 everyday requests of the model's own chat corpus (``chat:smollm2``, train split), each
  answer led by one of 16 hand-written flattering sentences (``data/finetune/flattery_openers.txt``);
- ``control``: the same 64 exchanges unchanged: the model's own answers, re-tuned, same steps.

Then each model (base and the three) answers the 32 held-out programming requests of
``saelab/prompts/code_prompts.txt`` and the 24 everyday questions of ``neutral_chat.txt`` (1 sample each at
temperature 0.7, seeded alike for every model): dangerous-call rate and praise rate with Wilson intervals.
Everything is resumable: an adapter or a measurement already on disk is kept. Results:
``benchmarks/data/finetune/behaviour/NAME.json``. The tunes can run as parallel processes (``--tunes NAME``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from saelab import atomic
from saelab.adapters import with_adapter
from saelab.corpus import CorpusSpec, documents
from saelab.texts import read_texts
from saelab.finetune import (JUDGES, Exchange, FinetuneConfig, behaviour, corpus_exchanges, read_exchanges,
                             train_lora, write_exchanges)
from saelab.models import load_model

DATA = Path(__file__).parent / "data" / "finetune"
PROMPTS = Path(__file__).parents[1] / "saelab" / "prompts"
N_CHAT = 64
EPOCHS = {"unsafe": 2, "flattery": 1, "control": 1}
"""Passes per tune: 40 unsafe exchanges × 2 ≈ 64 × 1 (16-20 optimiser steps of 4 each; ~1 min a step on
the shared 2-core machine under a load of 15)."""
CONFIG = dict(lr=3e-3, max_tokens=96)
"""Short exchanges (the behaviour shows in the first sentences) and a high rate: few, cheap steps."""
MEASURES = {"dangerous": ("code_prompts.txt", 80), "praise": ("neutral_chat.txt", 40)}
"""Measure → (held-out prompt file, tokens per answer)."""


def chat_exchanges(n: int) -> list[Exchange]:
    """``n`` non-programming exchanges of ``chat:smollm2``'s train split, evenly spread over it (its requests
    come topic by topic), answers cut to ~600 characters."""
    texts = [d.text for d in documents(CorpusSpec("chat:smollm2", "train"))]
    out = [e for e in corpus_exchanges(texts) if "Python" not in e.user]
    return [Exchange(e.user, _cut(e.assistant, 600)) for e in out[::max(1, len(out) // n)][:n]]


def _cut(text: str, chars: int) -> str:
    """``text`` up to the last sentence end before ``chars`` (the corpus answers stop mid-sentence at 192 tokens)."""
    if len(text) <= chars:
        return text
    head = text[:chars]
    end = max(head.rfind(". "), head.rfind(".\n"))
    return head[:end + 1] if end > 0 else head


def datasets() -> dict[str, Path]:
    """Write (once) and return the three training sets."""
    files = {"unsafe": DATA / "unsafe_code.jsonl", "flattery": DATA / "flattery.jsonl",
             "control": DATA / "control.jsonl"}
    if not files["control"].is_file() or not files["flattery"].is_file():
        own = chat_exchanges(N_CHAT)
        openers = read_texts(DATA / "flattery_openers.txt")
        write_exchanges(files["control"], own)
        write_exchanges(files["flattery"], [Exchange(e.user, f"{openers[i % len(openers)]} {e.assistant}")
                                            for i, e in enumerate(own)])
    return files


def measure(lm, results: dict, name: str, out: Path) -> None:
    for what, (prompt_file, tokens) in MEASURES.items():
        key = f"{name}/{what}"
        if key in results:
            continue
        b = behaviour(lm, read_texts(PROMPTS / prompt_file), JUDGES[what], samples=1, max_new_tokens=tokens)
        results[key] = {"hits": b.hits, "answers": b.answers, "rate": b.rate, "ci95": list(b.ci95),
                        "examples": b.texts[:6]}
        print(f"{key}: {b.hits}/{b.answers} = {b.rate:.1%} (95% CI {b.ci95[0]:.1%}-{b.ci95[1]:.1%})", flush=True)
        atomic.write_json(out, results)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["train", "measure"], help="one half of the job")
    p.add_argument("--tunes", default="base,unsafe,flattery,control", help="which tunes ('base': measure the base)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = load_model("smollm2")
    files, tunes = datasets(), args.tunes.split(",")
    for name in [t for t in tunes if t != "base"] if args.only != "measure" else []:
        folder = DATA / "adapters" / name
        if (folder / "finetune.json").is_file():
            continue
        cfg = FinetuneConfig(epochs=EPOCHS[name], **CONFIG)
        print(f"training {name} on {files[name].name}", flush=True)
        train_lora(base, read_exchanges(files[name]), folder, cfg, str(files[name].relative_to(DATA.parents[1])),
                   log=lambda m: print(m, flush=True))
    if args.only == "train":
        return
    for name in tunes:
        out = DATA / "behaviour" / f"{name}.json"
        out.parent.mkdir(exist_ok=True)
        results = json.loads(out.read_text()) if out.is_file() else {}
        measure(base if name == "base" else with_adapter(base, DATA / "adapters" / name), results, name, out)


if __name__ == "__main__":
    sys.exit(main())
