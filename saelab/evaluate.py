"""How good is a dictionary: reconstruction, sparsity, and what splicing it into the model costs.

One streaming pass over held-out text (the SAE's training corpus, validation split). Per batch of
sequences the model runs clean (capturing ``x`` at the SAE's hook), then with the hook replaced by

- the reconstruction ``x̂`` (spliced), zeros (zero-ablated), and — when asked, ``ablations=("zero",
  "mean")`` — the mean activation (mean-ablated, which needs an extra pass to the hook first), and
- on the first batch, ``x̂ + (x − x̂)`` (the error term kept): equal to clean up to float error. This
  is a self-check that the splice replaces the very activation the SAE read (hook path, input vs
  output, dtype, and the replay below); a wrong hook is wrong on every batch, so one batch tells.

The blocks below the hook run once per batch: the clean forward records their outputs and the other
forwards replay them (:class:`saelab.hooks.PrefixReplay`), so each extra forward costs only the
layers after the hook. On SmolLM2 at layer 15 of 30 that makes the pass ~2.2 full forwards per batch
instead of 5.

Definitions (also written into every report, see :data:`saelab.eval_report.DEFINITIONS`, where the
report's dataclasses and :func:`compare`'s table live):

- FVU = Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − x̄‖², x̄ the mean of x over the evaluated tokens, from
  streaming float64 sums (shifted by the first batch's mean, so no cancellation). MSE is per element.
- The mean for mean-ablation is that same x̄, computed exactly by a first pass that runs the model
  only as far as the hook (cheap) over the evaluation tokens.
- CE recovered = (CE_ablate − CE_spliced) / (CE_ablate − CE_clean) (Anthropic; SAEBench "core").
- Only the latents and statistics of one batch are in memory at a time; features' firing counts
  and the L0 histogram are accumulated as integer counts.
- Windows start with BOS (:mod:`saelab.corpus`). An SAE whose provenance says it was trained without
  BOS positions (``exclude_bos``, the default since windows start with BOS) is evaluated without them:
  they count in no reconstruction or sparsity metric and every splice and ablation leaves them clean
  (the SAE never claimed to model them, and on real models the window start is an attention sink
  whose norm is ~100× the rest: splicing a reconstruction there wrecks every later position).
  CE and KL average over every next-token prediction of the window.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import asdict
from itertools import islice
from typing import NamedTuple

import torch
from torch.nn import functional as F

from saelab.corpus import CorpusSpec
from saelab.eval_report import Downstream, EvalReport, Reconstruction, SelfCheck, Sparsity, compare
from saelab.hooks import HookError, PrefixReplay, capture, hook_shapes, intervene, resolve, run_to_hooks
from saelab.metrics import dead_fraction, fvu
from saelab.models import LoadedModel, load_model
from saelab.positions import PositionRule
from saelab.progress import bar as progress_bar
from saelab.provenance import Provenance, stage_inputs
from saelab.runtime import tune_allocator
from saelab.stage_config import EvalConfig, with_overrides
from saelab.token_cache import sequences

__all__ = ["compare", "Downstream", "EvalReport", "evaluate", "Reconstruction", "SelfCheck", "Sparsity",
           "trained_without_bos"]

DENSE_DENSITY = 0.1
"""A feature firing on more than this fraction of tokens counts as dense."""
LOG10_DENSITY_EDGES = [x / 2 for x in range(-16, 1)]  # -8.0, -7.5, ..., 0.0
SAE_CHUNK_ELEMENTS = 1 << 24
"""Rows of one batch go through the SAE in chunks of at most this many (rows × d_sae) latents."""
SCORE_ROWS = 64
"""Positions scored at a time (64 × a 49k vocabulary is 13 MB of logits; measured on SmolLM2-sized logits:
0.6-0.8 s per batch of 8 × 256 against 1.6 s for whole-batch tensors)."""
L0_QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


# -- accumulators ----------------------------------------------------------------------------------

class _ReconStats:
    """Streaming float64 sums for MSE, FVU, cosine and relative norm."""

    def __init__(self, d_in: int):
        self.n, self.shift = 0, None
        self.sum = torch.zeros(d_in, dtype=torch.float64)  # Σ (x − shift)
        self.sq = self.err = self.cos = self.rel = 0.0  # Σ‖x − shift‖², Σ‖x − x̂‖², Σ cos, Σ ‖x̂‖/‖x‖

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:  # both (n, d_in) float32
        xd = x.double().cpu()
        if self.shift is None:
            self.shift = xd.mean(0)
        xs = xd - self.shift
        self.n += x.shape[0]
        self.sum += xs.sum(0)
        self.sq += xs.pow(2).sum().item()
        self.err += (xd - x_hat.double().cpu()).pow(2).sum().item()
        self.cos += F.cosine_similarity(x, x_hat, dim=-1, eps=1e-8).double().sum().item()
        self.rel += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-8)).double().sum().item()

    def result(self) -> Reconstruction:
        n, d = max(self.n, 1), self.sum.numel()
        unexplained = fvu(self.err, self.sq, self.sum, n)   # sums of x − shift: the same variance
        return Reconstruction(mse=self.err / (n * d), fvu=unexplained, explained_variance=1 - unexplained,
                              cosine=self.cos / n, relative_norm=self.rel / n, tokens=self.n)


class _SparsityStats:
    """Per-feature firing counts and an L0 histogram: integers only, O(d_sae) memory."""

    def __init__(self, d_sae: int):
        self.n = 0
        self.fired = torch.zeros(d_sae, dtype=torch.int64)
        self.l0_hist = torch.zeros(d_sae + 1, dtype=torch.int64)

    def update(self, z: torch.Tensor) -> None:  # (n, d_sae)
        active = z != 0  # jumprelu latents can be negative when θ < 0: "fired" means non-zero
        self.n += z.shape[0]
        self.fired += active.sum(0).cpu()
        self.l0_hist += torch.bincount(active.sum(1).cpu(), minlength=self.l0_hist.numel())

    def result(self) -> tuple[Sparsity, torch.Tensor]:
        n, d_sae = max(self.n, 1), self.fired.numel()
        density = self.fired.double() / n  # (d_sae,)
        values = torch.arange(d_sae + 1, dtype=torch.float64)
        mean = (self.l0_hist * values).sum().item() / n
        var = (self.l0_hist * (values - mean).pow(2)).sum().item() / n
        cum = self.l0_hist.cumsum(0)
        quantiles = {f"p{round(q * 100)}": int(torch.searchsorted(cum, math.ceil(q * self.n)).item())
                     for q in L0_QUANTILES}
        quantiles["max"] = int(self.l0_hist.nonzero().max().item()) if self.n else 0
        alive = density[density > 0].log10()
        edges = torch.tensor(LOG10_DENSITY_EDGES, dtype=torch.float64)
        counts = torch.histc(alive.clamp(edges[0], edges[-1]), bins=len(edges) - 1, min=edges[0].item(),
                             max=edges[-1].item()) if alive.numel() else torch.zeros(len(edges) - 1)
        hist = [{"lo": float(edges[i]), "hi": float(edges[i + 1]), "count": int(counts[i])}
                for i in range(len(edges) - 1)]
        dead, dense = int((self.fired == 0).sum()), int((density > DENSE_DENSITY).sum())
        return Sparsity(l0=mean, l0_std=math.sqrt(max(var, 0.0)), l0_quantiles=quantiles, d_sae=d_sae,
                        dead=dead, dense=dense, dead_fraction=dead_fraction(self.fired), dense_fraction=dense / d_sae,
                        log10_density_histogram=hist), density.float()


# -- the pass --------------------------------------------------------------------------------------

def _model_output(out) -> torch.Tensor:
    """Next-token logits of a causal LM, else the encoder's last hidden state."""
    return out.logits if getattr(out, "logits", None) is not None else out[0]


