"""Explanations of features (offline and by an LLM) and their detection scores.

An explanation is one line of text saying what a feature fires on. Two explainers write them:

* ``offline_explanation``: no LLM. It reads the activation-weighted top tokens of the top and
  quantile examples, their common left context, position patterns derivable from the token strings
  (start of an (indented) line, inside a string or comment) and the promoted logit tokens, and says
  e.g. "fires on ` self` (92%), at the start of an indented line; promotes `.`; e.g. “def f(self):⏎   [ self].x”".
* ``saelab.llm.llm_explanation``: any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, Ollama,
  llama.cpp, OpenAI), prompted as in Bills et al. 2023, "Language models can explain neurons in
  language models": the examples with the high-activation tokens marked ``<<like this>>``.

Scoring is *detection* (EleutherAI's "Automatically Interpreting Millions of Features", 2024): a
judge sees held-out contexts where the feature fires and contexts where it does not, predicts from
the explanation alone whether it fires, and the score is the balanced accuracy (TPR + TNR) / 2;
0.5 is chance. ``OfflineJudge`` matches the quoted tokens and patterns of an offline explanation;
``saelab.llm.LLMJudge`` asks the LLM yes/no per context, several contexts per request.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

from saelab.locks import exclusive
from saelab.themes import content_words, context_theme, word_rates

__all__ = ["Example", "FeatureRecord", "ExplanationResult", "OfflineJudge", "offline_explanation", "detection_score",
           "explain_and_score", "explain_db", "record_from_db", "heldout_split", "parse_feature_selection",
           "parse_explanation", "token_patterns", "quote_token", "UnusableReply"]


class Example(NamedTuple):
    """One token window: the token strings (exact boundaries, raw text) and the feature's activation on each."""

    tokens: list[str]
    acts: list[float]


@dataclass(frozen=True)
class FeatureRecord:
    """Everything the explainers read about one feature (a features.db row and its examples)."""

    id: int
    """Feature index in the SAE."""
    density: float = 0.0
    """Fraction of analysed tokens on which the feature fires."""
    max_act: float = 0.0
    """Largest activation seen in the analysis pass."""
    top: Sequence[Example] = ()
    """Top-activating windows, strongest first."""
    quantile: Sequence[Example] = ()
    """Windows sampled from activation quantiles (weaker firings)."""
    random: Sequence[Example] = ()
    """Random windows; those where the feature never fires are the negatives for scoring."""
    positive_logits: Sequence[tuple[str, float]] = ()
    """Tokens whose logits the decoder direction raises most, (token, value), largest first."""
    negative_logits: Sequence[tuple[str, float]] = ()
    """Tokens whose logits it lowers most."""


class UnusableReply(Exception):
    """An explainer's reply for one feature that cannot be used (:func:`explain_db` skips the feature)."""


class ExplanationResult(NamedTuple):
    explanation: str
    score: float | None  # balanced detection accuracy; None when there were no held-out negatives/positives
    n_pos: int
    n_neg: int


def _examples(rows) -> tuple[Example, ...]:
    return tuple(Example(list(r["tokens"]), [float(a) for a in r["acts"]]) for r in rows)


def record_from_db(db, feature_id: int) -> FeatureRecord:
    """Build a FeatureRecord from a ``FeatureDB`` (``feature``, ``examples``, ``logit_effects``)."""
    row = db.feature(feature_id)
    logits = db.logit_effects(feature_id)
    return FeatureRecord(
        id=int(feature_id), density=float(row["density"]), max_act=float(row["max_act"]),
        top=_examples(db.examples(feature_id, kind="top")),
        quantile=_examples(db.examples(feature_id, kind="quantile")),
        random=_examples(db.examples(feature_id, kind="random")),
        positive_logits=tuple((str(t), float(v)) for t, v in logits["positive"]),
        negative_logits=tuple((str(t), float(v)) for t, v in logits["negative"]))


