"""The main job: every stage on the embedded default, then the browser.

``saelab demo`` runs on the builtin model; ``saelab demo --model smollm2`` on the real chat model
SmolLM2-135M-Instruct (layer 15 of 30, the corpus ``english+chat:smollm2``: English prose and the model's
own chat answers, which also ships). A trained SAE for SmolLM2 ships with saelab (:data:`SHIPPED`, made by
:meth:`DemoConfig.smollm2` with ``full=True``: harvest 326,144 tokens, train TopK 8192/k 32 on 2M tokens),
so the real-model demo evaluates, analyses and serves it without the ~15 minutes of harvest and training
on two cores; ``--full`` makes it from scratch.

    runs/demo/acts/         harvest of the builtin model's middle residual stream on the stdlib corpus
    runs/demo/sae/          a TopK SAE trained on it (SAELens-compatible folder + saelab.json)
    runs/demo/eval.json     its evaluation (also in sae/eval.json)
    runs/demo/features.db   the analysis of every feature

Each stage is skipped when its artifact is already complete, and an interrupted stage resumes
(harvest and training checkpoint), so re-running ``saelab demo`` is cheap.
"""

from __future__ import annotations

import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from saelab.analyze import analyze
from saelab.evaluate import evaluate
from saelab.featuredb import FeatureDB
from saelab.formats import load_sae
from saelab.harvest import harvest
from saelab.models import load_model
from saelab.progress import format_duration
from saelab.provenance import Provenance
from saelab.runtime import shell_command
from saelab.store import ActivationStore
from saelab.train import TrainConfig, train

SHIPPED = Path(__file__).parent / "shipped"
"""Trained SAEs that ship with saelab, one folder per model (float16 weights)."""


@dataclass
class DemoConfig:
    """Sizes of the demo run. ``quick()`` gives the smaller first look."""

    run: Path = Path("runs/demo")
    """Run folder."""
    model: str = "builtin"
    """Model to study."""
    hook: str = "blocks.1.hook_resid_post"
    """The middle of the builtin model's 4-layer residual stream."""
    corpus: str = "stdlib"
    """Corpus spec (train split for harvest/training, validation split for eval/analysis)."""
    context: int = 256
    """Tokens per sequence."""
    harvest_tokens: int = 2_000_000
    """Activations stored."""
    train_tokens: int | None = None
    """Training tokens (None: one pass over the store, ``harvest_tokens``)."""
    latents: int = 4096
    """SAE width."""
    k: int = 32
    """Active latents per token (TopK)."""
    eval_tokens: int = 100_000
    """Held-out tokens for the evaluation."""
    analyze_tokens: int = 1_000_000
    """Tokens of the analysis pass (validation split first, then the rest of the corpus)."""
    map_method: str = "auto"
    """Feature map layout: auto (UMAP when installed) | umap | pca."""
    shipped_sae: Path | None = None
    """A trained SAE folder to copy in instead of harvesting and training (the real-model demo's)."""

    @classmethod
    def smollm2(cls, run: Path = Path("runs/demo-smollm2"), full: bool = False) -> "DemoConfig":
        """The real chat model: SmolLM2-135M-Instruct, the middle of its 30 layers, broad English text and the
        model's own chat answers in equal shares (the train split is 1,274 windows of 256 tokens)."""
        shipped = SHIPPED / "smollm2"
        return cls(run=run, model="smollm2", hook="blocks.15.hook_resid_post", corpus="english+chat:smollm2",
                   context=256, harvest_tokens=326_144, train_tokens=2_000_000, latents=8192, k=32, eval_tokens=16_384,
                   analyze_tokens=100_000,
                   shipped_sae=None if full or not (shipped / "cfg.json").is_file() else shipped)

    @classmethod
    def quick(cls, run: Path = Path("runs/demo-quick")) -> "DemoConfig":
        # PCA map: UMAP's first-run JIT compilation alone takes about a minute on two cores
        return cls(run=run, harvest_tokens=300_000, latents=2048, eval_tokens=20_000, analyze_tokens=100_000,
                   map_method="pca")


def _stage(name: str, say: Callable[[str], None], fn: Callable[[], str | None], done: bool) -> None:
    if done:
        say(f"[{name}] already complete, skipped")
        return
    say(f"[{name}] running...")
    t0 = time.monotonic()
    detail = fn()
    say(f"[{name}] done in {format_duration(time.monotonic() - t0)}" + (f": {detail}" if detail else ""))


