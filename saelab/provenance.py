"""Where an SAE comes from, as one typed record, and what every later stage takes from it.

An SAE folder says where it belongs in two places: ``saelab.json`` (ours: the whole training record)
and ``cfg.json``'s ``metadata`` (SAELens' keys, the only ones a foreign SAE has). One precedence rule:
**saelab.json first, then cfg.json metadata, then the default**. :meth:`Provenance.of` applies it once;
:func:`stage_inputs` turns it into the model, hook, corpus, context and position rule a stage runs
with, explicit arguments overriding it. No stage reads either file's keys itself.

It is written where the data comes from: :meth:`Provenance.from_store` (an activation store's manifest)
and :meth:`Provenance.from_stream` (activations streamed from a model), both as saelab.json keys by
:meth:`Provenance.to_json`, so a streamed SAE records the same position rule a stored one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from saelab.corpus import WINDOW_START, CorpusSpec, bos_token_id
from saelab.positions import PositionRule

DEFAULT_CONTEXT = 256
"""Window length when neither the caller nor the SAE says (every stage: eval, analysis, monitoring)."""
DEFAULT_CORPUS = "stdlib"


@dataclass(frozen=True)
class Provenance:
    """What an SAE records about its origin (any field may be unknown for a foreign SAE)."""

    model_name: str | None
    """The model it was trained on: ``builtin``, ``smollm2``, a hub id, a folder or a .gguf path."""
    model_weights_sha256: str | None
    """sha256 of that model's float32 weights (names, shapes, bytes)."""
    gguf_sha256: str | None
    """sha256 of the GGUF file the model was converted from, when it was one."""
    hook_read: str | None
    """The hook whose activation the SAE encodes."""
    hook_written: str | None
    """The hook whose activation the SAE reconstructs (equal to ``hook_read`` for SAEs; transcoders differ)."""
    corpus: dict | None
    """``{"source", "split", "seed"}`` of the training text."""
    context: int | None
    """Tokens per window in training."""
    exclude_bos: bool
    """BOS positions (window starts, the attention sink; document separators) were left out of training."""
    window_start: str | None
    """``"bos"`` when every training window started with BOS; None for older stores and foreign SAEs."""
    sink_factor: float | None
    """Positions above this × their window's median norm were left out (:mod:`saelab.positions`)."""
    feature_max_act: list[float] | None
    """Per-feature maximum activation seen in training (what ``Clamp(10x)`` multiplies)."""
    hf_hook_name: str | None = None
    """The hook's Hugging Face module path (``model.layers.3``)."""
    hook_io: str | None = None
    """Whether the hook module's ``input`` or ``output`` is meant."""
    bos_token_id: int | None = None
    """The tokenizer's BOS id in training."""
    prepend_bos: bool | None = None
    """Every document was preceded by BOS (SAELens' ``prepend_bos``)."""
    rule_recorded: bool = False
    """The data source recorded its BOS and position rule (stores since ``positions``, every stream)."""
    held_out: dict | None = None
    """Held-out statistics measured at the end of training (fvu, l0, dead_fraction, tokens)."""
    train_config: dict | None = None
    """The whole TrainConfig it was trained with (``saelab.train.TrainConfig``, as JSON)."""
    tokens_trained: int | None = None
    """Tokens seen in training."""

    @property
    def heldout_fraction(self) -> float:
        """The fraction of the store's sequences training held out (0.05 when unrecorded)."""
        return float((self.train_config or {}).get("heldout_fraction") or 0.05)

    @classmethod
    def of(cls, sae) -> "Provenance":
        """Read ``sae.provenance`` (saelab.json) over ``sae.cfg.metadata`` (cfg.json)."""
        record, meta = dict(sae.provenance or {}), dict(sae.cfg.metadata or {})

        def pick(*keys):
            for where in (record, record.get("train_config") or {}, meta):
                for key in keys:
                    if where.get(key) is not None:
                        return where[key]
            return None

        hook = pick("hook_name", "hf_hook_name")
        corpus = record.get("corpus")
        if isinstance(corpus, str):
            corpus = {"source": corpus}
        bos = record.get("bos") if isinstance(record.get("bos"), dict) else {}
        exclude = bos.get("excluded")
        if exclude is None:
            exclude = pick("exclude_bos", "exclude_special_tokens")
        context = pick("context_size", "context")
        positions = record.get("positions") if isinstance(record.get("positions"), dict) else {}
        max_act = record.get("feature_max_act")
        bos_id = bos.get("token_id", positions.get("bos_token_id"))
        dicts = {key: record[key] if isinstance(record.get(key), dict) else None for key in ("held_out", "train_config")}
        return cls(model_name=pick("model_name"), model_weights_sha256=pick("model_weights_sha256"),
                   gguf_sha256=pick("gguf_sha256"), hook_read=hook, hook_written=pick("hook_written") or hook,
                   corpus=corpus if isinstance(corpus, dict) else None,
                   context=int(context) if context else None, exclude_bos=bool(exclude),
                   window_start=bos.get("window_start") or pick("window_start"),
                   sink_factor=positions.get("sink_factor"),
                   feature_max_act=list(max_act) if max_act is not None else None,
                   hf_hook_name=pick("hf_hook_name"), hook_io=pick("hook_io"), bos_token_id=bos_id,
                   prepend_bos=bos.get("prepended_per_document", pick("prepend_bos")),
                   rule_recorded=bool(bos or positions), tokens_trained=record.get("tokens_trained"), **dicts)

    @classmethod
    def from_store(cls, store) -> "Provenance":
        """What an activation store's manifest says about its rows (model, hook, corpus, BOS and position rule)."""
        m = store.manifest
        bos = m.get("bos") if isinstance(m.get("bos"), dict) else {}
        positions = m.get("positions") if isinstance(m.get("positions"), dict) else {}
        return cls(model_name=m.get("model_name"), model_weights_sha256=m.get("model_weights_sha256"),
                   gguf_sha256=m.get("gguf_sha256"), hook_read=m.get("hook_name"), hook_written=m.get("hook_name"),
                   corpus=m.get("corpus"), context=m.get("context"), exclude_bos=bool(bos.get("excluded")),
                   window_start=bos.get("window_start"), sink_factor=positions.get("sink_factor"),
                   feature_max_act=None, hf_hook_name=m.get("hf_hook_name"), hook_io=m.get("hook_io"),
                   bos_token_id=bos.get("token_id"), prepend_bos=bos.get("prepended_per_document"),
                   rule_recorded=bool(bos or positions))

    @classmethod
    def from_stream(cls, lm, point, corpus: CorpusSpec, *, seed: int, context: int, rule: PositionRule,
                    bos_id: int | None) -> "Provenance":
        """What activations streamed from ``lm`` (a LoadedModel) at ``point`` (a resolved hook) are: the same
        windows a harvest makes (:func:`saelab.token_cache.sequences`), with ``rule``'s positions left out."""
        return cls(model_name=lm.name, model_weights_sha256=lm.weights_hash, gguf_sha256=lm.gguf_sha256,
                   hook_read=point.name, hook_written=point.name, corpus={**corpus.to_json(), "seed": seed},
                   context=context, exclude_bos=rule.bos_id is not None, window_start=WINDOW_START,
                   sink_factor=rule.sink_factor, feature_max_act=None, hf_hook_name=point.hf_hook_name,
                   hook_io=point.io, bos_token_id=bos_id, prepend_bos=True, rule_recorded=True)

    def position_rule(self, tokenizer=None, exclude_bos: bool | None = None) -> PositionRule:
        """The positions every stage leaves out for this SAE: those its training data left out (BOS kept when
        unrecorded). ``tokenizer``: take the BOS id from it (else the recorded one); ``exclude_bos``: override."""
        bos_id = bos_token_id(tokenizer) if tokenizer is not None else self.bos_token_id
        exclude = self.exclude_bos if exclude_bos is None else exclude_bos
        return PositionRule(bos_id if exclude else None, self.sink_factor)

    def to_json(self) -> dict:
        """The saelab.json keys of where the data came from (what :meth:`of` reads back); unknowns left out.

        A source that left BOS out records it as SAELens' ``exclude_special_tokens`` (the excluded token
        ids; False when BOS rows were kept), which also goes into cfg.json's metadata, where a SAELens user
        and :func:`saelab.evaluate.evaluate` look."""
        excluded = [self.bos_token_id] if self.exclude_bos and self.bos_token_id is not None else self.exclude_bos
        out = {"model_name": self.model_name, "model_weights_sha256": self.model_weights_sha256,
               "hook_name": self.hook_read, "hf_hook_name": self.hf_hook_name, "hook_io": self.hook_io,
               "corpus": self.corpus, "context_size": self.context, "gguf_sha256": self.gguf_sha256}
        if self.rule_recorded:
            bos = {"token_id": self.bos_token_id, "prepended_per_document": self.prepend_bos,
                   "window_start": self.window_start, "excluded": self.exclude_bos}
            out.update(prepend_bos=self.prepend_bos, exclude_special_tokens=excluded,
                       bos={k: v for k, v in bos.items() if v is not None},
                       positions=PositionRule(self.bos_token_id if self.exclude_bos else None,
                                              self.sink_factor).to_json())
        return {k: v for k, v in out.items() if v is not None}


