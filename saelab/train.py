"""Training sparse autoencoders: every architecture (saelab.arch), a sparse TopK step for CPUs, checkpoints, DDP.

Inputs are scaled by one scalar s so that E‖s·x‖² = d_in (Anthropic, April 2024 update); s is folded
into the weights on save, so the saved SAE reads raw activations. Losses (per token, batch mean):

- relu:      ‖x − x̂‖² + λ(t) Σ_i z_i ‖W_dec,i‖            λ warmed up over the first 5% of steps
- topk:      ‖x − x̂‖² + α ‖e − ê‖²,  e = x − x̂,  ê = W_decᵀ z_aux, z_aux = top-k_aux dead latents (Gao §A.2)
- batchtopk: the same with the top k·batch latents over the batch (Bussmann et al. 2024)
- jumprelu:  ‖x − x̂‖² + λ(t) Σ_i H(pre_i − θ_i), straight-through pseudo-gradients (Rajamanoharan)
- matryoshka_batchtopk: batchtopk's, with every nested prefix of the dictionary reconstructing x too

Each is its architecture's class (:mod:`saelab.arch`), which the trainer asks for the loss.

TopK and BatchTopK keep a unit-norm decoder (gradient projected, rows renormalised after each
step) and never build the dense ``(batch, d_sae)`` latents: their gradients are written by hand in
:mod:`saelab.arch.sparse`. The hyperparameters and schedules are :mod:`saelab.train_config`, data
parallelism (torchrun) is :mod:`saelab.distributed`, one SAE's optimiser and step are
:mod:`saelab.trainer`; this module runs them over data (resume, checkpoints, logs, saving).
"""

from __future__ import annotations

import json
import signal
import threading
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from saelab.atomic import (atomic_dir, recover_dir, remove_stale_temps, storage_errors, truncate_jsonl_log,
                           write_json, write_tensors)
from saelab.distributed import World, default_device
from saelab.locks import exclusive
from saelab.progress import bar as progress_bar
from saelab.formats import load_sae, save_sae
from saelab.runtime import tune_allocator
from saelab.provenance import Provenance
from saelab.sae import SAE
from saelab.train_config import RUN_ONLY_FIELDS, TrainConfig
from saelab.trainer import CHECKPOINT_FORMAT, Trainer, heldout_stats

CHECKPOINT, LOG = "checkpoint", "train_log.jsonl"


# -- the run ---------------------------------------------------------------------------------------

def _source_info(source, d_in: int) -> dict:
    """What identifies the data of a run (a resumed run must read the same)."""
    if hasattr(source, "manifest"):
        m = source.manifest
        return {"kind": "store", "model_name": m.get("model_name"), "hook_name": m.get("hook_name"),
                "model_weights_sha256": m.get("model_weights_sha256"), "n_rows": source.n_rows, "d_in": d_in}
    return {"kind": "iterator", "d_in": d_in}


def store_provenance(store) -> dict:
    """saelab.json keys taken from an activation store's manifest (:meth:`Provenance.from_store`)."""
    return Provenance.from_store(store).to_json()


def _open_run(out: Path | None, resume: bool, world: World):
    """Check ``out`` and return the checkpoint (tensors, meta), None to start fresh, or "finished"."""
    if out is None:
        if resume:
            raise ValueError("resume needs the run folder (out) that holds the checkpoint")
        return None
    ckpt = out / CHECKPOINT
    recover_dir(out)
    recover_dir(ckpt)
    remove_stale_temps(out)      # a run folder or checkpoint write cut short by a kill
    remove_stale_temps(ckpt)
    if resume and (ckpt / "state.json").exists():
        meta = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt / 'state.json'} is not a saelab training checkpoint")
        return load_file(str(ckpt / "state.safetensors")), meta
    if resume and (out / "cfg.json").exists():
        return "finished"
    # A run stopped before its first checkpoint (kill, NaN) leaves at most its log: start again.
    if not resume and out.exists() and any(p.name != LOG for p in out.iterdir()):
        raise FileExistsError(f"{out} is not empty; pass --resume to continue the run in it, or choose a new --out")
    return None


def _check_resume(meta: dict, cfg: TrainConfig, source: dict, where: Path) -> None:
    saved = meta["config"]
    now = asdict(cfg)
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now
            if k not in RUN_ONLY_FIELDS and saved.get(k) != now[k]]
    diff += [f"data {k}: checkpoint {meta['source'].get(k)!r}, now {v!r}" for k, v in source.items()
             if meta["source"].get(k) != v]
    if diff:
        raise ValueError(f"refusing to resume {where}: the run was started with a different configuration "
                         f"({'; '.join(diff)}). Resume with the original settings or use a new --out")


