"""Monitoring: watch chosen features while a model reads or writes, and act when they fire.

A :class:`Watchlist` names features and the activation above which each one raises an
:class:`Alert`. Default threshold (when none is given for a feature):

- with a features.db histogram: the ``quantile`` (default 0.999) of the feature's activation over
  *all* tokens of the analysis corpus, zeros included. A dense feature then alerts only on its
  strongest firings, while a feature rarer than 1 - quantile alerts whenever it fires (threshold 0);
- otherwise ``fraction`` (default 0.5) × the feature's max activation (features.db or saelab.json).

:func:`scan` reads texts and yields alerts as it goes (JSONL in, JSONL out with :func:`scan_jsonl`).
:func:`watch_generate` watches generation token by token with a policy: ``log`` (just alert),
``ablate`` (clamp the watched feature to 0 at the positions where it fires, in the same forward
pass) or ``abort`` (stop at the first generated token on which a watched feature fires; that token
is withheld from the returned text).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence, TextIO

import torch

from saelab.corpus import bos_token_id
from saelab.featuredb import FeatureDB
from saelab.hooks import as_module, intervene, resolve, run_to_hooks
from saelab.provenance import DEFAULT_CONTEXT, Provenance
from saelab.steer import check_feature, check_width, max_activations, sae_hook_name
from saelab.texts import parse_texts
from saelab.generation import as_loaded_model, generate_ids, generated_part, model_context, prompt_ids

DEFAULT_QUANTILE = 0.999
FALLBACK_FRACTION = 0.5
POLICIES = ("log", "ablate", "abort")


def _open_db(db):
    if isinstance(db, (str, Path)):
        return FeatureDB.open(db)
    return db


def histogram_quantile(hist: Mapping, q: float) -> float | None:
    """The q-quantile of a feature's activation over all analysed tokens from a features.db histogram
    (``zeros`` + log-spaced bins of the non-zero activations); None when the histogram is empty."""
    counts, edges = hist["counts"], hist["edges"]
    total = hist["zeros"] + sum(counts)
    if not counts or total == 0:
        return None
    rank = q * total
    if rank <= hist["zeros"]:
        return 0.0
    seen = hist["zeros"]
    for j, c in enumerate(counts):
        if c and seen + c >= rank:
            lo, hi, t = edges[j], edges[j + 1], (rank - seen) / c
            return lo * (hi / lo) ** t if lo > 0 else lo + t * (hi - lo)  # geometric inside a log-spaced bin
        seen += c
    return float(edges[-1])


@dataclass
class Watchlist:
    """Features to watch, each with its alert threshold (raw activation units)."""

    thresholds: dict[int, float]
    """feature id → an alert fires where its activation is strictly above this value."""
    explanations: dict[int, str] = field(default_factory=dict)
    """feature id → explanation from features.db, where known."""

    @classmethod
    def build(cls, sae, features: Sequence[int], thresholds=None, db=None, quantile: float = DEFAULT_QUANTILE,
              fraction: float = FALLBACK_FRACTION, max_act=None) -> "Watchlist":
        """``thresholds``: None, one number for all, or {feature: threshold}; missing ones get the default."""
        if not features:
            raise ValueError("the watchlist is empty: name at least one feature to watch")
        if not 0 < quantile < 1 or not 0 < fraction:
            raise ValueError(f"need 0 < quantile < 1 and fraction > 0, got {quantile}, {fraction}")
        db = _open_db(db)
        given = thresholds if isinstance(thresholds, Mapping) else \
            {} if thresholds is None else {f: thresholds for f in features}
        out, notes = {}, {}
        for f in features:
            check_feature(sae, f)
            row = db.feature(f) if db is not None else None
            if row is not None and row.get("explanation"):
                notes[f] = row["explanation"]
            if f in given:
                value = given[f]
            else:
                value = histogram_quantile(db.histogram(f), quantile) if db is not None else None
                if value is None:
                    value = fraction * max_activations(sae, [f], max_act, db)[f]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"feature {f}: the threshold must be a finite number, got {value!r}")
            out[f] = float(value)
        return cls(out, notes)


class Alert(NamedTuple):
    text_index: int
    """Which text of the stream (0 for a generation)."""
    offset: int
    """Character offset of the token in the text (for generation: in prompt + completion)."""
    token: str
    """The token's text."""
    position: int
    """Token index in the sequence the model saw (BOS is position 0)."""
    feature: int
    explanation: str | None
    activation: float

    def to_json(self) -> dict:
        return self._asdict()


