"""Steering: turn SAE features like dials while the model reads and writes.

At the SAE's hook, with ``z = encode(x)`` and ``max_f`` feature f's maximum activation over the
analysis corpus, on every position (prompt and generated tokens) except those the SAE never saw in
training — BOS and attention sinks (:mod:`saelab.positions`), where an edit would move every later position:

- ``Clamp(v)``:  x ↦ decode(z′) + (x − decode(z)),  z′ = z with z_f := v·max_f  (Templeton et al. 2024:
  the SAE's error term x − decode(z) is kept, so only the chosen features change);
- ``Add(v)``:    x ↦ x + v·max_f·W_dec[f]  (the steering-vector form of Neuronpedia and AxBench); with
  ``unit="norm"``, x_t ↦ x_t + v·‖x_t‖·W_dec[f]/‖W_dec[f]‖ (v is a share of the residual norm at the position);
- ``VectorAdd(d, v)``: x_t ↦ x_t + v·‖x_t‖·d/‖d‖, a direction that is no feature (a difference of means);
- ``Ablate()``:  ``Clamp(0)``;
- ``when=(g, t)`` on any edit: apply it only at positions where feature g's activation exceeds t
  (raw activation units, as in features.db and alerts; Goodfire's ``set_when``);
- ``start=s`` on :func:`steering`: edit only positions ``>= s``. ``positions="generated"`` in
  :func:`compare_generations` and :func:`saelab.measures.concept_curve` sets ``s = n_prompt − 1``: the prompt is read as it is and only the
  positions that predict new tokens (the prompt's last one and every generated one) are edited.

A concept is a feature set turned by one dial (:class:`DialSpec`: features, mode, unit, positions, or a plain
direction): :func:`dial_steering` turns it to a strength; :func:`concept_edits` gives every feature the same
multiple of its own max activation.

``with steering(model, sae, {1234: Clamp(10)}): model.generate(...)``; hooks are removed on exit,
also on exceptions and Ctrl-C. :func:`compare_generations` puts default and steered continuations
side by side; :func:`saelab.measures.concept_curve` measures how a concept and the text follow the dial.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, NamedTuple, Sequence, Union

import torch
from torch.nn import functional as F

from saelab.formats import feature_max_activations
from saelab.generation import as_loaded_model, generate_ids, generated_part, prompt_ids
from saelab.hooks import as_module, capture, intervene, resolve, run_to_hooks
from saelab.positions import window_median
from saelab.provenance import Provenance

POSITIONS = ("all", "generated")


@dataclass(frozen=True)
class Clamp:
    """Set the feature to ``value × max_act`` (keeping the SAE's error term)."""

    value: float
    """Multiple of the feature's max activation (0 ablates, 10 is Anthropic's 10×)."""
    when: tuple[int, float] | None = None
    """``(feature, threshold)``: edit only where that feature's activation exceeds the threshold."""


@dataclass(frozen=True)
class Add:
    """Add ``value × max_act × W_dec[f]`` (unit ``"max"``) or ``value × ‖x_t‖ × W_dec[f]/‖W_dec[f]‖`` (unit
    ``"norm"``: a share of the residual norm at that position) to the activation."""

    value: float
    """Multiple of the feature's max activation (or of the residual norm) along its decoder direction (may be
    negative)."""
    when: tuple[int, float] | None = None
    """``(feature, threshold)``: edit only where that feature's activation exceeds the threshold."""
    unit: str = "max"
    """``"max"``: × the feature's max activation; ``"norm"``: × the residual norm at the edited position."""


@dataclass(frozen=True)
class Ablate:
    """Clamp the feature to 0."""

    when: tuple[int, float] | None = None
    """``(feature, threshold)``: edit only where that feature's activation exceeds the threshold."""

    @property
    def value(self) -> float:
        return 0.0


Edit = Union[Clamp, Add, Ablate]
UNITS = ("max", "norm")
MODES = ("clamp", "add", "ablate", "vector")


@dataclass(frozen=True)
class VectorAdd:
    """Add ``value × ‖x_t‖ × d/‖d‖`` (unit ``"norm"``) or ``value × d`` (unit ``"raw"``) at every edited position:
    a steering vector that is no SAE feature (a difference of means, :mod:`saelab.baselines`)."""

    direction: torch.Tensor
    """``[d_in]`` the direction."""
    value: float
    """Share of the residual norm (``"norm"``) or multiple of the raw vector (``"raw"``)."""
    unit: str = "norm"


def concept_edits(features: Sequence[int], value: float, mode: str = "clamp") -> dict[int, Edit]:
    """One dial for a feature set: each feature clamped (``mode="clamp"``), added (``"add"``) at ``value`` × its
    own max activation, or ablated (``"ablate"``, value ignored)."""
    if mode not in ("clamp", "add", "ablate"):
        raise ValueError(f"unknown edit mode {mode!r}: choose clamp, add or ablate")
    if mode == "ablate":
        return {int(f): Ablate() for f in features}
    make = Add if mode == "add" else Clamp
    return {int(f): make(float(value)) for f in features}


@dataclass(frozen=True)
class DialSpec:
    """One dial: what a strength turns (an SAE feature set, or a plain direction) and how."""

    features: tuple[int, ...] = ()
    """The SAE features the dial turns (empty for a plain direction)."""
    mode: str = "clamp"
    """``clamp`` (error term kept), ``add`` (decoder directions), ``ablate`` or ``vector`` (``direction``)."""
    unit: str = "max"
    """``max``: strength × each feature's max activation; ``norm``: strength × the residual norm at the position
    (``add``: along the normalised sum of the features' ``max_f · W_dec[f]``). Clamp is always in ``max``."""
    positions: str = "all"
    """``all`` or ``generated`` (:func:`edit_start`)."""
    direction: tuple[float, ...] | None = None
    """``[d_in]`` the direction of a ``vector`` dial (a difference of means)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown dial mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.unit not in UNITS:
            raise ValueError(f"unknown dial unit {self.unit!r}: choose 'max' (× max activation) or 'norm' "
                             f"(× the residual norm at the hook)")
        if self.positions not in POSITIONS:
            edit_start(self.positions, 0)  # the one clear error
        if (self.mode == "vector") != (self.direction is not None):
            raise ValueError("a 'vector' dial needs a direction, and only a 'vector' dial has one")
        if self.mode != "vector" and not self.features:
            raise ValueError(f"a {self.mode!r} dial needs at least one feature")

    def label(self) -> str:
        what = "vector" if self.mode == "vector" else f"{self.mode} {list(self.features)}"
        unit = "" if self.mode in ("clamp", "ablate") else f" (× {'max act' if self.unit == 'max' else 'residual norm'})"
        return f"{what}{unit}, {self.positions} positions"


def dial_edits(sae, spec: DialSpec, strength: float, maxes: Mapping[int, float]) -> tuple[dict[int, Edit],
                                                                                          VectorAdd | None]:
    """The per-feature edits and the plain vector that turn ``spec`` to ``strength`` (``maxes``: max activations)."""
    if spec.mode == "vector":
        return {}, VectorAdd(torch.tensor(spec.direction, dtype=torch.float32), float(strength), spec.unit)
    if spec.mode == "add" and spec.unit == "norm":
        W = sae.W_dec.detach().float()
        d = sum(maxes[f] * W[f] for f in spec.features)  # (d_in,) the set's direction, each feature as in "max"
        return {}, VectorAdd(d.cpu(), float(strength), "norm")
    return concept_edits(spec.features, strength, spec.mode), None


def edit_start(positions: str, n_prompt: int) -> int:
    """First edited position: 0 for ``"all"``, the prompt's last position for ``"generated"``."""
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}: choose 'all' (prompt and generated tokens) or "
                         f"'generated' (only the positions that predict new tokens)")
    return 0 if positions == "all" else max(n_prompt - 1, 0)


