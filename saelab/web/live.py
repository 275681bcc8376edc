"""API endpoints that run the model: inspect, steer (JSON and streamed), monitor.

Each takes the app's :class:`~saelab.web.guard.ModelGate` before touching the model, so there is
one model call at a time; a full queue or a long wait answers 503. Streamed steering holds the gate
from the request until its generation thread ends (bounded by ``max_new_tokens``), and stops early
when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from transformers.generation.streamers import BaseStreamer

from saelab.web.api import (ActivationsRequest, InspectRequest, ScanRequest, SteerRequest, check_text,
                            explanations)
from saelab.generation import generate_ids, prompt_ids
from saelab.monitor import Watchlist, scan
from saelab.steer import Ablate, Add, Clamp, DialSpec, compare_generations, dial_edits, max_activations, sae_hook_name, steering
from saelab.textfeatures import inspect_text, text_latents

POLL_S = 0.01
"""How often the event stream looks for the generation thread's next message (a token takes far longer)."""

router = APIRouter(prefix="/api")
log = logging.getLogger(__name__)


def segments(tokenizer, text: str) -> tuple[list[str], list[int]]:
    """The text cut at token starts (so the pieces join back to exactly ``text``), and each start offset."""
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [a for a, _ in spans]
    if not starts:
        return [], []
    cuts = [0, *starts[1:], len(text)]
    return [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])], starts


# -- inspect -------------------------------------------------------------------------------------

@router.post("/inspect", summary="Per-token top features of a text")
def api_inspect(req: InspectRequest, request: Request):
    check_text(request, req.text)
    state, gate = request.app.state.run, request.app.state.gate
    with gate.held():
        model, sae = state.model(), state.sae()
        result = inspect_text(sae, model, req.text, req.top, chat=req.chat)
    return inspect_json(state, model.tokenizer, req.text, result)


def inspect_json(state, tokenizer, text: str, result) -> dict:
    """Tokens with their features and explanations; the token texts join back to exactly ``text``."""
    pieces = [t.token for t in result]
    if "".join(pieces) != text:  # a character split across tokens decodes to U+FFFD piecewise
        cut, _ = segments(tokenizer, text)
        pieces = cut if len(cut) == len(pieces) else pieces
    names = explanations(state, [f for t in result for f, _ in t.features])
    tokens = [{"text": piece, "token_id": t.token_id,
               "features": [{"id": int(f), "act": float(a), "explanation": names[f]} for f, a in t.features]}
              for piece, t in zip(pieces, result)]
    max_act = max((t["features"][0]["act"] for t in tokens if t["features"]), default=0.0)
    return {"tokens": tokens, "max_act": max_act}


