"""Where training data comes from when there is no activation store: activations streamed from a model.

:class:`StreamSource` loads the model, resolves the hook, and gives both the batches
(:func:`saelab.harvest.stream_activations`) and their :class:`~saelab.provenance.Provenance`, built from
the same position rule the batches were filtered by, so a streamed SAE's saelab.json records which
positions it never saw, as a store-trained one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from saelab.corpus import CorpusSpec, bos_token_id
from saelab.harvest import stream_activations
from saelab.hooks import HookPoint, resolve
from saelab.models import LoadedModel, load_model
from saelab.positions import SINK_FACTOR, PositionRule
from saelab.provenance import Provenance


@dataclass
class StreamSource:
    """Activations of ``model`` at ``hook`` on ``corpus``, streamed while training."""

    model: LoadedModel
    """The loaded model."""
    point: HookPoint
    """The resolved hook."""
    corpus: CorpusSpec
    """The text it reads."""
    context: int = 256
    """Tokens per window."""
    seed: int = 0
    """Document order (rank r of a data-parallel run reads with seed + r)."""
    exclude_bos: bool = True
    """Leave out BOS positions (:mod:`saelab.positions`)."""
    sink_factor: float | None = SINK_FACTOR
    """Leave out positions above this × their window's median norm (None: keep them)."""

    @classmethod
    def open(cls, model: LoadedModel | str, hook: str, corpus: CorpusSpec | str = "stdlib", *, context: int = 256,
             seed: int = 0, device: str | torch.device = "cpu", **rule) -> "StreamSource":
        """Load ``model`` (a name, unless already loaded) and resolve ``hook`` on it; ``rule``: exclude_bos,
        sink_factor."""
        lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
        spec = CorpusSpec(corpus) if isinstance(corpus, str) else corpus
        return cls(lm, resolve(lm.model, hook), spec, context, seed, **rule)

    @property
    def rule(self) -> PositionRule:
        return PositionRule(bos_token_id(self.model.tokenizer) if self.exclude_bos else None, self.sink_factor)

    @property
    def provenance(self) -> Provenance:
        return Provenance.from_stream(self.model, self.point, self.corpus, seed=self.seed, context=self.context,
                                      rule=self.rule, bos_id=bos_token_id(self.model.tokenizer))

    def batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        """Endless float32 ``[batch_size // world, d_in]`` batches of this rank's share."""
        return stream_activations(self.model, self.point.name, self.corpus, context=self.context,
                                  batch_size=batch_size // world, seed=self.seed + rank, passes=None,
                                  exclude_bos=self.exclude_bos, sink_factor=self.sink_factor)