def sae_hook_name(sae) -> str:
    """The hook the SAE reads, from its provenance (saelab.json) or cfg.json metadata."""
    name = Provenance.of(sae).hook_read
    if not name:
        raise ValueError("this SAE does not record which hook it reads (no hook_name in saelab.json or in "
                         "cfg.json metadata); pass the hook explicitly")
    return name


def check_feature(sae, feature) -> int:
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < sae.cfg.d_sae:
        raise ValueError(f"unknown feature id {feature!r}: this SAE has {sae.cfg.d_sae} features "
                         f"(ids 0..{sae.cfg.d_sae - 1})")
    return feature


def max_activations(sae, features, override=None, db=None) -> dict[int, float]:
    """Max activation of each feature: ``override`` (mapping or [d_sae] sequence) first, then
    ``db.feature(i)["max_act"]`` (a :class:`saelab.featuredb.FeatureDB`), then the SAE's provenance."""
    out, missing = {}, []
    for f in features:
        if override is not None and (f in override if isinstance(override, Mapping) else True):
            out[f] = float(override[f])
        elif db is not None:
            out[f] = float(db.feature(f)["max_act"])
        else:
            missing.append(f)
    if missing:
        table = feature_max_activations(sae)  # (d_sae,); ValueError with a clear message when absent
        out.update({f: float(table[f]) for f in missing})
    return out