@router.post("/features/{feature_id}/activations", summary="One feature's activation on every token of a text")
def api_feature_activations(feature_id: int, req: ActivationsRequest, request: Request):
    check_text(request, req.text)
    state, gate = request.app.state.run, request.app.state.gate
    row = state.db.feature(feature_id)  # 404 for an unknown id, before the model loads
    with gate.held():
        model, sae = state.model(), state.sae()
        ids, z = text_latents(sae, model, req.text, sae_hook_name(sae), chat=req.chat)  # z: (tokens, d_sae)
    pieces = [model.tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
    if "".join(pieces) != req.text:  # a character split across tokens decodes to U+FFFD piecewise
        cut, _ = segments(model.tokenizer, req.text)
        pieces = cut if len(cut) == len(pieces) else pieces
    acts = z[:, feature_id].tolist()
    return {"feature": feature_id, "explanation": row["explanation"], "max_act": row["max_act"],
            "tokens": [{"text": t, "act": float(a)} for t, a in zip(pieces, acts)]}


# -- steer ---------------------------------------------------------------------------------------

def edits_of(req: SteerRequest, request: Request) -> tuple[dict, object]:
    """(per-feature edits, the concept's plain vector or None) of a steering request."""
    cfg = request.app.state.config
    check_text(request, req.prompt, "prompt")
    if req.max_new_tokens > cfg.max_new_tokens:
        raise HTTPException(422, f"max_new_tokens is {req.max_new_tokens}; this server generates at most "
                                 f"{cfg.max_new_tokens}")
    concept = req.concept.features if req.concept else []
    ids = [f.id for f in req.features] + concept
    if len(ids) > cfg.max_steer_features:
        raise HTTPException(422, f"{len(ids)} features; steer at most {cfg.max_steer_features} at once")
    if len(set(ids)) != len(ids):
        raise HTTPException(422, "each feature may have only one dial (a concept's features included)")
    n = request.app.state.run.db.n_features
    if bad := sorted(i for i in ids if i >= n):  # before the model loads, not after
        raise HTTPException(422, f"feature {', '.join(map(str, bad))} does not exist; this SAE has features 0-{n - 1}")
    make = {"clamp": lambda v: Clamp(v), "add": lambda v: Add(v), "ablate": lambda v: Ablate()}
    edits = {f.id: make[f.mode](f.value) for f in req.features}
    if req.concept and req.concept.mode == "add" and req.concept.unit == "norm":  # one direction, × residual norm
        state = request.app.state.run
        maxes = max_activations(None, concept, db=state.db)
        return edits, dial_edits(state.sae(), DialSpec(tuple(concept), "add", "norm"), req.concept.value, maxes)[1]
    edits.update({f: make[req.concept.mode](req.concept.value) for f in concept})  # one dial for the whole set
    return edits, None


@router.post("/steer", summary="Default and steered continuations side by side (whole texts)")
def api_steer(req: SteerRequest, request: Request):
    edits, vector = edits_of(req, request)
    state, gate = request.app.state.run, request.app.state.gate
    with gate.held():
        model, sae = state.model(), state.sae()
        ids = prompt_ids(model, req.prompt, req.max_new_tokens, chat=req.chat)
        (c,) = compare_generations(model, sae, req.prompt, edits, max_new_tokens=req.max_new_tokens, samples=1,
                                   seed=req.seed, temperature=req.temperature, db=state.db, ids=ids, vector=vector)
    notes = {side: note for side, text in (("default", c.default_text), ("steered", c.steered_text))
             if (note := degenerate(text))}
    return {"prompt": req.prompt, "default": c.default_text, "steered": c.steered_text, "notes": notes,
            "steered_tokens": c.steered_tokens, "steered_acts": {str(k): v for k, v in c.steered_acts.items()}}


def _period(text: str) -> int | None:
    """The shortest p such that ``text`` is a unit of p characters repeated at least 3 times (the last
    repeat may be cut short), or None."""
    for p in range(1, len(text) // 3 + 1):
        if text[p:] == text[:-p]:
            return p
    return None


def degenerate(text: str, n: int = 3) -> str | None:
    """Why a continuation is not readable text, or None: empty, only whitespace, or stuck repeating itself
    (a short unit over and over, at least in its second half; fewer than half of its word ``n``-grams
    distinct; or one character making up most of it)."""
    if not text:
        return "empty: the model ended the text at once"
    if not text.strip():
        return "only whitespace"
    tail = text[len(text) // 2:]
    for part, where in ((text, "repeats"), (tail, "ends up repeating")):
        if len(part) >= 12 and (p := _period(part)):
            return f"degenerate: it {where} {part[:p][:20]!r} over and over"
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) >= 6 and len(set(grams)) < 0.5 * len(grams):
        return "degenerate: it repeats the same words over and over"
    chars = [c for c in text if not c.isspace()]
    if len(chars) >= 12 and max(chars.count(c) for c in set(chars)) > 0.6 * len(chars):
        return "degenerate: mostly one character repeated"
    return None


class _Cancelled(Exception):
    """The client went away: stop generating."""


class _QueueStreamer(BaseStreamer):
    """HF ``generate`` streamer that sends each new piece of decoded text to a queue."""

    def __init__(self, tokenizer, side: str, out: queue.Queue, cancel: threading.Event):
        self.tokenizer, self.side, self.out, self.cancel = tokenizer, side, out, cancel
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.cancel.is_set():
            raise _Cancelled
        if not self.prompt_seen:  # generate() first pushes the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # a multi-byte character split across tokens: wait for the rest
        if len(text) > self.sent:
            self.out.put({"type": "token", "side": self.side, "text": text[self.sent:]})
            self.sent = len(text)


def _generate_both(state, model, sae, ids, edits, req: SteerRequest, out: queue.Queue, cancel, gate) -> None:
    try:
        notes = {}
        edits, vector = edits
        for side, side_edits, side_vector in (("default", {}, None), ("steered", edits, vector)):
            out.put({"type": "status", "text": f"generating the {side} continuation…"})
            streamer = _QueueStreamer(model.tokenizer, side, out, cancel)
            with steering(model, sae, side_edits, db=state.db, vector=side_vector):
                generate_ids(model, ids, max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                             seed=req.seed, streamer=streamer)
            note = degenerate(model.tokenizer.decode(streamer.ids, skip_special_tokens=True))
            if note:
                notes[side] = note
        out.put({"type": "done", "notes": notes})
    except _Cancelled:
        log.info("steering stream cancelled by the client")
    except Exception as e:  # reported to the client as an event: the HTTP status is already sent
        log.exception("steering stream failed")
        out.put({"type": "error", "detail": str(e)})
    finally:
        gate.release()
        out.put(None)


async def _events(out: queue.Queue, cancel: threading.Event):
    """The generation thread's messages as server-sent events.

    Async, and never blocked in ``out.get()``: when the client leaves, Starlette cancels this generator at its
    ``await``, so ``finally`` tells the generation thread at once. (A sync generator runs in a worker thread
    blocked on the queue; cancelled, it was only closed when the garbage collector found it, which in a
    long-lived process could be many seconds later, with the model held all along.)"""
    try:
        while True:
            try:
                msg = out.get_nowait()
            except queue.Empty:
                await asyncio.sleep(POLL_S)
                continue
            if msg is None:
                break
            yield f"data: {json.dumps(msg)}\n\n"
    finally:
        cancel.set()


@router.post("/steer/stream", summary="Default then steered continuation, streamed as server-sent events",
             description="Events are JSON lines after 'data: ': {type: token, side: default|steered, text}, "
                         "{type: status, text}, {type: error, detail}, {type: done, notes: {side: why the text "
                         "is empty or degenerate}}.")
def api_steer_stream(req: SteerRequest, request: Request):
    edits = edits_of(req, request)
    state, gate = request.app.state.run, request.app.state.gate
    gate.acquire()
    try:
        model, sae = state.model(), state.sae()
        ids = prompt_ids(model, req.prompt, req.max_new_tokens, chat=req.chat)  # ValueError (too long) → 422
        with steering(model, sae, edits[0], db=state.db, vector=edits[1]):  # unknown or dead features, bad hook: 422
            pass
    except BaseException:
        gate.release()
        raise
    out, cancel = queue.Queue(), threading.Event()
    threading.Thread(target=_generate_both, args=(state, model, sae, ids, edits, req, out, cancel, gate),
                     name="saelab-steer", daemon=True).start()
    # no-cache, not no-store: Chromium reports a no-store fetch stream read to EOF as aborted
    # (microsoft/playwright#42742); a POST answer is never cached either way.
    return StreamingResponse(_events(out, cancel), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


# -- monitor -------------------------------------------------------------------------------------

@router.post("/monitor/scan", summary="Scan a text against a watchlist; alerts per token and feature")
def api_scan(req: ScanRequest, request: Request):
    check_text(request, req.text)
    state, gate = request.app.state.run, request.app.state.gate
    with gate.held():
        model, sae = state.model(), state.sae()
        given = {w.feature: w.threshold for w in req.watch if w.threshold is not None}
        watch = Watchlist.build(sae, [w.feature for w in req.watch], given, db=state.db)
        alerts = list(scan(model, sae, [req.text], watch))
    pieces, starts = segments(model.tokenizer, req.text)
    index = {s: i for i, s in enumerate(starts)}
    return {"tokens": pieces, "thresholds": {str(f): t for f, t in watch.thresholds.items()},
            "alerts": [{**a.to_json(), "token_index": index.get(a.offset), "threshold": watch.thresholds[a.feature]}
                       for a in alerts]}