def _context(model, sae, context: int | None) -> int:
    """The window for scanning texts: the caller's, else the SAE's training context, else the default every
    stage uses; capped at the model's positions."""
    limit = model_context(model.model)
    ctx = int(context or Provenance.of(sae).context or DEFAULT_CONTEXT)
    return min(ctx, limit) if limit else ctx


def _firings(fire: torch.Tensor, z: torch.Tensor, feats: Sequence[int]):
    """``(row, feature, activation)`` for every True entry of ``fire [seq, n]``."""
    rows, cols = fire.nonzero(as_tuple=True)
    return [(int(r), feats[int(c)], float(z[r, c])) for r, c in zip(rows, cols)]


@torch.no_grad()
def scan(model, sae, texts: Iterable[str], watchlist: Watchlist, *, hook: str | None = None,
         context: int | None = None, prepend_bos: bool = True) -> Iterator[Alert]:
    """Alerts for every token of every text where a watched feature exceeds its threshold, streaming.

    Texts longer than the context are read in consecutive windows (each starting with BOS).
    """
    model = as_loaded_model(model, need_lm_head=False)  # reading needs no LM head: encoders work too
    name = hook or sae_hook_name(sae)
    resolve(model.model, name)
    feats = sorted(watchlist.thresholds)
    enc = sae.subset_encoder(feats, model.device)
    thr = torch.tensor([watchlist.thresholds[f] for f in feats], device=model.device)
    tok, bos = model.tokenizer, bos_token_id(model.tokenizer)
    window = _context(model, sae, context) - int(prepend_bos)
    for t_index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text {t_index}: expected a string, got {type(text).__name__}")
        enc_text = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = enc_text["input_ids"], enc_text["offset_mapping"]
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window]
            x = run_to_hooks(model.model, torch.tensor([[bos] * prepend_bos + chunk], device=model.device), name)[name]
            check_width(x, sae.cfg.d_in, name)
            z = enc(x[0])[int(prepend_bos):]  # (len(chunk), n_feats)
            for row, f, act in _firings(z > thr, z, feats):
                a, b = spans[start + row]
                yield Alert(t_index, int(a), text[a:b], start + row + int(prepend_bos), f,
                            watchlist.explanations.get(f), act)


def scan_jsonl(model, sae, lines: Iterable[str], watchlist: Watchlist, out: TextIO, **kwargs) -> int:
    """Stream JSONL texts in, JSONL alerts out (one line per alert, flushed); returns the alert count."""
    n = 0
    for alert in scan(model, sae, parse_texts(lines), watchlist, **kwargs):
        out.write(json.dumps(alert.to_json()) + "\n")
        out.flush()
        n += 1
    return n


# -- watching generation ------------------------------------------------------------------------------

