"""Judge-free measures of a dial (definitions in docs/measures.md).

Per dial value, on held-out prompts, each steered answer is re-read by the *unsteered* model:

- **concept rate**: fraction of answers on concept, by a judge function (a praise lexicon, a dangerous-call
  pattern), a keyword list, or the concept's feature classifier (:class:`ConceptClassifier`: a mean of the
  concept features' normalised max activations over the answer's tokens against a threshold fitted on the
  positive/negative texts);
- **fluency**: the answer's NLL (nats/token) read *without its prompt* (after BOS, or after an empty user turn
  of the chat template), against the default answers read the same way, and **degenerate text** (loops, one
  token over and over, nothing). Read without the prompt, an answer that fluently changes the subject costs
  what any fluent answer costs; word salad costs more. The NLL *given the prompt* is reported as
  **relevance**: it rises when the answer leaves the question, which is what a concept dial is for;
- for single features, the **output score** of Arad et al. 2025 (:func:`output_scores`).
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, Sequence

import torch
from torch.nn import functional as F

from saelab.hooks import capture, final_norm, intervene
from saelab.steer import DialSpec, dial_steering, sae_hook_name
from saelab.generation import as_loaded_model, generate_ids, generated_part, prompt_ids

DEGENERATE_REPETITION = 0.5
"""An answer whose share of repeated token 3-grams exceeds this is degenerate (a loop)."""
DEGENERATE_DISTINCT = 0.3
"""An answer of 8+ tokens with fewer distinct tokens than this share of its length is degenerate."""


class ConceptClassifier(NamedTuple):
    """On concept when ``mean_f max_t z_f(t) / scale_f >= threshold`` over a text's tokens."""

    features: list[int]
    scales: list[float]
    """Per feature, its activation scale (max activation) that makes features comparable."""
    threshold: float
    """Fitted on the positive/negative texts (best balanced accuracy, midway to the next score below)."""

    def score(self, z: torch.Tensor) -> float:
        """``z [n_tokens, len(features)]`` (the features' activations) → the text's concept score."""
        if z.shape[0] == 0:
            return 0.0
        return float((z.max(0).values / torch.tensor(self.scales, device=z.device)).mean())

    def to_json(self) -> dict:
        return {"features": self.features, "scales": self.scales, "threshold": self.threshold}


def fit_threshold(pos: Sequence[float], neg: Sequence[float]) -> float:
    """The threshold with the best balanced accuracy (``score >= t`` is positive), placed midway between the
    lowest score it admits and the next lower score, so both classes keep a margin."""
    scores = sorted(set(pos) | set(neg), reverse=True)
    best, best_t = -1.0, scores[0]
    for t in scores:
        acc = (sum(p >= t for p in pos) / len(pos) + sum(n < t for n in neg) / len(neg)) / 2
        if acc > best:
            best, best_t = acc, t
    below = [s for s in scores if s < best_t]
    return (best_t + below[0]) / 2 if below else best_t


def repetition_rate(ids: Sequence[int], n: int = 3) -> float:
    """Share of the text's token n-grams that already occurred earlier in it (0: none repeated)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def is_degenerate(ids: Sequence[int]) -> bool:
    """Nothing, a loop (3-gram repetition > 0.5) or few distinct tokens (< 0.3 of 8+ tokens)."""
    ids = list(ids)
    if not ids:
        return True
    few = len(ids) >= 8 and len(set(ids)) < DEGENERATE_DISTINCT * len(ids)
    return repetition_rate(ids) > DEGENERATE_REPETITION or few


def keyword_hit(text: str, keywords: Sequence[str]) -> bool:
    """Whether any keyword occurs in ``text`` at the start of a word (case-insensitive: "bridge" hits "Bridges")."""
    return any(re.search(r"(?<!\w)" + re.escape(k.lower()), text.lower()) for k in keywords)


def encode_prompt(model, prompt: str, chat: bool = False, max_new_tokens: int = 0, system: str | None = None,
                  ) -> torch.Tensor:
    """``[1, n]`` ids: the prompt with BOS, or the user turn of the model's chat template (generation prompt on);
    ``system``: a system turn first (chat), or a line before the prompt (plain text)."""
    if system is None:
        return prompt_ids(model, prompt, max_new_tokens, chat=chat)
    if not chat:
        return prompt_ids(model, f"{system}\n\n{prompt}", max_new_tokens)
    tok = model.tokenizer
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    return torch.tensor([ids], device=model.device)


def free_context(model, chat: bool = False) -> torch.Tensor:
    """``[1, n]`` the context an answer is read in *without its prompt*: BOS alone, or an empty user turn of the
    chat template with the assistant's turn opened (the answer is still an answer, to nothing in particular)."""
    return prompt_ids(model, "", chat=chat)