def check_width(x: torch.Tensor, d_in: int, hook: str) -> None:
    if x.shape[-1] != d_in:
        raise ValueError(f"the SAE reads d_in={d_in} but hook {hook!r} of this model has width {x.shape[-1]}: "
                         f"the SAE was trained on another model or hook (use the model named in its provenance)")


class SteeringHook:
    """The intervention ``f(x)`` installed at the hook; every edit applied in one small matmul.

    decode is affine, so decode(z′) + (x − decode(z)) = x + (z′ − z)·W_dec exactly: computing only the
    delta touches just the edited features' decoder rows, and an edit that changes nothing adds exact
    zeros, leaving the logits bit-identical (the literal formula would round x through decode(z)).
    """

    def __init__(self, sae, edits: Mapping[int, Edit], max_acts: Mapping[int, float], hook: str, device=None,
                 start: int = 0, vector: VectorAdd | None = None):
        feats = list(edits)
        # A call with one position is a cached decoding step (after the prompt: always edited); a longer call
        # is a prefill or a full forward, starting at position 0 (generate never chunks a prefill on our paths).
        self.start = start
        clamped = [f for f in feats if not isinstance(edits[f], Add)]
        conds = [edits[f].when for f in feats if edits[f].when is not None]
        needed = sorted(set(clamped) | {g for g, _ in conds})
        col = {f: i for i, f in enumerate(needed)}
        self.hook, self.d_in = hook, sae.cfg.d_in
        self.encoder = sae.subset_encoder(needed, device) if needed else None
        self.W = sae.W_dec.detach()[feats].to(device=device, dtype=torch.float32)  # (n_edits, d_in)
        self.target = torch.tensor([edits[f].value * max_acts[f] for f in feats], device=device)  # (n_edits,)
        self.is_clamp = torch.tensor([f in col and not isinstance(edits[f], Add) for f in feats], device=device)
        self.src = torch.tensor([col.get(f, 0) for f in feats], device=device)
        self.any_clamp = bool(clamped)
        self.cond_col = torch.tensor([col[e.when[0]] if e.when else 0 for e in edits.values()], device=device)
        self.cond_thr = torch.tensor([e.when[1] if e.when else -math.inf for e in edits.values()], device=device)
        self.any_cond = bool(conds)
        self.by_norm = torch.tensor([isinstance(e, Add) and e.unit == "norm" for e in edits.values()], device=device)
        self.any_norm = bool(self.by_norm.any())
        self.W_norm = self.W.norm(dim=1).clamp_min(1e-12)  # (n_edits,)
        self.vector = None
        if vector is not None:
            d = vector.direction.to(device=device, dtype=torch.float32)  # (d_in,)
            if d.shape != (self.d_in,):
                raise ValueError(f"the steering vector has shape {list(d.shape)}; the SAE's hook {hook!r} has width "
                                 f"{self.d_in}")
            self.vector = d / d.norm().clamp_min(1e-12) if vector.unit == "norm" else d
            self.vector_value, self.vector_by_norm = float(vector.value), vector.unit == "norm"
        self.sink_factor = Provenance.of(sae).sink_factor
        self.sink_norm: torch.Tensor | None = None   # (batch, 1) set by the last forward from the text's start
        self.first: torch.Tensor | None = None
        """``[batch]`` index of each row's BOS when rows are left-padded (set by the caller); else 0."""

    def editable(self, x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """``[positions]`` 0/1: the positions an edit may touch (:mod:`saelab.positions`).

        A forward from the start of the text (a prompt, or a text measured without cache) has BOS at
        position 0, the attention sink the SAE never saw in training: an edit there moves every later
        position. Positions whose norm exceeds the SAE's ``sink_factor`` × the median of the others
        are sinks too; KV-cached decoding steps (seq 1) are compared with the threshold of the
        forward that started their text.
        """
        b, t = x.shape[:2]
        norms = norms.view(b, t)                                                    # (b, t)
        if t > 1:
            first = self.first if self.first is not None and len(self.first) == b else torch.zeros(b, dtype=torch.long)
            counted = torch.arange(t, device=x.device)[None, :] > first.to(x.device)[:, None]   # (b, t)
            factor = self.sink_factor if self.sink_factor is not None else math.inf
            self.sink_norm = factor * window_median(norms, counted)                  # (b, 1)
            ok = counted & (norms <= self.sink_norm)
        elif self.sink_norm is not None and self.sink_norm.shape[0] == b:
            ok = norms <= self.sink_norm
        else:
            ok = torch.ones_like(norms, dtype=torch.bool)
        return ok.reshape(-1).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, seq, d_in)
        check_width(x, self.d_in, self.hook)
        flat = x.reshape(-1, x.shape[-1]).float()  # (positions, d_in)
        coef = self.target.expand(flat.shape[0], -1)  # (positions, n_edits)
        norms = flat.norm(dim=-1)  # (positions,)
        editable = self.editable(x, norms)  # (positions,)
        if self.any_norm:  # Add in "norm" units: value × ‖x_t‖ along the unit decoder direction
            coef = torch.where(self.by_norm, coef * norms[:, None] / self.W_norm, coef)
        if self.encoder is not None:
            z = self.encoder(flat)  # (positions, n_needed)
            if self.any_clamp:
                coef = torch.where(self.is_clamp, coef - z[:, self.src], coef)  # z′_f − z_f
            if self.any_cond:
                coef = torch.where(z[:, self.cond_col] > self.cond_thr, coef, 0.0)  # unconditioned: thr = −inf
        if self.start > 0 and x.shape[1] > 1:
            pos = torch.arange(x.shape[1], device=flat.device).repeat(x.shape[0])  # (positions,) index in sequence
            editable = editable * (pos >= self.start)
        coef = torch.where(editable[:, None] > 0, coef, 0.0)  # exact zeros: BOS, sinks, earlier positions untouched
        out = torch.addmm(flat, coef, self.W)  # x + Σ_f coef_f · W_dec[f]
        if self.vector is not None:
            scale = self.vector_value * (norms if self.vector_by_norm else torch.ones_like(norms)) * editable
            out = out + scale[:, None] * self.vector  # (positions, d_in)
        return out.view(x.shape).to(x.dtype)


