"""API endpoints that run the model: inspect, steer (JSON and streamed), monitor.

Each takes the app's :class:`~saelab.web.guard.ModelGate` before touching the model, so there is
one model call at a time; a full queue or a long wait answers 503. Streamed steering holds the gate
from the request until its generation thread ends (bounded by ``max_new_tokens``), and stops early
when the client goes away.
"""

from __future__ import annotations

import json
import logging
import queue
import threading

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from transformers.generation.streamers import BaseStreamer

from saelab.monitor import Watchlist, scan
from saelab.steer import Ablate, Add, Clamp, compare_generations, generate_ids, prompt_ids, steering
from saelab.textfeatures import inspect_text
from saelab.web.api import InspectRequest, ScanRequest, SteerRequest, check_text, explanations

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
        result = inspect_text(sae, model, req.text, req.top)
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


# -- steer ---------------------------------------------------------------------------------------

def edits_of(req: SteerRequest, request: Request) -> dict:
    cfg = request.app.state.config
    check_text(request, req.prompt, "prompt")
    if req.max_new_tokens > cfg.max_new_tokens:
        raise HTTPException(422, f"max_new_tokens is {req.max_new_tokens}; this server generates at most "
                                 f"{cfg.max_new_tokens}")
    if len(req.features) > cfg.max_steer_features:
        raise HTTPException(422, f"{len(req.features)} features; steer at most {cfg.max_steer_features} at once")
    ids = [f.id for f in req.features]
    if len(set(ids)) != len(ids):
        raise HTTPException(422, "each feature may have only one dial")
    make = {"clamp": lambda v: Clamp(v), "add": lambda v: Add(v), "ablate": lambda v: Ablate()}
    return {f.id: make[f.mode](f.value) for f in req.features}


@router.post("/steer", summary="Default and steered continuations side by side (whole texts)")
def api_steer(req: SteerRequest, request: Request):
    edits = edits_of(req, request)
    state, gate = request.app.state.run, request.app.state.gate
    with gate.held():
        model, sae = state.model(), state.sae()
        (c,) = compare_generations(model, sae, req.prompt, edits, max_new_tokens=req.max_new_tokens, samples=1,
                                   seed=req.seed, temperature=req.temperature, db=state.db)
    return {"prompt": req.prompt, "default": c.default_text, "steered": c.steered_text,
            "steered_tokens": c.steered_tokens, "steered_acts": {str(k): v for k, v in c.steered_acts.items()}}


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
        for side, side_edits in (("default", {}), ("steered", edits)):
            out.put({"type": "status", "text": f"generating the {side} continuation…"})
            streamer = _QueueStreamer(model.tokenizer, side, out, cancel)
            with steering(model, sae, side_edits, db=state.db):
                generate_ids(model, ids, max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                             seed=req.seed, streamer=streamer)
        out.put({"type": "done"})
    except _Cancelled:
        log.info("steering stream cancelled by the client")
    except Exception as e:  # reported to the client as an event: the HTTP status is already sent
        log.exception("steering stream failed")
        out.put({"type": "error", "detail": str(e)})
    finally:
        gate.release()
        out.put(None)


def _events(out: queue.Queue, cancel: threading.Event):
    try:
        while (msg := out.get()) is not None:
            yield f"data: {json.dumps(msg)}\n\n"
    finally:
        cancel.set()


@router.post("/steer/stream", summary="Default then steered continuation, streamed as server-sent events",
             description="Events are JSON lines after 'data: ': {type: token, side: default|steered, text}, "
                         "{type: status, text}, {type: error, detail}, {type: done}.")
def api_steer_stream(req: SteerRequest, request: Request):
    edits = edits_of(req, request)
    state, gate = request.app.state.run, request.app.state.gate
    gate.acquire()
    try:
        model, sae = state.model(), state.sae()
        ids = prompt_ids(model, req.prompt, req.max_new_tokens)  # ValueError (too long) → 422
        with steering(model, sae, edits, db=state.db):  # unknown or dead features, bad hook: 422 before streaming
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