def run_demo(config: DemoConfig | None = None, say: Callable[[str], None] = print) -> dict:
    """Run every stage that is not complete yet; return the summary (see :func:`summary`)."""
    c = config or DemoConfig()
    run = Path(c.run)
    acts, sae_dir, eval_path, db_path = run / "acts", run / "sae", run / "eval.json", run / "features.db"
    run.mkdir(parents=True, exist_ok=True)
    lm = load_model(c.model)

    def do_harvest() -> str:
        store = harvest(lm, c.hook, c.corpus, tokens=c.harvest_tokens, out=acts, context=c.context,
                        resume=(acts / "manifest.json").exists())
        return f"{store.n_rows:,} activations of width {store.d_in}"

    def do_train() -> str:
        cfg = TrainConfig(architecture="topk", d_sae=c.latents, k=c.k, tokens=c.train_tokens or c.harvest_tokens)
        sae = train(ActivationStore.open(acts), cfg, out=sae_dir, resume=(sae_dir / "checkpoint").exists())
        held = Provenance.of(sae).held_out or {}
        return f"held-out FVU {held.get('fvu', float('nan')):.3f}, L0 {held.get('l0', float('nan')):.1f}"

    def do_eval() -> str:
        report = evaluate(load_sae(sae_dir), lm, tokens=c.eval_tokens, progress=True)
        report.save(sae_dir)
        shutil.copyfile(sae_dir / "eval.json", eval_path)
        d = report.downstream
        return f"FVU {report.reconstruction.fvu:.3f}, CE recovered {d.ce_recovered_zero:.3f}" if d else None

    def do_analyze() -> str:
        analyze(sae_dir, lm, out=db_path, tokens=c.analyze_tokens, map=c.map_method)
        return str(db_path)

    trained = (sae_dir / "cfg.json").exists() and (sae_dir / "saelab.json").exists()
    if c.shipped_sae is not None:
        _stage("sae", say, lambda: _copy_shipped(c.shipped_sae, sae_dir), trained)
    else:
        _stage("harvest", say, do_harvest, _harvest_complete(acts))
        _stage("train", say, do_train, trained)
    _stage("eval", say, do_eval, eval_path.exists())
    _stage("analyze", say, do_analyze, db_path.exists())
    return summary(run)


def _copy_shipped(src: Path, sae_dir: Path) -> str:
    """Copy a shipped SAE folder into the run (whole, then renamed: no half folder on a kill)."""
    tmp = sae_dir.parent / f".{sae_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("README.md"))
    tmp.rename(sae_dir)
    return f"the SAE that ships with saelab ({src}); 'saelab demo --model {src.name} --full' trains one instead"


def _harvest_complete(acts: Path) -> bool:
    """The store's manifest says the harvest finished (all tokens, or the corpus ran out)."""
    try:
        ActivationStore.open(acts)
        return True
    except (ValueError, OSError):
        return False


def summary(run: Path, n_features: int = 5) -> dict:
    """FVU, L0, CE recovered, dead and live counts (each with the tokens it is over) and a few notable
    features (well-explained, mid-density) of a run."""
    import json

    report = json.loads((run / "eval.json").read_text())
    with FeatureDB.open(run / "features.db") as db:
        candidates = db.features(order_by="score", limit=200, min_density=1e-4, max_density=0.05)
        notable = [{"id": f["id"], "density": f["density"], "explanation": f["explanation"], "score": f["score"]}
                   for f in candidates if f["explanation"]][:n_features]
        live = len(db.live_features())
        info = db.sae_info()
    down = report.get("downstream") or {}
    sparsity = report["sparsity"]
    return {
        "run": str(run),
        "fvu": report["reconstruction"]["fvu"],
        "l0": sparsity["l0"],
        "d_sae": sparsity["d_sae"],
        "dead": sparsity["dead"],
        "dead_fraction": sparsity["dead_fraction"],
        "eval_tokens": report["reconstruction"]["tokens"],
        "ce_clean": down.get("ce_clean"),
        "ce_spliced": down.get("ce_spliced"),
        "ce_recovered": down.get("ce_recovered_zero"),
        "live_features": live,
        "analysed_tokens": info.get("tokens_analysed"),
        "notable": notable,
    }


def format_summary(s: dict, url: str | None) -> str:
    analysed = f" of {s['analysed_tokens']:,}" if s.get("analysed_tokens") else ""
    lines = [f"run {s['run']}: FVU {s['fvu']:.3f}, L0 {s['l0']:.1f}",
             f"{s['dead']:,} of {s['d_sae']:,} features ({s['dead_fraction']:.1%}) never fired on the "
             f"{s['eval_tokens']:,} eval tokens; {s['live_features']:,} fired on some{analysed} analysis tokens"]
    if s["ce_clean"] is not None:
        lines.append(f"CE clean {s['ce_clean']:.3f}, with the SAE spliced in {s['ce_spliced']:.3f}, "
                     f"CE recovered {s['ce_recovered']:.3f}")
    for f in s["notable"]:
        score = f" (detection {f['score']:.2f})" if f["score"] is not None else ""
        lines.append(f"  feature {f['id']:>5}: {f['explanation']}{score}")
    serve = f"{shell_command()} serve {shlex.quote(s['run'])}"
    if url:
        lines.append(f"browse: {url}   (Ctrl-C stops the server; '{serve}' starts it again)")
    else:
        lines.append(f"browse: '{serve}' serves it on http://127.0.0.1:8765/")
    return "\n".join(lines)
