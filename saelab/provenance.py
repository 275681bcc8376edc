"""Where an SAE comes from, as one typed record, and what every later stage takes from it.

An SAE folder says where it belongs in two places: ``saelab.json`` (ours: the whole training record)
and ``cfg.json``'s ``metadata`` (SAELens' keys, the only ones a foreign SAE has). One precedence rule:
**saelab.json first, then cfg.json metadata, then the default**. :meth:`Provenance.of` applies it once;
:func:`stage_inputs` turns it into the model, hook, corpus, context and position rule a stage runs
with, explicit arguments overriding it. No stage reads either file's keys itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from saelab.corpus import CorpusSpec

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
        return cls(model_name=pick("model_name"), model_weights_sha256=pick("model_weights_sha256"),
                   gguf_sha256=pick("gguf_sha256"), hook_read=hook, hook_written=pick("hook_written") or hook,
                   corpus=corpus if isinstance(corpus, dict) else None,
                   context=int(context) if context else None, exclude_bos=bool(exclude),
                   window_start=bos.get("window_start") or pick("window_start"),
                   sink_factor=positions.get("sink_factor"),
                   feature_max_act=list(max_act) if max_act is not None else None)


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
