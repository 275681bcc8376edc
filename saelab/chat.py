"""``saelab chat``: talk to a chat model in the terminal with a concept's dial on, answers streamed as they come.

The conversation is kept and re-encoded with the model's chat template each turn; the dial
(:func:`saelab.steer.dial_steering`) is on for every generated answer. Model text is printed with control
characters escaped (a model can emit terminal escape sequences).
"""

from __future__ import annotations

import re
from typing import TextIO

import torch

from saelab.generation import generate_ids
from saelab.steer import dial_steering

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """``text`` with control characters (escape sequences among them) shown as ``\\xNN``; newlines and tabs kept."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class Printer:
    """A ``generate`` streamer: prints each new piece of the answer as its tokens arrive (the prompt skipped)."""

    def __init__(self, tokenizer, out: TextIO):
        self.tok, self.out = tokenizer, out
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return
        self.out.write(terminal_safe(text[len(self.shown):]))
        self.out.flush()
        self.shown = text

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


def chat_ids(lm, history: list[dict]) -> torch.Tensor:
    """``[1, n]`` the conversation in the model's chat template, the assistant's turn opened."""
    ids = lm.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    return torch.tensor([list(ids)], device=lm.device)


def answer(lm, sae, db, concept, history: list[dict], out: TextIO, *, max_new_tokens: int = 200,
           temperature: float = 0.0, seed: int = 0) -> str:
    """Stream the model's next answer to ``history`` with the concept's dial on (``concept``: (file, strength))."""
    spec, strength = (concept[0].spec(), concept[1]) if concept else (None, None)
    printer = Printer(lm.tokenizer, out)
    ids = chat_ids(lm, history)
    with dial_steering(lm, sae, spec, strength, db=db):
        generate_ids(lm, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, streamer=printer)
    return printer.shown


def chat_loop(lm, sae, db, concept, inp: TextIO, out: TextIO, *, max_new_tokens: int = 200, temperature: float = 0.0,
              seed: int = 0, prompt: str = "you> ") -> list[dict]:
    """Read user lines from ``inp`` until EOF or ``/quit``; ``/reset`` forgets the conversation. Returns it."""
    history: list[dict] = []
    while True:
        out.write(prompt)
        out.flush()
        line = inp.readline()
        if not line:
            out.write("\n")
            return history
        text = line.strip()
        if text in ("/quit", "/exit"):
            return history
        if text == "/reset":
            history.clear()
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        out.write("model> ")
        reply = answer(lm, sae, db, concept, history, out, max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed)
        history.append({"role": "assistant", "content": reply})