def heldout_split(record: FeatureRecord) -> tuple[FeatureRecord, list[Example], list[Example]]:
    """Split a record into (what the explainer may see, held-out positives, negatives).

    The explainer sees the top examples and every other quantile example; the other quantile examples
    and the random windows where the feature fires are the positives, so the score asks whether the
    explanation generalises over the activation range, not whether it recalls what it was built from.
    The random windows where the feature never fires are the negatives.
    """
    seen_q = [e for i, e in enumerate(record.quantile) if i % 2 == 0]
    pos = [e for i, e in enumerate(record.quantile) if i % 2 == 1]
    pos += [e for e in record.random if max(e.acts, default=0.0) > 0]
    neg = [e for e in record.random if max(e.acts, default=0.0) <= 0]
    seen = FeatureRecord(record.id, record.density, record.max_act, record.top, tuple(seen_q), (),
                         record.positive_logits, record.negative_logits)
    return seen, pos, neg


def parse_feature_selection(spec: str, n_features: int) -> list[int]:
    """``"all"``, ``"7"``, ``"0-99"`` or ``"1,5,10-20"`` → sorted feature ids, checked against ``n_features``."""
    if spec.strip().lower() == "all":
        return list(range(n_features))
    ids: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"bad feature selection {spec!r}: use 'all', '7', '0-99' or '1,5,10-20'")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo or hi >= n_features:
            raise ValueError(f"feature range {part.strip()!r} is outside 0-{n_features - 1} (the SAE has "
                             f"{n_features} features)")
        ids.update(range(lo, hi + 1))
    return sorted(ids)


# -- where a token sits: position patterns derived from the token strings -----------------------------

_CODE, _STR, _COMMENT = 0, 1, 2
PATTERNS = {"indented": "at the start of an indented line", "line_start": "at the start of a line",
            "string": "inside a string", "comment": "inside a comment"}


def _char_states(text: str) -> list[int]:
    """Lexer state before each character of Python-ish text: code, string or comment.

    Opening quotes count as code (a feature on `"` itself is not "inside a string"). A window may
    start mid-string; the lexer then sees the string inverted until the next newline resyncs it,
    which is the price of not seeing text before the window.
    """
    states, state, quote, i = [_CODE] * len(text), _CODE, "", 0
    while i < len(text):
        c = text[i]
        if state == _CODE:
            if c == "#":
                state = _COMMENT
            elif c in "\"'":
                quote = text[i:i + 3] if text[i:i + 3] in ('"""', "'''") else c
                i, state = i + len(quote), _STR
                continue
        elif state == _COMMENT:
            states[i] = _COMMENT
            state = _CODE if c == "\n" else _COMMENT
        else:
            states[i] = _STR
            if c == "\\":
                states[i + 1:i + 2] = [_STR] * len(states[i + 1:i + 2])
                i += 2
                continue
            if text.startswith(quote, i):
                states[i:i + len(quote)] = [_STR] * len(quote)
                i, state = i + len(quote), _CODE
                continue
            if c == "\n" and len(quote) == 1:
                state = _CODE
        i += 1
    return states


def token_patterns(tokens: Sequence[str]) -> list[frozenset[str]]:
    """For each token, the names of PATTERNS that hold for it (judged at its first non-space character)."""
    text = "".join(tokens)
    states = _char_states(text)
    out, start = [], 0
    for tok in tokens:
        stripped = len(tok) - len(tok.lstrip())
        j = start + stripped if stripped < len(tok) else start
        pats = set()
        if stripped < len(tok):  # the token has content; is it the first on its line?
            line_begin = text.rfind("\n", 0, j)
            if line_begin >= 0 and text[line_begin + 1:j].strip(" \t") == "":
                pats.add("indented" if j > line_begin + 1 else "line_start")
        if j < len(states) and states[j] == _STR:
            pats.add("string")
        if j < len(states) and states[j] == _COMMENT:
            pats.add("comment")
        out.append(frozenset(pats))
        start += len(tok)
    return out


# -- offline explainer ------------------------------------------------------------------------------

def quote_token(tok: str) -> str:
    """A token in backticks with its whitespace kept and control characters escaped: ` self`, `\\n`."""
    esc = tok.replace("\\", "\\\\").replace("`", "\\`").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return f"`{esc}`"


_QUOTED = re.compile(r"`((?:[^`\\]|\\.)*)`")
_UNESC = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "`": "`"}


_SYMBOLS = {"(": "opening parenthesis", ")": "closing parenthesis", "[": "opening bracket", "]": "closing bracket",
            "{": "opening brace", "}": "closing brace", ":": "colon", ",": "comma", ".": "dot", "=": "equals sign",
            "_": "underscore", "#": "hash", '"': "double quote", "'": "single quote", "@": "at sign", "*": "star",
            "-": "minus", "+": "plus", "/": "slash", "%": "percent", "<": "less-than", ">": "greater-than"}