def _check_edits(sae, edits: Mapping[int, Edit]) -> None:
    for f, e in edits.items():
        check_feature(sae, f)
        if not isinstance(e, (Clamp, Add, Ablate)):
            raise ValueError(f"feature {f}: expected Clamp, Add or Ablate, got {e!r}")
        if isinstance(e, Add) and e.unit not in UNITS:
            raise ValueError(f"feature {f}: unknown unit {e.unit!r}: choose 'max' or 'norm'")
        if isinstance(e.value, bool) or not isinstance(e.value, (int, float)) or not math.isfinite(e.value):
            raise ValueError(f"feature {f}: the dial value must be a finite number, got {e.value!r}")
        if e.when is not None:
            g, thr = e.when
            check_feature(sae, g)
            if not isinstance(thr, (int, float)) or not math.isfinite(thr):
                raise ValueError(f"feature {f}: the 'when' threshold must be a finite number, got {thr!r}")


@contextmanager
def steering(model, sae, edits: Mapping[int, Edit], *, max_act=None, db=None,
             hook: str | None = None, start: int = 0, vector: VectorAdd | None = None) -> Iterator[SteeringHook | None]:
    """Apply ``edits`` ({feature: Clamp | Add | Ablate}) at the SAE's hook inside the block.

    ``model``: a :class:`saelab.models.LoadedModel` or HF module. ``max_act``: explicit max activations
    ({feature: value} or a [d_sae] sequence); else ``db`` (features.db), else the SAE's provenance.
    ``start``: edit only positions ``>= start`` (see :func:`edit_start`). ``vector``: a plain direction added too.
    """
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a position >= 0, got {start!r}")
    module = as_module(model)
    name = hook or sae_hook_name(sae)
    resolve(module, name)  # HookError naming the valid hooks when the model has no such hook
    _check_edits(sae, edits)
    if not edits and vector is None:
        yield None
        return
    by_max = [f for f, e in edits.items() if e.value != 0 and not (isinstance(e, Add) and e.unit == "norm")]
    maxes = max_activations(sae, by_max, max_act, db)
    for f, m in maxes.items():
        if not m > 0:
            raise ValueError(f"feature {f} has max activation {m} (dead on the analysis corpus): a multiple of "
                             f"it is 0; pass an explicit max_act for it")
    maxes.update({f: 0.0 if e.value == 0 else 1.0 for f, e in edits.items() if f not in maxes})  # "norm": × 1
    fn = SteeringHook(sae, edits, maxes, name, device=next(module.parameters()).device, start=start, vector=vector)
    with intervene(module, {name: fn}):
        yield fn


