"""Judge-free measures of a dial (definitions in docs/measures.md).

Per dial value, on held-out neutral prompts, each steered answer is re-read by the *unsteered* model:

- **concept rate**: fraction of answers on concept, by the concept's feature classifier
  (:class:`ConceptClassifier`: a mean of the concept features' normalised max activations over the
  answer's tokens against a threshold fitted on the positive/negative texts) or by a keyword list;
- **fluency**: the answer's NLL (nats/token) under the unsteered model given the prompt, and its
  repetition rate (share of repeated token 3-grams);
- for single features, the **output score** of Arad et al. 2025 (:func:`output_scores`).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import torch
from torch.nn import functional as F

from saelab.hooks import capture, final_norm, intervene
from saelab.steer import concept_edits, edit_start, sae_hook_name, steering
from saelab.generation import as_loaded_model, generate_ids, generated_part, prompt_ids


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


def keyword_hit(text: str, keywords: Sequence[str]) -> bool:
    """Whether any keyword occurs in ``text`` at the start of a word (case-insensitive: "bridge" hits "Bridges")."""
    return any(re.search(r"(?<!\w)" + re.escape(k.lower()), text.lower()) for k in keywords)


def encode_prompt(model, prompt: str, chat: bool = False, max_new_tokens: int = 0) -> torch.Tensor:
    """``[1, n]`` ids: the prompt with BOS, or the user turn of the model's chat template (generation prompt on)."""
    return prompt_ids(model, prompt, max_new_tokens, chat=chat)


class Answer(NamedTuple):
    text: str
    nll: float
    """Mean NLL (nats/token) of the answer under the unsteered model, given the prompt."""
    n_tokens: int
    repetition: float
    concept_score: float | None
    """The classifier's score of the answer (None without a classifier)."""
    classifier_on: bool | None
    keyword_on: bool | None
    on_concept: bool
    """By the keywords when given, else by the classifier."""


@torch.no_grad()
def read_answer(model, sae, ids: torch.Tensor, new: torch.Tensor, classifier: ConceptClassifier | None,
                keywords: Sequence[str] = (), hook: str | None = None) -> Answer:
    """Re-read ``prompt ids [1, n] + answer ids [m]`` unsteered: NLL, repetition and concept of the answer."""
    text = model.tokenizer.decode(new, skip_special_tokens=True)
    kw = keyword_hit(text, keywords) if keywords else None
    if len(new) == 0:
        clf = False if classifier else None
        return Answer(text, 0.0, 0, 0.0, 0.0 if classifier else None, clf, kw, bool(kw if keywords else clf))
    n, name = ids.shape[1], hook or sae_hook_name(sae)
    full = torch.cat([ids[0], new])[None]  # (1, n + m)
    with capture(model.model, name) as acts:
        logits = model.model(input_ids=full, use_cache=False).logits.float()  # (1, n + m, vocab)
    nll = F.cross_entropy(logits[0, n - 1:-1], full[0, n:], reduction="mean")
    score = clf = None
    if classifier is not None:
        z = sae.subset_encoder(classifier.features, full.device)(acts[name][0, n:])  # (m, n_features)
        score = classifier.score(z)
        clf = score >= classifier.threshold
    return Answer(text, float(nll), len(new), repetition_rate(new.tolist()), score, clf, kw,
                  bool(kw if keywords else clf))


class DialValue(NamedTuple):
    value: float | None
    """Dial value (× each feature's max activation); None is the unsteered default."""
    concept_rate: float
    """Share of answers on concept (keywords when given, else the classifier)."""
    nll: float
    """Mean over answers of the per-token NLL under the unsteered model."""
    repetition: float
    answers: list[Answer]


def concept_curve(model, sae, features: Sequence[int], prompts: Sequence[str], values: Sequence[float], *,
                  classifier: ConceptClassifier | None = None, keywords: Sequence[str] = (), mode: str = "clamp",
                  chat: bool = False, positions: str = "all", max_new_tokens: int = 32, temperature: float = 0.0,
                  samples: int = 1, seed: int = 0, max_act=None, db=None, progress=None,
                  default: DialValue | None = None) -> list[DialValue]:
    """The default, then each dial value: generate from every prompt with the feature set at that value
    (one dial for all features), and measure each answer unsteered. ``progress(i, total)`` is called per point.
    ``default``: the unsteered point of an earlier curve on the same prompts and judge, reused as it is."""
    model = as_loaded_model(model)
    if classifier is None and not keywords:
        raise ValueError("a concept rate needs the concept's classifier or a keyword list")
    encoded = [encode_prompt(model, p, chat, max_new_tokens) for p in prompts]
    out = [default] if default is not None else []
    for j, v in enumerate([*values] if default is not None else [None, *values], start=len(out)):
        edits = {} if v is None else concept_edits(features, v, mode)
        gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, samples=samples)
        if positions == "all":  # one batched generate for all prompts (left-padded): every position is edited
            with steering(model, sae, edits, max_act=max_act, db=db) as hook:
                news = generate_batch(model, encoded, hook=hook, **gen)
        else:
            news = []
            for ids in encoded:
                with steering(model, sae, edits, max_act=max_act, db=db, start=edit_start(positions, ids.shape[1])):
                    rows = generate_ids(model, ids, **gen)
                news.append([generated_part(model, r, ids.shape[1]) for r in rows])
        answers = [read_answer(model, sae, ids, new, classifier, keywords) for ids, rows in zip(encoded, news)
                   for new in rows]
        out.append(summarise(v, answers))
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


def summarise(value: float | None, answers: list[Answer]) -> DialValue:
    n = max(len(answers), 1)
    return DialValue(value, sum(a.on_concept for a in answers) / n, sum(a.nll for a in answers) / n,
                     sum(a.repetition for a in answers) / n, answers)


def rate(answers: Sequence[Answer], by: str) -> float | None:
    """Share of answers on concept by ``"classifier"`` or ``"keyword"`` (None when that judge was not given)."""
    marks = [getattr(a, f"{by}_on") for a in answers]
    return None if not marks or marks[0] is None else sum(marks) / len(marks)


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