def token_words(tok: str) -> str | None:
    """Words for a token whose backticked form is hard to read: whitespace ("line break + 4 spaces") and
    lone symbols ("opening parenthesis"); None for ordinary tokens."""
    if tok and not tok.strip():
        breaks, spaces, tabs = tok.count("\n"), tok.count(" "), tok.count("\t")
        parts = [f"{n} {word}s" if n > 1 else word for n, word in ((breaks, "line break"), (spaces, "space"),
                                                                   (tabs, "tab")) if n]
        return " + ".join(parts).replace("2 line breaks", "blank line")
    return _SYMBOLS.get(tok.strip()) if len(tok.strip()) == 1 else None


def example_snippet(examples: Sequence[Example], before: int = 5, after: int = 2, width: int = 48) -> str:
    """The context around the strongest activation, in words: ``“import os, [sys]”`` with the firing token in
    brackets and line breaks as ⏎ (no backticks, so the offline grammar's parser never reads it as a token)."""
    best = max(((ex, i) for ex in examples for i, a in enumerate(ex.acts) if a > 0), key=lambda p: p[0].acts[p[1]],
               default=None)
    if best is None:
        return ""
    ex, i = best
    clean = lambda ts: "".join(ts).replace("`", "'").replace("\n", "⏎").replace("\t", " ")  # noqa: E731
    left, right = clean(ex.tokens[max(0, i - before):i]), clean(ex.tokens[i + 1:i + 1 + after])
    text = f"{left[-width:]}[{clean([ex.tokens[i]])}]{right[:width // 3]}"
    return f"“{text}”"


def _unquote(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: _UNESC.get(m[1], m[1]), body)


def _shares(weights: dict[str, float]) -> list[tuple[str, float]]:
    """(key, share of total weight), largest first; ties broken by the key so output is deterministic."""
    total = sum(weights.values())
    return sorted(((k, w / total) for k, w in weights.items()), key=lambda kv: (-kv[1], kv[0])) if total > 0 else []


def _firing_stats(examples: Sequence[Example]):
    """Activation-weighted counts of firing tokens, their left neighbours, and patterns (with base rates)."""
    tok_w, prev_w, pat_w = defaultdict(float), defaultdict(float), defaultdict(float)
    base, n_tokens, total = defaultdict(int), 0, 0.0
    for ex in examples:
        pats = token_patterns(ex.tokens)
        for i, (tok, act) in enumerate(zip(ex.tokens, ex.acts)):
            n_tokens += 1
            for p in pats[i]:
                base[p] += 1
            if act <= 0:
                continue
            total += act
            tok_w[tok] += act
            if i > 0:
                prev_w[ex.tokens[i - 1]] += act
            for p in pats[i]:
                pat_w[p] += act
    return tok_w, prev_w, {p: w / total for p, w in pat_w.items()}, {p: c / max(n_tokens, 1) for p, c in base.items()}