def _batches(source, cfg: TrainConfig, world: World, start: int) -> tuple[Iterator[torch.Tensor], torch.Tensor]:
    """This rank's training batches from global batch ``start`` on, and the first global batch (init sample)."""
    per_rank = cfg.batch_size // world.size
    if hasattr(source, "batches"):
        kw = dict(seed=cfg.seed, split="train", heldout_fraction=cfg.heldout_fraction, rank=world.rank,
                  world_size=world.size)
        first_it = source.batches(per_rank, start_batch=0, **kw)
        first = next(iter(first_it))
        first_it.close()
        return source.batches(per_rank, start_batch=start, **kw), first
    it = iter(source)
    for _ in range(start):          # a plain iterator cannot seek: replay it (same seed → same batches)
        next(it)
    first = next(it)
    return _chain(first, it), first


def _chain(first, rest):
    yield first
    yield from rest


class _StopOnSignals:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step (a second one interrupts)."""

    def __init__(self, trainers: list[Trainer]):
        self.trainers, self.old = trainers, {}

    def _handle(self, signum, frame) -> None:
        if any(t.stop_requested for t in self.trainers):
            raise KeyboardInterrupt
        for t in self.trainers:
            t.stop_requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _save_checkpoint(trainer: Trainer, out: Path, source: dict) -> None:
    tensors, meta = trainer.state(source)
    with atomic_dir(out / CHECKPOINT) as tmp:
        write_tensors(tmp / "state.safetensors", tensors)
        write_json(tmp / "state.json", meta)


class _Logger:
    """JSONL records in the run folder, a progress bar, and optionally wandb and a callback (rank 0 only)."""

    def __init__(self, cfg: TrainConfig, out: Path | None, world: World, start: int, callback, progress: bool,
                 desc: str = ""):
        self.main, self.callback = world.is_main, callback
        self.path = out / LOG if out is not None and self.main else None
        self.file = None                 # opened at the first record: a run that stops before it leaves no log
        self.bar = progress_bar(total=cfg.steps, initial=start, unit="step", desc=desc or f"train {cfg.architecture}",
                        disable=not (progress and self.main))
        self.wandb = None
        if cfg.wandb_project and self.main:
            try:
                import wandb
            except ImportError:
                raise ImportError("wandb logging needs the wandb extra: pip install 'saelab[wandb]'") from None
            # one wandb run per SAE of a pass, named after its folder
            named = {"name": out.name, "reinit": True} if desc and out is not None else {}
            self.wandb = wandb.init(project=cfg.wandb_project, config=asdict(cfg), **named)
        self.t0, self.step0 = time.perf_counter(), start

    def record(self, m: dict, cfg: TrainConfig) -> None:
        self.bar.update(1)
        if not self.main or (m["step"] % cfg.log_every and m["step"] != cfg.steps):
            return
        now = time.perf_counter()
        rec = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()}
        rec["tokens_per_s"] = round((m["step"] - self.step0) * cfg.batch_size / max(now - self.t0, 1e-9), 1)
        self.t0, self.step0 = now, m["step"]
        if self.path is not None:
            with storage_errors(self.path):
                if self.file is None:
                    self.file = open(self.path, "a", encoding="utf-8")
                self.file.write(json.dumps(rec) + "\n")
                self.file.flush()
        self.bar.set_postfix(fvu=f"{m['fvu']:.3f}", l0=f"{m['l0']:.1f}", dead=f"{m['dead_fraction']:.1%}")
        if self.wandb:
            self.wandb.log(rec, step=m["step"])
        if self.callback:
            self.callback(rec)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()


def train(source, config: TrainConfig, out: str | Path | None = None, resume: bool = False,
          log: Callable[[dict], None] | None = None, progress: bool = True, provenance: dict | None = None) -> SAE:
    """Train an SAE on ``source`` (an ActivationStore, or any iterator of float32 ``[batch, d_in]`` batches).

    ``out``: the run folder; it holds ``train_log.jsonl`` and ``checkpoint/`` while training and becomes
    the SAE folder (+ the log) at the end. ``resume`` continues from its checkpoint, bitwise as if never
    stopped (a plain iterator is replayed from its start). Under torchrun, each rank reads its slice of
    every global batch of ``config.batch_size`` rows; only rank 0 writes. ``log`` receives each log
    record. ``provenance`` adds saelab.json keys (the store's manifest supplies model, hook, corpus).
    Returns the SAE for raw activations, with ``sae.provenance``.
    """
    log_one = (lambda i, rec: log(rec)) if log else None
    return train_many(source, [config], [out], resume, log_one, progress, provenance)[0]


SHARED_FIELDS = ("batch_size", "seed", "heldout_fraction", "device", "deterministic")
"""Fields every SAE of one pass shares: they decide the batches (and where they are computed)."""


def train_many(source, configs: list[TrainConfig], outs: list[str | Path | None], resume: bool = False,
               log: Callable[[int, dict], None] | None = None, progress: bool = True,
               provenance: dict | None = None) -> list[SAE]:
    """Train several SAEs in one pass over ``source``: each batch is read once and fed to every SAE.

    Each SAE ``i`` is trained exactly as ``train(source, configs[i], outs[i], ...)`` would train it alone
    (same batches, same steps, same folder, checkpoints and resume), so the configs must agree on
    :data:`SHARED_FIELDS`. ``log(i, record)`` receives SAE ``i``'s log records. A resume may find the SAEs at
    different steps (a kill between two checkpoint writes): the pass restarts at the earliest and each SAE
    joins at its own step; a finished SAE is loaded, not retrained. Returns the SAEs in the order given.
    """
    if not configs or len(configs) != len(outs):
        raise ValueError(f"train_many needs one out per config, got {len(configs)} configs and {len(outs)} outs")
    for f in SHARED_FIELDS:
        values = {repr(getattr(c, f)) for c in configs}
        if len(values) > 1:
            raise ValueError(f"SAEs trained in one pass must share {f}; got {', '.join(sorted(values))}")
    tune_allocator()   # long batch job: keep big blocks in the heap (saelab.runtime)
    device = default_device(configs[0].device)
    world = World(device)
    ok = False
    outs = [Path(o).expanduser() if o is not None else None for o in outs]
    if len({o for o in outs if o is not None}) < sum(o is not None for o in outs):
        raise ValueError("two SAEs of one pass cannot share a run folder")
    try:
        with ExitStack() as locks:
            for o in outs:
                if o is not None and world.is_main:
                    locks.enter_context(exclusive(o, "training"))
            saes = _train(source, configs, outs, resume, log, progress, provenance or {}, world, device)
        ok = True
        return saes
    finally:
        if ok:
            world.close()
        elif world.owns_group:
            dist.destroy_process_group()


class _Run(NamedTuple):
    """One SAE of a pass: where it goes and what drives it."""

    index: int
    out: Path | None
    trainer: Trainer
    logger: _Logger


def _train(source, configs, outs, resume, log, progress, provenance, world, device) -> list[SAE]:
    ckpts = [_open_run(out, resume, world) for out in outs]
    saes: list[SAE | None] = [load_sae(out) if c == "finished" else None for c, out in zip(ckpts, outs)]
    todo = [i for i, s in enumerate(saes) if s is None]
    if not todo:
        return saes
    if configs[0].batch_size % world.size:
        raise ValueError(f"batch_size {configs[0].batch_size} is not divisible by the {world.size} ranks")
    start = min(ckpts[i][1]["step"] if ckpts[i] else 0 for i in todo)
    it, first = _batches(source, configs[0], world, start)
    d_in = first.shape[1]
    info = _source_info(source, d_in)
    sample = None
    resolved = {i: configs[i].resolved(d_in) for i in todo}   # every config checked before any folder is made
    runs = []
    for i in todo:
        cfg, ckpt, out = resolved[i], ckpts[i], outs[i]
        trainer = Trainer(cfg, d_in, world, device)
        if ckpt:
            _check_resume(ckpt[1], cfg, info, out)
            trainer.load_state(*ckpt)
            if world.is_main:
                truncate_jsonl_log(out / LOG, trainer.step)
        else:
            if out is not None and world.is_main:
                truncate_jsonl_log(out / LOG, 0)      # records of a run killed before its first checkpoint
            if sample is None:
                sample = world.gather_rows(first.to(device).float())
            trainer.initialize(sample)
        if out is not None and world.is_main:
            out.mkdir(parents=True, exist_ok=True)
        desc = "" if len(configs) == 1 else f"train {len(todo)} SAEs"
        callback = (lambda rec, i=i: log(i, rec)) if log else None
        runs.append(_Run(i, out, trainer, _Logger(cfg, out, world, trainer.step, callback,
                                                  progress and i == todo[0], desc)))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(configs[0].deterministic or previous)
    try:
        with _StopOnSignals([r.trainer for r in runs]):
            _loop(runs, it, start, info, world)
    finally:
        for r in runs:
            r.logger.close()
        torch.use_deterministic_algorithms(previous)
    finished = _finish([r.trainer for r in runs], source, it, [r.out for r in runs], info, provenance)
    for r, sae in zip(runs, finished):
        saes[r.index] = sae
    return saes


def _loop(runs: list[_Run], it: Iterator[torch.Tensor], step: int, info: dict, world: World) -> None:
    """Global batch ``step`` on: each batch goes to every SAE that is at that step and not done."""
    batch_size, d_in = runs[0].trainer.cfg.batch_size, runs[0].trainer.sae.d_in
    per_rank, device = batch_size // world.size, runs[0].trainer.device
    while any(r.trainer.step < r.trainer.cfg.steps for r in runs):
        x = next(it, None)
        if x is None:
            warnings.warn(f"the data ran out after {step} of {max(r.trainer.cfg.steps for r in runs)} steps; "
                          "finishing early")
            return
        if x.shape != (per_rank, d_in):
            raise ValueError(f"batch {step} has shape {tuple(x.shape)}, expected ({per_rank}, {d_in}) "
                             f"(batch_size {batch_size} over {world.size} ranks)")
        x = x.to(device, non_blocking=True).float()
        stepped = []
        for r in runs:
            trainer, cfg = r.trainer, r.trainer.cfg
            if trainer.step != step or trainer.step >= cfg.steps:
                continue                      # ahead of the pass (resumed from a later checkpoint) or done
            m = trainer.train_step(x)
            m[trainer.rule.aux_metric] = m.pop("aux")
            r.logger.record(m, cfg)
            stepped.append(r)
        step += 1
        # a signal reaches every trainer; their flags were all-reduced in the step, so every rank agrees
        stop = any(r.trainer.stop_requested for r in stepped)
        for r in stepped:
            cfg = r.trainer.cfg
            due = cfg.checkpoint_every and r.trainer.step % cfg.checkpoint_every == 0
            if r.out is not None and world.is_main and r.trainer.step < cfg.steps and (due or stop):
                _save_checkpoint(r.trainer, r.out, info)
        if stop:
            outs = [str(r.out / CHECKPOINT) for r in stepped if r.out is not None]
            where = f"; checkpoint in {', '.join(outs)}, continue with --resume" if outs else ""
            raise KeyboardInterrupt(f"training stopped by a signal at step {step}{where}")


def _finish(trainers: list[Trainer], source, it, outs: list[Path | None], info: dict, provenance: dict) -> list[SAE]:
    """Fold the scale in, evaluate on held-out data, attach provenance, save (rank 0)."""
    saes = [t.finished_sae() for t in trainers]
    if not trainers[0].world.is_main:
        return saes
    cfg = trainers[0].cfg
    if hasattr(source, "batches"):
        if hasattr(it, "close"):
            it.close()
        use = _has_heldout(source, cfg)
        helds = [source.batches(cfg.batch_size, split="heldout", heldout_fraction=cfg.heldout_fraction,
                                shuffle=False, epochs=1) if use else iter(()) for _ in trainers]
    elif len(trainers) == 1:
        helds = [it]                  # batches the run never trained on
    else:                             # a plain iterator is read once: every SAE gets the same held-out rows
        held, n = [], 0
        for x in it:
            if n >= max(t.cfg.eval_tokens for t in trainers):
                break
            held.append(x)
            n += x.shape[0]
        helds = [held] * len(trainers)
    for trainer, sae, held, out in zip(trainers, saes, helds, outs):
        cfg = trainer.cfg
        stats = heldout_stats(sae, held, cfg.eval_tokens)
        if hasattr(held, "close"):
            held.close()
        prov = {**(store_provenance(source) if hasattr(source, "manifest") else {}), **provenance,
                "tokens_trained": trainer.step * cfg.batch_size, "train_config": asdict(cfg),
                "input_scale": trainer.input_scale, "trained_architecture": cfg.architecture}
        if stats:
            prov["feature_max_act"] = stats.pop("feature_max_act")
            prov["feature_density"] = stats.pop("feature_density")
            prov["held_out"] = stats
        sae.provenance = prov
        if out is not None:
            with atomic_dir(out) as tmp:
                save_sae(sae, tmp, **prov)
                if (out / LOG).exists():
                    (tmp / LOG).write_bytes((out / LOG).read_bytes())
    return saes


def _has_heldout(store, cfg: TrainConfig) -> bool:
    return cfg.heldout_fraction > 0 and store.n_rows_in("heldout", cfg.heldout_fraction) >= cfg.batch_size
