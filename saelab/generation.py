"""Generation for every stage that writes text (steering, dials, monitoring, the chat corpus, the web):
prompt encoding (BOS first, or the chat template), the faster CPU thread count for decoding, and HF
``generate`` from a fixed seed without touching the caller's RNG."""

from __future__ import annotations

import math
import time
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.nn import functional as F

from saelab.chat_template import chat_ids
from saelab.corpus import bos_token_id

MIN_TEMPERATURE = 1e-3   # logits / T overflow float32 below about this (1e-45 gave inf/nan probabilities)


def as_loaded_model(model, need_lm_head: bool = True):
    """``model`` itself when it is a LoadedModel (tokenizer known) that can do the job, else a clear error."""
    if not hasattr(model, "tokenizer"):
        raise TypeError("pass a saelab LoadedModel (saelab.load_model) so that the tokenizer is known")
    if need_lm_head and not model.is_causal:
        raise ValueError(f"{model.name} ({model.family}) has no language-model head: it cannot generate")
    return model


def model_context(module) -> int | None:
    cfg = module.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    return None


def prompt_ids(model, prompt: str, max_new_tokens: int = 0, prepend_bos: bool = True,
               chat: bool = False) -> torch.Tensor:
    """``[1, n]`` token ids of the prompt, BOS first (as every window the SAE saw in training).

    ``chat``: the prompt is a user message, wrapped in the tokenizer's chat template with the
    assistant's turn opened (``add_generation_prompt``). Templates that begin with the BOS token
    (SmolLM2's ``<|im_start|>``, Llama 3's ``<|begin_of_text|>``) are not given a second one.
    """
    tok = model.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"model {model.name!r} has no chat template (its tokenizer defines none): "
                             "drop --chat and give the prompt as plain text")
        ids = chat_ids(tok, [{"role": "user", "content": prompt}], name=repr(model.name))
    else:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
    bos = bos_token_id(tok)
    if prepend_bos and (not ids or ids[0] != bos):
        ids = [bos] + ids
    ctx = model_context(model.model)
    if ctx is not None and len(ids) + max_new_tokens > ctx:
        raise ValueError(f"the prompt is {len(ids)} tokens; with {max_new_tokens} new tokens that is beyond the "
                         f"model's context of {ctx} tokens: shorten the prompt or generate fewer tokens")
    return torch.tensor([ids], device=model.device)


_thread_choice: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def generation_threads(model) -> int:
    """The faster torch thread count for this model's decoding steps on CPU: 1 or all, measured once.

    A KV-cached decoding step streams every weight matrix through one small matrix-vector product; on
    a busy 2-core machine the second thread's synchronisation often costs more than it brings
    (SmolLM2: 3-15× slower with 2 threads while other jobs ran), on an idle one it helps. So: time one
    such pass over the model's own matrices each way. The weights are used directly (``F.linear``),
    not the modules, so no hook of the caller's (steering, capture) sees the probe.
    """
    module, most = model.model, torch.get_num_threads()
    if model.device.type != "cpu" or most == 1:
        return most
    if module in _thread_choice:
        return _thread_choice[module]
    mats = [p for p in module.parameters() if p.dim() == 2]
    vecs = {n: torch.ones(1, n, dtype=mats[0].dtype) for n in {w.shape[1] for w in mats}}
    timings: dict[int, float] = {}
    try:
        for n in (1, most, 1, most):
            torch.set_num_threads(n)
            start = time.perf_counter()
            for w in mats:
                F.linear(vecs[w.shape[1]], w)                               # (1, out): one decoding step's GEMV
            timings[n] = min(timings.get(n, math.inf), time.perf_counter() - start)
    finally:
        torch.set_num_threads(most)
    _thread_choice[module] = min(timings, key=timings.get)
    return _thread_choice[module]


@contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def generate_ids(model, ids: torch.Tensor, *, max_new_tokens: int = 40, temperature: float = 1.0, seed: int = 0,
                 samples: int = 1, exact_length: bool = False, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
    """HF ``generate`` (KV cache on): greedy when ``temperature == 0``, else plain sampling from a
    fixed seed (no top-k/top-p) without touching the caller's RNG. ``[samples, n + new]``, or
    ``[rows, n + new]`` for ``ids [rows, n]`` with ``samples=1`` (``attention_mask`` masks left padding)."""
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf) or max_new_tokens < 1 or samples < 1:
        raise ValueError(f"need temperature 0 (greedy) or >= {MIN_TEMPERATURE} (smaller ones overflow the logits), "
                         f"max_new_tokens >= 1, samples >= 1; got {temperature}, {max_new_tokens}, {samples}")
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) if temperature > 0 \
        else dict(do_sample=False)
    devices = [model.device] if model.device.type == "cuda" else []
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    if samples > 1:
        ids, mask = ids.expand(samples, -1), mask.expand(samples, -1)
    with torch.random.fork_rng(devices=devices), torch.no_grad(), threads(generation_threads(model)):
        torch.manual_seed(seed)
        return model.model.generate(
            ids, attention_mask=mask,
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if exact_length else None,
            pad_token_id=pad, use_cache=True, **sampling, **kwargs)


def generated_part(model, row: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """The generated ids of one output row, cut at the first EOS (HF pads finished rows with it)."""
    new = row[n_prompt:]
    eos = model.tokenizer.eos_token_id
    if eos is not None:
        hits = (new == eos).nonzero()
        if len(hits):
            new = new[: int(hits[0])]
    return new
