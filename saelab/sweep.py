"""Sweeps: many SAEs of one architecture from one pass over the data (a scan of latents, of k, or both).

Every member is an ordinary training run (:func:`saelab.train.train_many` reads each batch once and feeds
it to all of them), so a member trains exactly as it would alone with the same config, and its folder is
exactly what ``saelab train --out`` writes. Members share the seed (so the data order) but not their initial
weights: each gets its own ``init_seed`` (:func:`member_init_seed`), recorded in its saelab.json; a solo
``saelab train --seed S --init-seed I`` makes the same SAE. The layout of a sweep folder ``OUT``:

    OUT/sweep.json          format "saelab-sweep", version 1: the store (acts; null when streamed from a
                            model), the shared train config (train_config, without d_sae and k) and the members,
                            smallest first: {"name", "d_sae", "k", "arch", "path"} (path relative to OUT)
    OUT/latents-01024/      an SAE folder (cfg.json, weights, saelab.json, train_log.jsonl)
    OUT/k-032/              ... named by what varies: latents-NNNNN, k-NNN, or latents-NNNNN-k-NNN

sweep.json is written once, after every member is saved: its presence means the sweep is complete.
``OUT/sweep-plan.json`` (the members and settings asked for) is written at the start, so that a resume
asking for another plan is refused instead of orphaning the members already trained.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from saelab import arch as architectures
from saelab.atomic import write_json
from saelab.locks import exclusive
from saelab.sae import SAE
from saelab.train import train_many
from saelab.train_config import RUN_ONLY_FIELDS, TrainConfig

FORMAT, VERSION, INDEX = "saelab-sweep", 1, "sweep.json"


class Member(NamedTuple):
    """One SAE of a sweep, as listed in sweep.json."""

    name: str
    """Folder name inside the sweep folder."""
    d_sae: int | None
    """Latents (None before training when the sweep scans only k: expansion × d_in)."""
    k: int | None
    """Active latents per token (None for relu/jumprelu)."""
    arch: str
    """Architecture trained."""
    path: str
    """Folder relative to the sweep folder."""


def parse_sizes(text: str | None, flag: str) -> list[int]:
    """``"1024,2048"`` → ``[1024, 2048]``; a clear error for anything but distinct positive integers."""
    if text is None:
        return []
    parts = [p.strip() for p in str(text).split(",")]
    bad = [p for p in parts if not (p.isascii() and p.isdigit()) or int(p) <= 0]   # "²".isdigit() is True
    if bad:
        raise ValueError(f"{flag} takes positive integers separated by commas (e.g. {flag} 1024,2048,4096); "
                         f"{', '.join(repr(p) for p in bad)} is not one")
    sizes = [int(p) for p in parts]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"{flag} lists a value twice: {text}")
    return sorted(sizes)


def member_init_seed(base: TrainConfig, d_sae: int | None, k: int | None) -> int:
    """Each member's own initial weights (see ``TrainConfig.init_seed``), fixed by the sweep's seed and its size."""
    if base.init_seed is not None:
        return base.init_seed
    return (base.seed * 1_000_003 + (d_sae or base.expansion) * 1009 + (k or 0)) % 2**63


def plan(base: TrainConfig, latents: Sequence[int], ks: Sequence[int]) -> list[tuple[Member, TrainConfig]]:
    """The members of a sweep over ``latents`` × ``ks`` (an empty list keeps ``base``'s value), smallest first."""
    latents, ks = sorted(latents) or [base.d_sae], sorted(ks) or [base.k]
    sparse = architectures.get(base.architecture).needs_k
    if len(ks) > 1 and not sparse:
        raise ValueError(f"a k scan needs a topk or batchtopk sweep; {base.architecture} has no k")
    out = []
    if sparse and latents[0] and ks[0] and max(ks) > latents[0]:   # before any member folder is made
        raise ValueError(f"{base.architecture}: k={max(ks)} is more than the smallest number of latents "
                         f"({latents[0]}); every member needs k <= latents")
    for d_sae in latents:
        for k in ks:
            parts = []
            if len(latents) > 1 or len(ks) == 1:
                parts.append(f"latents-{d_sae:05d}" if d_sae else f"expansion-{base.expansion:03d}")
            if len(ks) > 1:
                parts.append(f"k-{k:03d}")
            name = "-".join(parts)
            member = Member(name, d_sae, k if sparse else None, base.architecture, name)
            out.append((member, replace(base, d_sae=d_sae, k=k, init_seed=member_init_seed(base, d_sae, k))))
    return out


def sweep(source, base: TrainConfig, out: str | Path, latents: Sequence[int] = (), ks: Sequence[int] = (),
          resume: bool = False, log: Callable[[str, dict], None] | None = None, progress: bool = True,
          provenance: dict | None = None) -> list[SAE]:
    """Train one SAE per (latents, k) of the scan on ``source`` in one pass; returns them smallest first.

    ``base`` holds every other setting (tokens, seed, batch size, ...). ``resume`` continues every member
    from its checkpoint (a finished member is loaded). ``log(name, record)`` receives each member's log
    records. Writes ``out/sweep.json`` once every member is saved.
    """
    out = Path(out).expanduser()
    members = plan(base, latents, ks)
    main = int(os.environ.get("RANK", "0")) == 0          # under torchrun only rank 0 writes
    with exclusive(out, "sweep") if main else nullcontext():
        if (out / INDEX).exists():   # a finished sweep is never trained or rewritten again
            raise FileExistsError(f"{out} already holds a finished sweep ({INDEX})"
                                  f"{': there is nothing to resume' if resume else ''}; choose a new --out")
        made = not out.exists()
        if main:
            out.mkdir(parents=True, exist_ok=True)
            _check_plan(out, _plan_record(base, members), resume)
        log_one = (lambda i, rec: log(members[i][0].name, rec)) if log else None
        try:
            saes = train_many(source, [c for _, c in members], [out / m.path for m, _ in members], resume=resume,
                              log=log_one, progress=progress, provenance=provenance)
        except BaseException:
            if main and not any((out / m.path).exists() for m, _ in members):   # refused before training:
                (out / PLAN).unlink(missing_ok=True)                             # leave nothing behind
                if made and not any(out.iterdir()):
                    out.rmdir()
            raise
        done = [m._replace(d_sae=sae.d_sae) for (m, _), sae in zip(members, saes)]
        if main:
            shared = {k: v for k, v in asdict(base).items() if k not in ("d_sae", "k")}
            acts = str(Path(source.path).resolve()) if hasattr(source, "path") else None   # None: streamed
            write_json(out / INDEX, {"format": FORMAT, "version": VERSION, "acts": acts, "train_config": shared,
                                     "members": [m._asdict() for m in sorted(done, key=_size)]})
    return [saes[i] for i in sorted(range(len(saes)), key=lambda i: _size(done[i]))]


PLAN = "sweep-plan.json"


def _plan_record(base: TrainConfig, members) -> dict:
    """What a resume must repeat: the members and every setting but those a resume may change."""
    config = {k: v for k, v in asdict(base).items() if k not in ("d_sae", "k", *RUN_ONLY_FIELDS)}
    return {"train_config": config, "members": [m._asdict() for m, _ in members]}


def _check_plan(out: Path, planned: dict, resume: bool) -> None:
    """A new sweep records its plan in ``out/sweep-plan.json``; a resume must ask for the same plan, else
    the members it left would be orphaned beside new ones (refused, naming both plans)."""
    path = out / PLAN
    if resume and path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable ({e}); the sweep's plan is lost, start it again with a new --out")
        if before != planned:
            raise ValueError(f"{out}: this sweep was started as {_describe(before)}; the resume asks for "
                             f"{_describe(planned)}. Resume with the same --latents, --k and settings, or "
                             "choose a new --out")
    if resume:
        names = {m["name"] for m in planned["members"]}
        orphans = sorted(d.name for d in out.iterdir() if d.is_dir() and d.name not in names
                         and d.name.startswith(("latents-", "k-", "expansion-")))
        if orphans:
            raise ValueError(f"{out} holds members this resume does not plan ({', '.join(orphans)}): resume with "
                             "the --latents and --k it was started with, or choose a new --out")
    write_json(path, planned)


def _describe(record: dict) -> str:
    members = record.get("members") if isinstance(record, dict) else None
    names = ", ".join(str(m.get("name")) for m in members or [] if isinstance(m, dict))
    return f"members {names or 'unknown'}"


def _size(m: Member) -> tuple[int, int]:
    return (m.d_sae or 0, m.k or 0)


def load_sweep(folder: str | Path) -> tuple[dict, list[Member]]:
    """Read ``folder/sweep.json``: (the whole index, its members smallest first), checked."""
    folder = Path(folder).expanduser()
    path = folder / INDEX
    if not path.is_file():
        hint = (" (a sweep still running or stopped: finish it with 'saelab sweep ... --resume')"
                if folder.is_dir() else "")
        raise FileNotFoundError(f"{path} not found: {folder} is not a finished sweep folder from 'saelab sweep'{hint}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it is damaged") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{path} is not a saelab sweep index (format {FORMAT!r} version {VERSION} expected)")
    members = index.get("members")
    if not isinstance(members, list) or not members:
        raise ValueError(f"{path}: 'members' must be a non-empty list of the sweep's SAEs; the file is damaged")
    return index, sorted((_member(m, i, path) for i, m in enumerate(members)), key=_size)


_MEMBER_TYPES = {"name": (str,), "d_sae": (int, type(None)), "k": (int, type(None)), "arch": (str,), "path": (str,)}


def _member(entry, i: int, path: Path) -> Member:
    """members[i] of sweep.json, checked: an object with exactly Member's keys, each of its type."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: members[{i}] must be an object, found {type(entry).__name__}")
    if set(entry) != set(Member._fields):
        missing, extra = sorted(set(Member._fields) - set(entry)), sorted(set(entry) - set(Member._fields))
        raise ValueError(f"{path}: members[{i}] " + "; ".join(
            p for p in (f"lacks {', '.join(missing)}" if missing else "",
                        f"has unknown key(s) {', '.join(extra)}" if extra else "") if p)
            + f" (a member has exactly {', '.join(Member._fields)})")
    for key, kinds in _MEMBER_TYPES.items():
        if not isinstance(entry[key], kinds) or isinstance(entry[key], bool):
            raise ValueError(f"{path}: members[{i}].{key} has the wrong type ({entry[key]!r})")
    return Member(**entry)
