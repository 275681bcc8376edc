"""The configs of the stages that read a model: harvest, evaluation, analysis.

One dataclass per stage, a one-line docstring under each field; the CLI builds them, the library
functions take them (or the same fields as keywords, which override a given config), and each stage
records its config whole: the store's manifest (``harvest``), the eval report (``config``) and
features.db's meta table (``config``). Training's config is :class:`saelab.train_config.TrainConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from saelab.positions import SINK_FACTOR

DTYPES = ("float32", "float16", "bfloat16")
NAN_POLICIES = ("fail", "skip")
ABLATIONS = (("zero",), ("zero", "mean"))


def with_overrides(cls, config, overrides: dict):
    """``config`` (or the defaults) with the keyword ``overrides`` applied; unknown names are a TypeError."""
    names = {f.name for f in fields(cls)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown options {sorted(unknown)}; valid: {sorted(names)}")
    return cls(**{**(asdict(config) if config is not None else {}), **overrides})


@dataclass(frozen=True)
class HarvestConfig:
    """What a harvest records: how many positions, in which windows, kept how."""

    tokens: int
    """Positions to harvest (rounded up to whole sequences)."""
    context: int = 256
    """Tokens per window (BOS first)."""
    batch_size: int = 32
    """Sequences per forward pass (a shard is a whole number of batches)."""
    dtype: str = "float32"
    """Storage dtype: float32, float16 or bfloat16."""
    seed: int = 0
    """Document order of the corpus."""
    exclude_bos: bool = True
    """Leave out BOS positions (window starts and document separators)."""
    sink_factor: float | None = SINK_FACTOR
    """Leave out positions above this × their window's median norm (attention sinks); None: keep them."""
    nan_policy: str = "fail"
    """fail: stop at a NaN/inf activation; skip: drop the whole sequence and record it."""
    shard_rows: int | None = None
    """Rows per shard (default: about 64 MB of activations)."""

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.context < 2 or self.batch_size < 1:
            raise ValueError(f"tokens, batch_size must be positive and context >= 2 (got {self.tokens}, "
                             f"{self.batch_size}, {self.context})")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"unknown nan_policy {self.nan_policy!r}; choose fail or skip")
        if self.sink_factor is not None and not self.sink_factor > 1:
            raise ValueError(f"sink_factor must be > 1 (a multiple of the window's median norm), got {self.sink_factor}")


@dataclass(frozen=True)
class EvalConfig:
    """How much held-out text an evaluation reads, and which baselines it runs."""

    tokens: int = 200_000
    """Tokens to evaluate on (rounded up to whole sequences)."""
    context: int | None = None
    """Window length; default the SAE's training context (else saelab.provenance.DEFAULT_CONTEXT)."""
    batch_size: int = 8
    """Sequences per forward pass (peak memory: a few [batch, context, vocab] logits)."""
    seed: int = 0
    """Document order of the corpus."""
    exclude_bos: bool | None = None
    """Leave BOS positions out; default what the SAE's provenance says."""
    ablations: tuple[str, ...] = ("zero",)
    """Baselines for CE recovered: ("zero",) or ("zero", "mean") (one more pass and forward per batch)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ablations", tuple(self.ablations))
        if self.tokens < 1 or self.batch_size < 1:
            raise ValueError(f"tokens and batch_size must be positive (got {self.tokens}, {self.batch_size})")
        if self.ablations not in ABLATIONS:
            raise ValueError(f"ablations must be ('zero',) or ('zero', 'mean'), got {self.ablations}")


@dataclass
class AnalyzeConfig:
    """Knobs of the analysis pass (defaults suit a 1M-token pass on CPU)."""

    tokens: int = 1_000_000
    """Tokens to analyse (rounded up to whole sequences)."""
    context: int | None = None
    """Sequence length; default the SAE's training context_size (else saelab.provenance.DEFAULT_CONTEXT)."""
    batch_size: int = 32
    """Sequences per forward pass."""
    split: str = "auto"
    """validation | train | all | auto (validation first, then train once it runs out)."""
    seed: int = 0
    """Document order and reservoir sampling."""
    k_top: int = 20
    """Top-activating contexts kept per feature."""
    n_quantiles: int = 5
    """Activation bands (equal fractions of the max) sampled per feature."""
    per_quantile: int = 4
    """Examples kept per band."""
    n_random: int = 6
    """Uniformly random firing examples per feature, and as many windows from a shared pool of uniformly
    random corpus windows (mostly non-firing: the negatives for detection scoring)."""
    pool: int = 256
    """Size of that shared pool of random windows."""
    window_left: int = 12
    """Tokens kept before the chosen token."""
    window_right: int = 4
    """Tokens kept after it."""
    skip_bos: bool = True
    """Leave BOS tokens out of stats and examples (attention sinks above the SAE's recorded sink_factor
    × their window's median norm are left out too: :mod:`saelab.positions`)."""
    coact_top: int = 8
    """Strongest latents per token counted for co-activation."""
    coact_max_pairs: int = 4_000_000
    """Pair-table size that triggers pruning to top partners."""
    coact_partners: int = 32
    """Partners kept per feature when pruning, and stored in the coactivation table."""
    n_logits: int = 10
    """Top and bottom logit-effect tokens stored."""
    n_neighbours: int = 10
    """Decoder / co-activation neighbours stored."""
    map: str = "auto"
    """auto | umap | pca | none."""
    explain: bool = True
    """Write offline explanations (and their detection scores) when saelab.explain is available."""