class Judge(NamedTuple):
    """What puts an answer on concept: ``fn`` if given, else ``keywords`` if given, else ``classifier``."""

    classifier: ConceptClassifier | None = None
    keywords: Sequence[str] = ()
    fn: Callable[[str], bool] | None = None
    """A text → on concept function (a lexicon, a pattern)."""

    def check(self) -> "Judge":
        if self.classifier is None and not self.keywords and self.fn is None:
            raise ValueError("a concept rate needs the concept's classifier, a keyword list or a judge function")
        return self


class Answer(NamedTuple):
    text: str
    fluency_nll: float
    """Mean NLL (nats/token) of the answer under the unsteered model, read without its prompt."""
    relevance_nll: float
    """Mean NLL (nats/token) of the answer under the unsteered model, given the prompt (not a fluency measure)."""
    n_tokens: int
    repetition: float
    degenerate: bool
    """Empty, a loop, or few distinct tokens (:func:`is_degenerate`)."""
    concept_score: float | None
    """The classifier's score of the answer read in context (None without a classifier)."""
    classifier_on: bool | None
    keyword_on: bool | None
    on_concept: bool
    """By the judge function, else the keywords, else the classifier."""


@torch.no_grad()
def read_tokens(model, contexts: Sequence[torch.Tensor], news: Sequence[torch.Tensor], hook: str | None = None,
                ) -> tuple[list[float], list[torch.Tensor | None]]:
    """Per answer, the mean NLL of ``news[i] [m_i]`` after ``contexts[i] [1, n_i]`` (one right-padded forward) and,
    with ``hook``, its activations there ``[m_i, d_in]``; an empty answer gets NLL 0."""
    rows = [torch.cat([c[0], a]) for c, a in zip(contexts, news)]
    width = max(len(r) for r in rows)
    pad = rows[0].new_zeros(1)
    batch = torch.stack([torch.cat([r, pad.expand(width - len(r))]) for r in rows])  # (b, width)
    mask = torch.stack([(torch.arange(width) < len(r)).long() for r in rows]).to(batch.device)
    with capture(model.model, hook or []) as acts:
        logits = model.model(input_ids=batch, attention_mask=mask, use_cache=False).logits.float()  # (b, w, vocab)
    nlls, xs = [], []
    for i, (c, a) in enumerate(zip(contexts, news)):
        n, m = c.shape[1], len(a)
        nlls.append(float(F.cross_entropy(logits[i, n - 1:n + m - 1], a)) if m else 0.0)
        xs.append(acts[hook][i, n:n + m] if hook else None)
    return nlls, xs


def read_answers(model, sae, prompts: Sequence[torch.Tensor], news: Sequence[torch.Tensor], judge: Judge,
                 chat: bool = False, batch: int = 16) -> list[Answer]:
    """Re-read each answer (``news[i]``, to ``prompts[i] [1, n]``) unsteered: with its prompt (relevance, the
    classifier) and without (fluency); repetition, degeneracy and the judge's verdict."""
    free = free_context(model, chat)
    hook = sae_hook_name(sae) if judge.classifier is not None else None
    out = []
    for s in range(0, len(news), batch):
        P, A = prompts[s:s + batch], news[s:s + batch]
        rel, xs = read_tokens(model, P, A, hook)
        flu, _ = read_tokens(model, [free] * len(A), A)
        for new, r, f, x in zip(A, rel, flu, xs):
            out.append(judge_answer(model, sae, new, r, f, x, judge))
    return out


def judge_answer(model, sae, new: torch.Tensor, relevance: float, fluency: float, x, judge: Judge) -> Answer:
    text = model.tokenizer.decode(new, skip_special_tokens=True)
    kw = keyword_hit(text, judge.keywords) if judge.keywords else None
    score = clf = None
    if judge.classifier is not None:
        c = judge.classifier
        score = c.score(sae.subset_encoder(c.features, x.device)(x.float())) if len(new) else 0.0
        clf = score >= c.threshold
    on = judge.fn(text) if judge.fn is not None else kw if judge.keywords else clf
    ids = new.tolist()
    return Answer(text, fluency, relevance, len(ids), repetition_rate(ids), is_degenerate(ids), score, clf, kw,
                  bool(on))