@contextmanager
def dial_steering(model, sae, spec: DialSpec | None, strength: float | None, *, max_act=None, db=None,
                  start: int = 0) -> Iterator[SteeringHook | None]:
    """Turn the dial ``spec`` to ``strength`` inside the block (``None`` for either: no edit at all)."""
    if spec is None or strength is None:
        with steering(model, sae, {}) as fn:
            yield fn
        return
    maxes = max_activations(sae, list(spec.features), max_act, db) if spec.features and spec.mode != "ablate" else {}
    edits, vector = dial_edits(sae, spec, strength, maxes)
    with steering(model, sae, edits, max_act=maxes or None, start=start, vector=vector) as fn:
        yield fn


@torch.no_grad()
def measure(model, sae, ids: torch.Tensor, features: Sequence[int], hook: str | None = None,
            with_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unsteered forward of ``ids [1, n]``: features' activations ``[n, len(features)]`` and, with
    ``with_loss``, the next-token NLL ``[n - 1]`` (nats; entry i scores token i + 1)."""
    module, name = model.model, hook or sae_hook_name(sae)
    if not with_loss:
        x = run_to_hooks(module, ids, name)[name]
        return sae.subset_encoder(features, x.device)(x)[0], None
    with capture(module, name) as acts:
        logits = module(input_ids=ids, use_cache=False).logits.float()  # (1, n, vocab)
    nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")  # (n - 1,)
    return sae.subset_encoder(features, ids.device)(acts[name])[0], nll


class Comparison(NamedTuple):
    default_text: str
    """Continuation without intervention."""
    steered_text: str
    """Continuation with the edits, from the same seed."""
    steered_acts: dict[int, list[float]]
    """Each edited feature's activation at each steered generated token, measured without intervention."""
    steered_tokens: list[str]
    """The steered generated tokens those activations belong to."""


def compare_generations(model, sae, prompt: str, edits: Mapping[int, Edit], max_new_tokens: int = 40,
                        samples: int = 1, seed: int = 0, temperature: float = 1.0, *, max_act=None,
                        db=None, positions: str = "all", ids: torch.Tensor | None = None,
                        vector: VectorAdd | None = None) -> list[Comparison]:
    """Default and steered continuations of ``prompt`` side by side, one pair per sample.

    ``ids``: the prompt already encoded (``[1, n]``, e.g. with a chat template); else ``prompt`` with BOS.
    ``vector``: a plain direction added with the edits (:func:`dial_edits`)."""
    model = as_loaded_model(model)
    ids = prompt_ids(model, prompt, max_new_tokens) if ids is None else ids
    start = edit_start(positions, ids.shape[1])
    args = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, samples=samples)
    with steering(model, sae, {}):  # validates the hook before spending time on generation
        default = generate_ids(model, ids, **args)
    with steering(model, sae, edits, max_act=max_act, db=db, start=start, vector=vector):
        steered = generate_ids(model, ids, **args)
    feats, n, out = list(edits), ids.shape[1], []
    for d_row, s_row in zip(default, steered):
        d_new, s_new = generated_part(model, d_row, n), generated_part(model, s_row, n)
        acts, _ = measure(model, sae, torch.cat([ids[0], s_new])[None], feats)
        gen = acts[n:].T.tolist() if len(s_new) else [[] for _ in feats]  # (n_feats, n_new)
        tok = model.tokenizer
        out.append(Comparison(tok.decode(d_new, skip_special_tokens=True), tok.decode(s_new, skip_special_tokens=True),
                              dict(zip(feats, gen)), [tok.decode([t]) for t in s_new.tolist()]))
    return out