class _Evaluator:
    """Runs the clean, spliced, ablated and error-term forwards of each batch; owns the accumulators."""

    def __init__(self, sae, lm: LoadedModel, hook: str, rule: PositionRule, ablations: tuple[str, ...] = ("zero",)):
        self.sae, self.lm, self.hook, self.model, self.rule = sae, lm, hook, lm.model, rule
        self.causal = lm.is_causal
        self.ablations = ablations
        self.prefix = PrefixReplay(lm.model, hook)
        self.recon, self.sparsity = _ReconStats(sae.d_in), _SparsityStats(sae.d_sae)
        self.sums: defaultdict[str, float] = defaultdict(float)  # float64 running sums of CE, KL, counts
        self.mean: torch.Tensor | None = None  # (d_in,) x̄ over the evaluated positions, for mean-ablation
        self.max_diff = self.max_out = 0.0

    def kept(self, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` positions that count (:class:`saelab.positions.PositionRule`) of ids ``b`` with hook
        activations ``x [B, T, d_in]``."""
        return self.rule.keep(b, torch.linalg.vector_norm(x.float(), dim=-1))

    def mean_activation(self, ids: torch.Tensor, batch_size: int, bar) -> None:
        """First pass, forward only as far as the hook: x̄ over the kept positions (float64 sum)."""
        total, n = torch.zeros(self.sae.d_in, dtype=torch.float64), 0
        for b in ids.split(batch_size):
            b = b.to(self.lm.device)
            x = run_to_hooks(self.model, b, [self.hook])[self.hook]  # (B, T, d_in)
            k = self.kept(b, x)
            total += x[k].double().sum(0).cpu()
            n += int(k.sum())
            bar.update(b.numel())
        self.mean = (total / max(n, 1)).float()

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``x [n, d_in]`` → x̂ ``[n, d_in]`` float32, in chunks so that latents stay bounded."""
        W = self.sae.W_enc
        rows = max(1, SAE_CHUNK_ELEMENTS // self.sae.d_sae)
        if not x.shape[0]:  # a batch of BOS only, when they are excluded
            return x.clone()
        outs = []
        for chunk in x.to(W.device, W.dtype).split(rows):
            z = self.sae.encode(chunk)  # (rows, d_sae)
            x_hat = self.sae.decode(z).float()  # (rows, d_in)
            self.sparsity.update(z)
            self.recon.update(chunk.float(), x_hat)
            outs.append(x_hat)
        return torch.cat(outs).to(x.device)

    def forward_with(self, b: torch.Tensor, keep: torch.Tensor, values: torch.Tensor,
                     replay: bool = True) -> torch.Tensor:
        """Model output with the hook's activation at the kept positions replaced by ``values [n_keep, d]``
        (the blocks below the hook replayed from the clean forward of this batch unless ``replay=False``)."""
        def put(act: torch.Tensor) -> torch.Tensor:  # (B, T, d_in)
            out = act.clone()
            out[keep] = values.to(act.dtype)
            return out

        with self.prefix.replay() if replay else contextlib.nullcontext(), intervene(self.model, {self.hook: put}):
            return _model_output(self.model(input_ids=b, use_cache=False))

    def step(self, b: torch.Tensor) -> None:
        b = b.to(self.lm.device)
        with capture(self.model, [self.hook]) as acts, self.prefix.record():
            clean = _model_output(self.model(input_ids=b, use_cache=False))
        keep = self.kept(b, acts[self.hook])                      # (B, T)
        if self.rule.bos_id is not None:
            self.sums["excluded_bos"] += float((b == self.rule.bos_id).sum())
        self.sums["excluded_sink"] += float(self.rule.sinks(b, keep).sum())
        x = acts[self.hook][keep].float()  # (n_keep, d_in)
        if not torch.isfinite(x).all():
            raise ValueError(f"the model's activations at {self.hook!r} contain NaN or inf (on tokens "
                             f"{b[0, :8].tolist()}...): check the model's dtype and weights")
        x_hat = self.reconstruct(x)
        kept_error = None
        if not self.sums["checked"]:
            # The captured x, not the value the intervention sees: if the two hook paths disagreed,
            # this splice would put a foreign activation in and the outputs would differ. Replayed, on the
            # batch (the replay must change nothing; its KL is the report's self-check KL), and with the
            # whole model running on the first sequence (a splice inside the replayed blocks would go
            # unseen otherwise; one sequence shows a wrong hook as well as eight).
            kept = x_hat + (x - x_hat)                                  # (n_keep, d_in)
            kept_error = self.forward_with(b, keep, kept)
            first = self.forward_with(b[:1], keep[:1], kept[:int(keep[0].sum())], replay=False)
            for out, ref in ((kept_error, clean), (first, clean[:1])):
                self.max_diff = max(self.max_diff, (out.float() - ref.float()).abs().max().item())
            self.max_out = max(self.max_out, clean.float().abs().max().item())
            self.sums["checked"] += float(b.shape[0] * (b.shape[1] - 1))
        if not self.causal:
            return
        splices = {"spliced": x_hat, "zero": torch.zeros_like(x_hat)}
        if "mean" in self.ablations:
            splices["mean"] = self.mean.to(x).expand_as(x)
        outs = {name: self.forward_with(b, keep, values) for name, values in splices.items()}
        if kept_error is not None:
            outs["error"] = kept_error
        self.sums["predictions"] += float(b[:, 1:].numel())
        self._score(clean, outs, b[:, 1:])

    def _score(self, clean: torch.Tensor, outs: dict[str, torch.Tensor], targets: torch.Tensor) -> None:
        """Add the summed CE of the clean logits and of each of ``outs`` (all ``[B, T, vocab]``) on
        ``targets [B, T-1]``, and KL(clean ‖ out) for the splice and the self-check, from logits:
        KL = Σ_v p_clean (l_clean − l_out) − lse_clean + lse_out. A few rows at a time, so the
        vocabulary-wide work (49k columns for SmolLM2) stays in cache instead of streaming
        [batch, T, vocab] tensors through memory several times."""
        with_kl = {"spliced", "error"}
        B, T1 = targets.shape
        for i in range(B):
            for start in range(0, T1, SCORE_ROWS):                            # slices of one row: contiguous
                rows = slice(start, min(start + SCORE_ROWS, T1))
                t = targets[i, rows, None]                                    # (rows, 1)
                lc = clean[i, rows].float()                                   # (rows, vocab)
                lse_c = lc.logsumexp(-1)                                      # (rows,)
                self.sums["ce_clean"] += float((lse_c - lc.gather(-1, t).squeeze(-1)).double().sum())
                p_c = (lc - lse_c[:, None]).exp()
                for name, out in outs.items():
                    lo = out[i, rows].float()
                    lse_o = lo.logsumexp(-1)
                    self.sums[f"ce_{name}"] += float((lse_o - lo.gather(-1, t).squeeze(-1)).double().sum())
                    if name in with_kl:   # the ablations' distributions only enter through their CE
                        kl = (p_c * (lc - lo)).sum(-1) - lse_c + lse_o        # (rows,)
                        self.sums[f"kl_{name}"] += float(kl.double().sum())

    def downstream(self) -> Downstream:
        s = self.sums
        n = s["predictions"]
        ce = {k: s[f"ce_{k}"] / n if k != "mean" or "mean" in self.ablations else None
              for k in ("clean", "spliced", "zero", "mean")}

        def recovered(ablated: str) -> float | None:
            if ce[ablated] is None:
                return None
            gap = ce[ablated] - ce["clean"]
            return (ce[ablated] - ce["spliced"]) / gap if abs(gap) > 1e-6 else None

        return Downstream(ce_clean=ce["clean"], ce_spliced=ce["spliced"], ce_zero_ablated=ce["zero"],
                          ce_mean_ablated=ce["mean"], ce_recovered_zero=recovered("zero"),
                          ce_recovered_mean=recovered("mean"), delta_loss=ce["spliced"] - ce["clean"],
                          kl_spliced=s["kl_spliced"] / n, predictions=int(n))

    def self_check(self) -> SelfCheck:
        half = next(self.model.parameters()).dtype in (torch.float16, torch.bfloat16)
        tolerance = 2e-2 if half else 1e-4  # relative to the largest output; a wrong hook is O(1) off
        rel = self.max_diff / max(self.max_out, 1e-12)
        kl = self.sums["kl_error"] / self.sums["checked"] if self.causal and self.sums["checked"] else None
        return SelfCheck(output="logits" if self.causal else "last_hidden_state", max_abs_diff=self.max_diff,
                         relative_diff=rel, kl=kl, tolerance=tolerance, ok=rel <= tolerance)


# -- setup: what to evaluate on --------------------------------------------------------------------

def trained_without_bos(sae) -> bool:
    """Whether the SAE's provenance says BOS positions were left out of training (see
    :class:`saelab.provenance.Provenance`: the store's ``bos.excluded``, ``exclude_bos``, SAELens'
    ``exclude_special_tokens``)."""
    return Provenance.of(sae).exclude_bos


def _check_fits(sae, lm: LoadedModel, hook: str, trained_on: str | None) -> None:
    """The hook must exist in the model and be as wide as the SAE's input."""
    origin = f" (the SAE was trained on {trained_on!r})" if trained_on else ""
    try:
        resolve(lm.model, hook)
    except HookError as e:
        raise HookError(f"the SAE reads hook {hook!r}, which model {lm.name!r} does not have{origin}: {e}") from None
    width = hook_shapes(lm.model, [hook])[hook]
    if width != sae.d_in:
        raise ValueError(f"the SAE has d_in={sae.d_in} but hook {hook!r} of model {lm.name!r} has width {width}"
                         f"{origin}; evaluate it on the model and hook it was trained on")


def _token_ids(spec: CorpusSpec, lm: LoadedModel, context: int, tokens: int, seed: int) -> torch.Tensor:
    """``[n_seq, context]`` BOS-led token ids (a few MB at most: the only thing held for the whole pass)."""
    n_seq = max(1, math.ceil(tokens / context))
    ids = list(islice(sequences(spec, lm.tokenizer, context, seed), n_seq))
    if not ids:
        raise ValueError(f"corpus {spec.source!r} (split {spec.split!r}) has fewer than {context} tokens: "
                         "nothing to evaluate on; use a larger corpus or a smaller context")
    return torch.stack(ids)


# -- the public functions --------------------------------------------------------------------------

class _Inputs(NamedTuple):
    """What one evaluation runs on, resolved from the SAE's provenance, the caller and the model."""

    lm: LoadedModel
    hook: str
    ids: torch.Tensor
    """``[n_seq, context]`` BOS-led token ids (a few MB at most: the only thing held for the whole pass)."""
    corpus: dict
    rule: PositionRule


def _inputs(sae, model, corpus, cfg: EvalConfig, hook: str | None, warnings: list[str]) -> _Inputs:
    given_ids = corpus if isinstance(corpus, torch.Tensor) else None
    context = cfg.context
    if given_ids is not None:
        if given_ids.dim() != 2 or given_ids.shape[1] < 2:
            raise ValueError(f"token ids must be [n_seq, context >= 2], got shape {tuple(given_ids.shape)}")
        context, corpus = given_ids.shape[-1], None  # given token ids set the context
    name = model.name if isinstance(model, LoadedModel) else model
    run = stage_inputs(sae, model=name, hook=hook, corpus=corpus, context=context, exclude_bos=cfg.exclude_bos)
    prov = run.provenance
    if hook and prov.hook_read and hook != prov.hook_read:
        warnings.append(f"evaluated at hook {hook!r}, but the SAE was trained on {prov.hook_read!r}")
    lm = model if isinstance(model, LoadedModel) else load_model(run.model_name)
    _check_fits(sae, lm, run.hook, prov.model_name)
    context = run.context
    if lm.max_positions and context > lm.max_positions and given_ids is None:
        warnings.append(f"context {context} exceeds the model's {lm.max_positions} positions; using {lm.max_positions}")
        context = lm.max_positions
    if given_ids is not None:
        ids, corpus_json = given_ids[:max(1, math.ceil(cfg.tokens / context))].long(), {"source": "token ids",
                                                                                         "split": "given"}
    else:
        ids = _token_ids(run.corpus, lm, context, cfg.tokens, cfg.seed)
        corpus_json = {**run.corpus.to_json(), "seed": cfg.seed}
    if ids.numel() < cfg.tokens:
        warnings.append(f"the corpus gave only {ids.numel():,} of the {cfg.tokens:,} tokens asked for")
    if prov.model_weights_sha256 and prov.model_weights_sha256 != lm.weights_hash:
        warnings.append(f"model {lm.name!r} has other weights than the SAE was trained on "
                        f"(sha256 {lm.weights_hash[:12]}…, provenance says {prov.model_weights_sha256[:12]}…)")
    rule = prov.position_rule(lm.tokenizer, run.exclude_bos)
    return _Inputs(lm, run.hook, ids, corpus_json, rule)


@torch.no_grad()
def evaluate(sae, model: LoadedModel | str | None = None, corpus: CorpusSpec | str | torch.Tensor | None = None, *,
             config: EvalConfig | None = None, hook: str | None = None, progress: bool = True,
             name: str | None = None, **overrides) -> EvalReport:
    """Reconstruction, sparsity and downstream metrics of ``sae`` at its hook in ``model``.

    ``model``: a LoadedModel or a name for :func:`load_model` (default: the SAE's ``model_name``).
    ``corpus``: a CorpusSpec, a source string (its validation split), or token ids ``[n, context]``;
    default: the SAE's training corpus, validation split. ``config``: an :class:`EvalConfig` (tokens,
    context, batch size, seed, BOS rule, ablations); its fields can also be given as keywords
    (``evaluate(sae, lm, tokens=16_384)``). The report records it whole (``config``).
    """
    cfg = with_overrides(EvalConfig, config, overrides)
    tune_allocator()   # long batch job: keep big blocks in the heap (saelab.runtime)
    warnings: list[str] = []
    inp = _inputs(sae, model, corpus, cfg, hook, warnings)
    ev = _Evaluator(sae, inp.lm, inp.hook, inp.rule, cfg.ablations)
    was_training = sae.training
    sae.eval()  # batchtopk uses its learned threshold at inference
    label, ids = name or "sae", inp.ids
    try:
        if ev.causal and "mean" in ev.ablations:
            with progress_bar(total=ids.numel(), unit="tok", desc=f"{label}: mean activation", disable=not progress,
                      leave=False) as bar:
                ev.mean_activation(ids, cfg.batch_size, bar)
        with progress_bar(total=ids.numel(), unit="tok", desc=f"{label}: evaluating", disable=not progress,
                  leave=False) as bar:
            for b in ids.split(cfg.batch_size):
                ev.step(b)
                bar.update(b.numel())
    finally:
        sae.train(was_training)
    return _report(ev, label, inp, cfg, warnings)


def _report(ev: _Evaluator, name: str, inp: _Inputs, cfg: EvalConfig, warnings: list[str]) -> EvalReport:
    sparsity, density = ev.sparsity.result()
    check = ev.self_check()
    if not check.ok:
        warnings.append(f"SELF-CHECK FAILED: splicing x_hat + (x - x_hat) changed the model's {check.output} by "
                        f"{check.relative_diff:.2e} (relative; tolerance {check.tolerance:.0e}): the activation "
                        f"replaced at {inp.hook!r} is not the one the SAE read, so the spliced metrics are wrong")
    unavailable = {}
    if not ev.causal:
        why = f"model {inp.lm.name!r} has no LM head (loaded without one): no next-token distribution"
        unavailable = {m: why for m in ("ce_clean", "ce_spliced", "ce_zero_ablated", "ce_mean_ablated",
                                        "ce_recovered", "delta_loss", "kl")}
    elif "mean" not in ev.ablations:
        unavailable = {m: "not asked for (--mean-ablation)" for m in ("ce_mean_ablated", "ce_recovered_mean")}
    positions = {**ev.rule.to_json(), "excluded_bos": int(ev.sums["excluded_bos"]),
                 "excluded_sinks": int(ev.sums["excluded_sink"])}
    return EvalReport(sae=name, model=inp.lm.name, hook=inp.hook, corpus=inp.corpus, context=int(inp.ids.shape[1]),
                      tokens=inp.ids.numel(), seed=cfg.seed, exclude_bos=ev.rule.bos_id is not None,
                      positions=positions, config=asdict(cfg), reconstruction=ev.recon.result(),
                      sparsity=sparsity, downstream=ev.downstream() if ev.causal else None, self_check=check,
                      unavailable=unavailable, warnings=warnings, feature_density=density)