class DialValue(NamedTuple):
    value: float | None
    """Dial strength (in the dial's unit); None is the unsteered default."""
    concept_rate: float
    """Share of answers on concept (by the judge)."""
    fluency_nll: float
    """Mean over answers of the per-token NLL read without the prompt (:func:`free_context`)."""
    relevance_nll: float
    """Mean over answers of the per-token NLL given the prompt."""
    repetition: float
    degenerate: float
    """Share of degenerate answers."""
    answers: list[Answer]


def summarise(value: float | None, answers: list[Answer]) -> DialValue:
    n = max(len(answers), 1)
    mean = lambda key: sum(getattr(a, key) for a in answers) / n  # noqa: E731
    return DialValue(value, mean("on_concept"), mean("fluency_nll"), mean("relevance_nll"), mean("repetition"),
                     mean("degenerate"), answers)


def dial_point(model, sae, spec: DialSpec | None, strength: float | None, prompts: Sequence[torch.Tensor],
               judge: Judge, *, chat: bool = False, generate_from: Sequence[torch.Tensor] | None = None,
               max_new_tokens: int = 32, temperature: float = 0.0, samples: int = 1, seed: int = 0, max_act=None,
               db=None) -> DialValue:
    """Answer every prompt (``[1, n]`` each; ``generate_from``: other encodings to answer, e.g. with an
    instruction, read back under ``prompts``) with the dial at ``strength`` in one left-padded batch, and measure."""
    model = as_loaded_model(model)
    source = list(generate_from) if generate_from is not None else list(prompts)
    width = max(ids.shape[1] for ids in source)
    start = 0 if spec is None or spec.positions == "all" else width - 1  # left-padded: every prompt ends at width
    with dial_steering(model, sae, spec, strength, max_act=max_act, db=db, start=start) as hook:
        news = generate_batch(model, source, hook=hook, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed, samples=samples)
    read_as = [p for p in prompts for _ in range(samples)]
    answers = read_answers(model, sae, read_as, [n for rows in news for n in rows], judge, chat)
    return summarise(strength, answers)


def concept_curve(model, sae, spec: DialSpec, prompts: Sequence[str], values: Sequence[float], *,
                  judge: Judge, chat: bool = False, max_new_tokens: int = 32, temperature: float = 0.0,
                  samples: int = 1, seed: int = 0, max_act=None, db=None, progress=None,
                  default: DialValue | None = None) -> list[DialValue]:
    """The default, then each dial value: answer every prompt with ``spec`` at that strength and measure each
    answer unsteered. ``progress(i, total)`` is called per point. ``default``: the unsteered point of an earlier
    curve on the same prompts and judge, reused as it is."""
    model = as_loaded_model(model)
    judge.check()
    encoded = [encode_prompt(model, p, chat, max_new_tokens) for p in prompts]
    out = [default] if default is not None else []
    todo = [*values] if default is not None else [None, *values]
    for j, v in enumerate(todo, start=len(out)):
        out.append(dial_point(model, sae, None if v is None else spec, v, encoded, judge, chat=chat,
                              max_new_tokens=max_new_tokens, temperature=temperature, samples=samples, seed=seed,
                              max_act=max_act, db=db))
        if progress:
            progress(j + 1, len(values) + 1)
    return out


def generate_batch(model, encoded: Sequence[torch.Tensor], *, samples: int = 1, hook=None,
                   **kwargs) -> list[list[torch.Tensor]]:
    """Generate from several prompts (``[1, n_i]`` each) in one left-padded batch; per prompt, ``samples`` answers
    (generated ids, cut at EOS). Padding is masked, and HF derives positions from the mask, so each row reads its
    prompt as if alone (up to float rounding). ``hook``: the active :class:`saelab.steer.SteeringHook`, told
    where each row's BOS is (it must not edit it)."""
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(ids.shape[1] for ids in encoded)
    rows, mask = [], []
    for ids in encoded:
        gap = width - ids.shape[1]
        for _ in range(samples):
            rows.append(torch.cat([ids.new_full((gap,), pad), ids[0]]))
            mask.append(torch.cat([ids.new_zeros(gap), ids.new_ones(ids.shape[1])]))
    batch, attn = torch.stack(rows), torch.stack(mask)  # (n_prompts · samples, width)
    if hook is not None:
        hook.first = (attn == 0).sum(1)  # (rows,) the left padding: each row's BOS sits right after it
    out = generate_ids(model, batch, attention_mask=attn, **kwargs)  # (n_prompts · samples, width + new)
    news = [generated_part(model, r, width) for r in out]
    return [news[i * samples:(i + 1) * samples] for i in range(len(encoded))]