def offline_explanation(record: FeatureRecord, background: dict[str, float] | None = None) -> str:
    """A deterministic one-line explanation from examples and logit effects (no LLM).

    Grammar (``OfflineJudge`` parses it back):
    ``fires on TOKENS[ after CONTEXT][, PATTERN...][; in contexts about THEME][; promotes LOGITS][; e.g. “SNIP”]``
    where TOKENS are backticked tokens with their share of the activation mass (whitespace and lone symbols also
    named in words), or ``diverse tokens, e.g. ...`` when no token holds 20% of it; THEME is the content words
    shared by the example windows and rarer in the corpus (:func:`context_theme`; ``background`` is the corpus
    windows' :func:`word_rates`); SNIP is the strongest example's context with the firing token in brackets.
    The theme is words, not backticked tokens: the judge (detection score) does not read it.
    """
    tok_w, prev_w, pat_frac, base = _firing_stats(list(record.top) + list(record.quantile))
    shares = _shares(tok_w)
    if not shares:
        return "never fires in the analysed tokens"
    if shares[0][1] < 0.2:
        text = "fires on diverse tokens, e.g. " + ", ".join(quote_token(t) for t, _ in shares[:3])
    else:
        chosen, cum = [], 0.0
        for tok, s in shares[:4]:
            if chosen and (s < 0.1 or cum >= 0.8):
                break
            words = token_words(tok)
            chosen.append(f"{quote_token(tok)} ({words + ', ' if words else ''}{round(100 * s)}%)")
            cum += s
        text = "fires on " + ", ".join(chosen)
    # A pattern is reported when it carries most of the activation mass and is rarer among all tokens.
    pats = [p for p in PATTERNS if pat_frac.get(p, 0) >= 0.6 and pat_frac.get(p, 0) >= base.get(p, 0) + 0.25]
    if "indented" in pats or pat_frac.get("indented", 0) + pat_frac.get("line_start", 0) < 0.6:
        pats = [p for p in pats if p != "line_start"]
    elif "line_start" not in pats and pat_frac.get("indented", 0) + pat_frac.get("line_start", 0) >= 0.8:
        pats.insert(0, "line_start")  # indented and not: all at line starts, neither alone dominant
    # Left context: the one or two previous tokens (each >= 25% of the mass) that together carry >= 60% of it.
    ctx = [t for t, s in _shares(prev_w)[:2] if s >= 0.25]
    if sum(s for t, s in _shares(prev_w)[:2] if t in ctx) < 0.6:
        ctx = []
    if ctx and all(t.strip() == "" for t in ctx) and {"indented", "line_start"} & set(pats):
        ctx = []  # "after `\n    `" says nothing that "at the start of an indented line" does not
    if ctx:
        text += " after " + " or ".join(quote_token(t) for t in ctx)
    text += "".join(", " + PATTERNS[p] for p in pats)
    named = {w for tok, _ in shares[:4] for w in content_words([tok])}
    theme = context_theme(list(record.top) + list(record.quantile), background, exclude=named)
    if theme:
        text += "; in contexts about " + ", ".join(theme)
    if record.positive_logits:
        text += "; promotes " + ", ".join(quote_token(t) for t, _ in record.positive_logits[:3])
    snippet = example_snippet(list(record.top) + list(record.quantile))
    return text + (f"; e.g. {snippet}" if snippet else "")


class ParsedExplanation(NamedTuple):
    tokens: frozenset[str]
    after: frozenset[str]
    patterns: frozenset[str]


def parse_explanation(text: str) -> ParsedExplanation:
    """Key tokens, left context and patterns of an explanation (offline grammar; any backticked tokens otherwise).

    Scans quoted tokens and the unquoted gaps between them, so a token such as `` after`` or ``;`` inside
    backticks cannot be mistaken for the grammar's keywords.
    """
    sections: dict[str, set[str]] = {"tokens": set(), "after": set(), "promotes": set()}
    section, pos, gaps = "tokens", 0, []
    for m in list(_QUOTED.finditer(text)) + [None]:
        gap = text[pos:m.start() if m else len(text)]
        if section != "promotes":
            if "; promotes" in gap:
                gaps.append(gap.split("; promotes", 1)[0])
                section = "promotes"
            else:
                gaps.append(gap)
                section = "after" if re.search(r"\bafter\s*$", gap) else section
        if m:
            sections[section].add(_unquote(m[1]))
            pos = m.end()
    unquoted = "".join(gaps)
    return ParsedExplanation(tokens=frozenset(sections["tokens"]), after=frozenset(sections["after"]),
                             patterns=frozenset(p for p, phrase in PATTERNS.items() if phrase in unquoted))


# -- detection scoring ------------------------------------------------------------------------------

Judge = Callable[[str, list[list[str]]], list[bool]]


@dataclass(frozen=True)
class OfflineJudge:
    """Predicts "fires" when some token of the context is one of the explanation's quoted tokens and
    also satisfies its stated left context and position patterns. Deterministic, no LLM; an
    explanation without backticked tokens predicts "never fires" (scores 0.5)."""

    def __call__(self, explanation: str, contexts: list[list[str]]) -> list[bool]:
        parsed = parse_explanation(explanation)
        return [self._fires(parsed, ctx) for ctx in contexts]

    @staticmethod
    def _fires(parsed: ParsedExplanation, tokens: list[str]) -> bool:
        pats = token_patterns(tokens) if parsed.patterns else None
        for i, tok in enumerate(tokens):
            if tok not in parsed.tokens:
                continue
            if parsed.after and (i == 0 or tokens[i - 1] not in parsed.after):
                continue
            if pats is not None and not _patterns_hold(parsed.patterns, pats[i]):
                continue
            return True
        return False