class StageInputs(NamedTuple):
    """What a stage runs with: the SAE's provenance with the caller's overrides applied."""

    model_name: str
    hook: str
    corpus: CorpusSpec
    context: int
    exclude_bos: bool
    provenance: Provenance


def stage_inputs(sae, *, model: str | None = None, hook: str | None = None, corpus: CorpusSpec | str | None = None,
                 context: int | None = None, split: str = "validation", exclude_bos: bool | None = None,
                 max_positions: int | None = None) -> StageInputs:
    """Model, hook, corpus, context and BOS rule for a stage on ``sae``; explicit arguments win.

    ``corpus`` as a string is a source read in ``split``; by default the SAE's training corpus in
    ``split``. ``context`` defaults to the SAE's training context, else :data:`DEFAULT_CONTEXT`, and is
    capped at ``max_positions`` (the model's limit, when the caller has loaded it).
    """
    prov = Provenance.of(sae)
    name = model or prov.model_name
    if not name:
        raise ValueError("the SAE does not record its model (no model_name in saelab.json or cfg.json "
                         "metadata); pass the model (CLI: --model)")
    hook = hook or prov.hook_read
    if not hook:
        raise ValueError("the SAE does not record the hook it was trained on (no hook_name in saelab.json or "
                         "cfg.json metadata); pass the hook (CLI: --hook)")
    if isinstance(corpus, str):
        corpus = CorpusSpec(corpus, split)
    if corpus is None:
        source = (prov.corpus or {}).get("source")
        corpus = CorpusSpec(source if isinstance(source, str) and source else DEFAULT_CORPUS, split)
    context = int(context or prov.context or DEFAULT_CONTEXT)
    if max_positions:
        context = min(context, max_positions)
    return StageInputs(name, hook, corpus, context, prov.exclude_bos if exclude_bos is None else exclude_bos, prov)