class WatchHook:
    """Hook that watches the features at each position the model reads, and ablates under ``ablate``.

    It counts positions across the calls of one generation (KV cache: the prompt first, then one token
    per step), so each firing is known by its absolute position in the sequence.
    """

    def __init__(self, sae, watchlist: Watchlist, hook: str, policy: str, start: int, device):
        self.feats = sorted(watchlist.thresholds)
        self.encoder = sae.subset_encoder(self.feats, device)
        self.thr = torch.tensor([watchlist.thresholds[f] for f in self.feats], device=device)
        self.W = sae.W_dec.detach()[self.feats].to(device=device, dtype=torch.float32)  # (n, d_in)
        self.hook, self.d_in, self.policy = hook, sae.cfg.d_in, policy
        self.pos, self.start = 0, start
        self.fired: list[tuple[int, int, float]] = []  # (position, feature, activation)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (1, seq, d_in)
        check_width(x, self.d_in, self.hook)
        z = self.encoder(x[0])  # (seq, n)
        pos = torch.arange(self.pos, self.pos + x.shape[1], device=x.device)
        fire = (z > self.thr) & (pos >= self.start)[:, None]  # (seq, n); positions before `start` unwatched
        first, self.pos = self.pos, self.pos + x.shape[1]
        if not fire.any():
            return x
        self.fired.extend((first + r, f, a) for r, f, a in _firings(fire, z, self.feats))
        if self.policy == "ablate":  # z_f := 0 where it fires: x − z_f·W_dec[f] (see steer.SteeringHook)
            return x.float() - (z * fire) @ self.W
        return x

    @property
    def first_fire(self) -> int | None:
        return self.fired[0][0] if self.fired else None


class WatchResult(NamedTuple):
    text: str
    """The completion (under ``abort``: up to, not including, the first firing token)."""
    alerts: list[Alert]
    aborted: bool
    """True when the abort policy stopped generation."""
    ids: list[int]
    """Prompt and completion token ids (BOS first)."""


class _StopOnFire:
    def __init__(self, hook: WatchHook):
        self.hook = hook

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.hook.first_fire is not None, dtype=torch.bool,
                          device=input_ids.device)


@torch.no_grad()
def watch_generate(model, sae, prompt: str, watchlist: Watchlist, policy: str = "log", *, max_new_tokens: int = 64,
                   temperature: float = 1.0, seed: int = 0, watch_prompt: bool = False,
                   hook: str | None = None) -> WatchResult:
    """Generate one continuation while watching; see the module docstring for the policies."""
    from transformers import StoppingCriteriaList

    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    model, name = as_loaded_model(model), hook or sae_hook_name(sae)
    resolve(model.model, name)
    ids = prompt_ids(model, prompt, max_new_tokens)
    n = ids.shape[1]
    watcher = WatchHook(sae, watchlist, name, policy, 0 if watch_prompt else n, model.device)
    stop = StoppingCriteriaList([_StopOnFire(watcher)]) if policy == "abort" else None
    with intervene(as_module(model), {name: watcher}):
        out = generate_ids(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                           stopping_criteria=stop)[0]
        seq = _cut_at_eos(model, out, n)
        if watcher.pos < len(seq) and not (policy == "abort" and watcher.first_fire is not None):
            # generate never feeds its last token back in: read the unseen tail in one more pass
            watcher.start, watcher.pos = max(watcher.start, watcher.pos), 0
            model.model(input_ids=seq[None], use_cache=False)
    aborted = policy == "abort" and watcher.first_fire is not None
    keep = max(watcher.first_fire, n) if aborted else len(seq)
    return _result(model, prompt, seq.tolist(), keep, n, watcher, watchlist, aborted)


def _cut_at_eos(model, out: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([out[:n], generated_part(model, out, n)])


def _result(model, prompt, ids: list[int], keep: int, n: int, watcher: WatchHook, watchlist: Watchlist,
            aborted: bool) -> WatchResult:
    """Alerts with offsets and tokens; ``ids[:keep]`` is what is returned (abort withholds the rest)."""
    tok = model.tokenizer
    alerts = []
    for pos, f, act in sorted(watcher.fired):
        if aborted and pos > watcher.first_fire:
            continue
        if pos >= n:  # generated token: offset into prompt + completion
            offset = len(prompt) + len(tok.decode(ids[n:pos], skip_special_tokens=True))
        else:  # prompt token (watch_prompt): offset of its text within the prompt
            offset = len(tok.decode(ids[1:pos], skip_special_tokens=True)) if pos > 0 else 0
        alerts.append(Alert(0, offset, tok.decode([ids[pos]]), pos, f, watchlist.explanations.get(f), act))
    return WatchResult(tok.decode(ids[n:keep], skip_special_tokens=True), alerts, aborted, ids[:keep])