def rate(answers: Sequence[Answer], by: str) -> float | None:
    """Share of answers on concept by ``"classifier"`` or ``"keyword"`` (None when that judge was not given)."""
    marks = [getattr(a, f"{by}_on") for a in answers]
    return None if not marks or marks[0] is None else sum(marks) / len(marks)


def is_fluent(point: DialValue, default: DialValue, max_ratio: float = 1.5, max_degenerate: float = 0.1) -> bool:
    """Acceptable fluency: the answers read without their prompt cost at most ``max_ratio`` × the default answers'
    NLL read the same way, and at most ``max_degenerate`` of them are degenerate (beyond the default's share)."""
    return (point.fluency_nll <= max_ratio * max(default.fluency_nll, 1e-6)
            and point.degenerate <= default.degenerate + max_degenerate)


# -- output score (Arad, Mueller & Belinkov 2025, "SAEs Are Good for Steering – If You Select the Right Features") --

class OutputScore(NamedTuple):
    feature: int
    score: float
    """``rank_score × top_prob``, in [0, 1]."""
    rank_score: float
    """``1 − min rank / vocab`` of the lens tokens in the boosted next-token distribution (rank 0 = top)."""
    top_prob: float
    """Largest boosted next-token probability among the lens tokens."""
    lens_tokens: list[int]
    """The top-k logit-lens tokens of the feature's decoder row."""


def logit_lens_tokens(model, sae, features: Sequence[int], k: int = 20) -> torch.Tensor:
    """Top-``k`` token ids ``[n, k]`` of ``softmax(W_U · final_norm(W_dec[f]))``: each decoder row read out as if it
    were the last residual stream. Needs a residual-stream SAE (decoder width = model width)."""

    head = model.model.get_output_embeddings()
    D = sae.W_dec.detach()[list(features)].float()  # (n, d_in)
    if head is None or D.shape[1] != head.weight.shape[1]:
        raise ValueError("the output score reads decoder rows as residual-stream vectors: it needs a causal LM and an "
                         f"SAE on the residual stream (decoder width {D.shape[1]})")
    norm = final_norm(model.model)
    with torch.no_grad():
        h = norm(D.to(head.weight.device)) if norm is not None else D  # (n, d_model)
        logits = head(h.to(head.weight.dtype)).float()  # (n, vocab)
    return logits.topk(min(k, logits.shape[1]), dim=1).indices


@torch.no_grad()
def output_scores(model, sae, features: Sequence[int], prompt: str = "From my experience,", k: int = 20,
                  amplify: float = 10.0, batch: int = 32, hook: str | None = None) -> list[OutputScore]:
    """Arad et al.'s output score of each feature: on a neutral prompt, boost the feature at the last token by
    ``amplify × (largest SAE activation at that token)`` (error term kept), and score the next-token distribution
    by its top logit-lens tokens: ``(1 − min rank / vocab) × max probability``."""
    model = as_loaded_model(model)
    name = hook or sae_hook_name(sae)
    ids = prompt_ids(model, prompt)  # (1, n)
    lens = logit_lens_tokens(model, sae, features, k)  # (n_feat, k)
    W = sae.W_dec.detach().float()
    out = []
    for s in range(0, len(features), batch):
        chunk = list(features)[s:s + batch]

        def boost(x: torch.Tensor, rows=torch.tensor(chunk)) -> torch.Tensor:  # x: (b, seq, d_in)
            z_last = sae.encode(x[:, -1].float())  # (b, d_sae)
            delta = amplify * z_last.max(-1).values[:, None] * W[rows].to(x.device)  # (b, d_in) Δz_f · W_dec[f]
            x = x.clone()
            x[:, -1] += delta.to(x.dtype)
            return x

        with intervene(model.model, {name: boost}):
            logits = model.model(input_ids=ids.expand(len(chunk), -1), use_cache=False).logits[:, -1].float()
        probs = logits.softmax(-1)  # (b, vocab)
        for i, f in enumerate(chunk):
            toks = lens[s + i]
            p = probs[i, toks]  # (k,)
            ranks = (probs[i][None, :] > p[:, None]).sum(1)  # (k,) tokens strictly more likely
            rank_score = 1.0 - float(ranks.min()) / probs.shape[1]
            out.append(OutputScore(f, rank_score * float(p.max()), rank_score, float(p.max()), toks.tolist()))
    return out