def _patterns_hold(wanted: frozenset[str], have: frozenset[str]) -> bool:
    # "at the start of a line" covers indented line starts too.
    return all(p in have or (p == "line_start" and "indented" in have) for p in wanted)


def detection_score(explanation: str, examples_pos: Sequence, examples_neg: Sequence, judge: Judge) -> float:
    """Balanced accuracy (TPR + TNR) / 2 of ``judge`` telling firing contexts from non-firing ones.

    ``examples_pos`` / ``examples_neg``: held-out windows (``Example`` or token-string lists) where the
    feature does / does not fire. The contexts go to the judge in a fixed shuffled order so an LLM judge
    cannot learn "the first half are positive" from a batch.
    """
    if not examples_pos or not examples_neg:
        raise ValueError(f"detection scoring needs held-out positives and negatives; got {len(examples_pos)} "
                         f"positive and {len(examples_neg)} negative contexts")
    items = [(list(getattr(e, "tokens", e)), True) for e in examples_pos]
    items += [(list(getattr(e, "tokens", e)), False) for e in examples_neg]
    random.Random(0).shuffle(items)
    preds = judge(explanation, [ctx for ctx, _ in items])
    if len(preds) != len(items):
        raise ValueError(f"judge returned {len(preds)} predictions for {len(items)} contexts")
    tp = sum(p and y for p, (_, y) in zip(preds, items))
    tn = sum(not p and not y for p, (_, y) in zip(preds, items))
    return 0.5 * (tp / len(examples_pos) + tn / len(examples_neg))


def explain_and_score(record: FeatureRecord, *, client=None, judge: Judge | None = None) -> ExplanationResult:
    """Explain from the non-held-out part of ``record`` (by ``client`` when given: anything with
    ``explain(record) -> str``, such as :class:`saelab.llm.LLMClient`; else offline) and score on the
    held-out part (``heldout_split``) with ``judge`` (default ``OfflineJudge``).
    The score is None when the record has no held-out positives or no negatives."""
    seen, pos, neg = heldout_split(record)
    # the offline theme's background: the random windows as a sample of the corpus (their words only; the
    # judge never reads the theme, so the held-out labels cannot leak into the score through it)
    text = client.explain(seen) if client is not None else offline_explanation(seen, word_rates(record.random))
    score = detection_score(text, pos, neg, judge or OfflineJudge()) if pos and neg else None
    return ExplanationResult(text, score, len(pos), len(neg))


def explain_db(db, feature_ids: Sequence[int], *, client=None, judge: Judge | None = None, skip_existing: bool = False,
               flush_every: int = 25, progress: Callable[[], None] | None = None) -> dict[int, ExplanationResult]:
    """Explain and score ``feature_ids`` of a writable ``FeatureDB``, storing them with ``db.set_explanations``.

    Dead features (no top examples) are skipped. Results are flushed every ``flush_every`` features, so a
    run that dies (e.g. the LLM endpoint goes away) keeps what it paid for; ``skip_existing`` then skips
    the features that already have an explanation from the same source (``offline`` or ``llm:MODEL``).
    A feature whose LLM reply cannot be parsed is left unexplained (:class:`UnusableReply`, e.g.
    ``saelab.llm.LLMReplyError``) and the run goes on. The database's lock is held throughout: a second
    explain, or an analysis that would rename a new database over these edits, is refused meanwhile.
    """
    with exclusive(db.path, "explain", "feature database"):
        return _explain_all(db, feature_ids, client, judge, skip_existing, flush_every, progress)


def _explain_all(db, feature_ids, client, judge, skip_existing, flush_every, progress) -> dict[int, ExplanationResult]:
    source = f"llm:{client.model}" if client is not None else "offline"
    results: dict[int, ExplanationResult] = {}
    pending: list[tuple[int, str, str, float | None]] = []
    try:
        for i in feature_ids:
            if not (skip_existing and db.feature(i)["explanation_source"] == source):
                record = record_from_db(db, i)
                try:
                    result = explain_and_score(record, client=client, judge=judge) if record.top else None
                except UnusableReply:
                    result = None
                if result is not None:
                    results[i] = result
                    pending.append((i, result.explanation, source, result.score))
            if len(pending) >= flush_every:
                db.set_explanations(pending)
                pending = []
            if progress is not None:
                progress()
    finally:
        if pending:
            db.set_explanations(pending)
    return results
