"""What a feature's contexts are about: content words, their corpus background, and a shared theme.

Windows are :class:`saelab.explain.Example`-like (``tokens``, ``acts``); the offline explainer names a theme
with :func:`context_theme`, and the map names clusters without :data:`FUNCTION_WORDS`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

# English function words: they say how a text is built, not what it is about (a context's theme is named
# by its content words; a map cluster too, see saelab.fmap).
FUNCTION_WORDS = frozenset("""a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most my myself no
nor not now of off on once only or other our ours ourselves out over own same she should so some such than that
the their theirs them themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves one two may might must
shall us let get got like yes okay ok oh well much many every another something anything nothing someone
anyone everyone thing things way really""".split())
_WORD = re.compile(r"[A-Za-z][a-z]{2,}")
_SPECIAL = re.compile(r"<\|[^|<>]*\|>")
THEME_MIN_SHARE = 0.3
"""A theme word is in at least this share of the feature's example windows (and in 3 of them)..."""
THEME_LIFT = 3.0
"""...and that share is at least this many times its share of the corpus windows (the background)."""


def content_words(tokens: Sequence[str]) -> set[str]:
    """The content words of a window: lower-cased words of 3+ letters that are not English function words
    (special tokens such as ``<|endoftext|>`` or ``<|im_start|>`` left out)."""
    text = "".join(" " if t.startswith("<") and t.endswith(">") else t for t in tokens)
    return {w.lower() for w in _WORD.findall(_SPECIAL.sub(" ", text))} - FUNCTION_WORDS


def word_rates(windows: Sequence) -> dict[str, float]:
    """Share of ``windows`` that contain each content word: the corpus background for :func:`context_theme`."""
    counts: Counter = Counter(w for ex in windows for w in content_words(ex.tokens))
    return {w: c / len(windows) for w, c in counts.items()} if windows else {}


def context_theme(examples: Sequence, background: dict[str, float] | None = None, n: int = 4,
                  exclude: set[str] = frozenset()) -> list[str]:
    """The shared theme of a feature's contexts: content words found in many of its windows (``THEME_MIN_SHARE``)
    and over-represented against the corpus windows ``background`` (``THEME_LIFT`` times their share there,
    smoothed for words the background never saw), ranked by share × log lift. ``exclude``: words already named
    (the firing tokens). No background (no corpus windows to compare with), or fewer than 3 distinct firing
    windows: no theme."""
    windows = {tuple(ex.tokens) for ex in examples if max(ex.acts, default=0.0) > 0}   # a repeated window counts once
    if len(windows) < 3 or not background:
        return []
    counts: Counter = Counter(w for tokens in windows for w in content_words(tokens))
    floor = min(background.values()) / 2       # half of "in one corpus window": for words it never saw
    scored = []
    for word, c in counts.items():
        share = c / len(windows)
        if c < 3 or share < THEME_MIN_SHARE or word in exclude:
            continue
        lift = share / max(background.get(word, 0.0), floor)
        if lift >= THEME_LIFT:
            scored.append((-share * math.log(lift), word))
    return [w for _, w in sorted(scored)[:n]]
