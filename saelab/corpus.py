"""Text sources → documents → packed token sequences.

A corpus is named by a *spec* string:

- ``stdlib``: the source of the running interpreter's standard library: every ``.py`` file under
  ``sysconfig.get_paths()["stdlib"]`` except ``site-packages``, **tests included** (they are a third
  of the code and make the corpus ~2.5× larger, which a small model trained for a few epochs needs).
  Files that are not valid UTF-8 are skipped. Files are read in sorted relative-path order and split
  into train / validation by a stable hash of the relative path (sha256, 1 in 20 → validation).
- a path to a directory (every ``.txt``/``.py``/``.md`` file under it, sorted), a single text file,
  or a ``.jsonl`` file whose lines carry a ``text`` field. Local files are split the same way.
- ``english``: broad English prose built offline from Debian text packages (WordNet glosses,
  fortunes, the Jargon File, The Devil's Dictionary; see :mod:`saelab.english`), read as a ``.jsonl``.
- ``reference``: topical, technical prose from more Debian packages (the Python documentation, Linux man
  pages, the GCIDE dictionary; see :mod:`saelab.english`), read as a ``.jsonl``.
- ``chat:MODEL``: the model's own answers, in its chat template, to a broad hand-written list of requests
  (:mod:`saelab.chatcorpus`; built once by ``saelab corpus chat MODEL``), read as a ``.jsonl``.
- ``A+B[+C...]``: a mix of local corpora in equal shares by characters: every part gives documents (in an
  order shuffled with seed 0) up to the size of the smallest part, and the mix is built once into the
  cache as a ``.jsonl``. Its documents keep their names in their parts, so a document is in the mix's
  validation split exactly when it is in its part's (the same on every machine). A part written ``A*N``
  (N a whole number) gets N shares: ``english*2+stdlib*3+chat:smollm2`` is 2:3:1 by characters, each share
  the size of the smallest part per share.
- ``hf:NAME[:CONFIG]``: a Hugging Face dataset (needs the ``hf`` extra and the network). Its own
  ``train``/``validation`` splits are used.

Documents are tokenized and packed into sequences of ``context`` tokens: each document is preceded by
BOS, documents are concatenated in an order shuffled by ``seed``, the stream is cut into consecutive
pieces of ``context - 1`` tokens, and **every window starts with exactly one BOS** followed by one piece:
where a piece would begin with a document's own BOS, that BOS *is* the window's (it is not repeated; until
December 2026 such windows began with two BOS tokens, see :data:`WINDOW_START`). Real
models park attention on their first position (an "attention sink" whose residual norm is ~100× the
rest: 25,000 vs ~180 at SmolLM2's layer 15), whatever token is there; starting each window with BOS
puts that sink on a token that every stage excludes (:data:`WINDOW_START`), rather than on a word
that happened to be cut first. The same spec, split, tokenizer and seed always give the same sequences.
:func:`saelab.token_cache.sequences` is the entry point: local corpora are tokenised once, whole, into
the token cache and packed from there; ``hf:`` datasets are tokenised as they stream (:func:`pack` of
:func:`token_stream`, which this module provides).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch

from saelab import atomic, english
from saelab.runtime import cache_root

TEXT_SUFFIXES = (".txt", ".py", ".md")
WINDOW_START = "one_bos"
"""How windows start (recorded in stores as ``bos.window_start``): one BOS token, then ``context - 1`` tokens
(a document's own BOS at the cut is the window's BOS, not a second one). Stores recording ``"bos"`` were
packed before this rule: a window that began at a document start held two BOS tokens there."""
SPLITS = ("train", "validation", "all")
VALIDATION_ONE_IN = 20


class Document(NamedTuple):
    name: str
    """Where the text came from (relative path, or ``file:line``)."""
    text: str


@dataclass(frozen=True)
class CorpusSpec:
    """What text to read, and which part of it."""

    source: str = "stdlib"
    """``stdlib``, ``english``, ``chat:MODEL``, a path (directory, text file, ``.jsonl``), a mix ``A+B``, or
    ``hf:NAME[:CONFIG]``."""
    split: str = "train"
    """``train``, ``validation`` or ``all``."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of {', '.join(SPLITS)}")

    def to_json(self) -> dict:
        return {"source": self.source, "split": self.split}


def is_validation(relative_name: str) -> bool:
    """Stable train/validation assignment: sha256 of the relative path, 1 in 20 goes to validation."""
    digest = hashlib.sha256(relative_name.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % VALIDATION_ONE_IN == 0


def in_split(name: str, split: str) -> bool:
    return split == "all" or (split == "validation") == is_validation(name)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_text_files(root: Path, paths: Iterable[Path], split: str) -> Iterator[Document]:
    for path in paths:
        name = path.relative_to(root).as_posix() if path != root else path.name
        if not in_split(name, split):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue  # a few stdlib test fixtures are deliberately not UTF-8
        if text:
            yield Document(name, text)


def _stdlib_files(root: Path) -> list[Path]:
    """Every ``.py`` under ``root`` outside site-packages, in relative-path order (os.walk: ~5× rglob's speed)."""
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d != "site-packages"]
        rel = Path(folder).relative_to(root).as_posix()
        found += [(f if rel == "." else f"{rel}/{f}") for f in files if f.endswith(".py")]
    return [root / name for name in sorted(found)]


def source_files(spec: CorpusSpec | str) -> tuple[Path, list[Path]] | None:
    """The root and the files a local corpus reads (before the split); None for ``hf:`` sources."""
    spec = CorpusSpec(spec) if isinstance(spec, str) else spec
    if spec.source == "stdlib":
        root = stdlib_root()
        return root, _stdlib_files(root)
    if spec.source.startswith("hf:"):
        return None
    if spec.source in (english.NAME, english.REFERENCE):
        path = english.corpus_path(spec.source)
        return path, [path]
    if spec.source.startswith(CHAT):
        path = chat_path(spec.source[len(CHAT):])
        if not path.is_file():
            _unpack_shipped_chat(spec.source[len(CHAT):], path)
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus {spec.source!r} is not built yet: run 'saelab corpus chat {spec.source[len(CHAT):]}' (the model "
                "answers 801 requests: about 30 minutes for SmolLM2-135M on 2 CPU cores; it resumes if interrupted)")
        return path, [path]
    if is_mix(spec.source):
        path = mix_path(spec.source)
        return path, [path]
    path = Path(spec.source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {spec.source!r}: no such file or directory "
            "(use 'stdlib', a folder of .txt/.py/.md files, a .jsonl file, or hf:NAME)"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"corpus {path}: no {'/'.join(TEXT_SUFFIXES)} files in this folder")
        return path, files
    return path, [path]


CHAT = "chat:"
MIX = "+"
MIX_VERSION = 2


def chat_path(model: str) -> Path:
    """Where ``chat:MODEL`` is built (by :func:`saelab.chatcorpus.build`), with its record ``.json`` beside it."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(model).name)[:40]
    return cache_root() / "corpora" / f"chat-{safe}-{hashlib.sha256(model.encode()).hexdigest()[:8]}.jsonl"


SHIPPED_CHAT = Path(__file__).parent / "shipped"
"""``shipped/<model>/chat_corpus.jsonl.gz`` (+ ``chat_corpus.json``): a built ``chat:<model>`` that ships with saelab."""


def _unpack_shipped_chat(model: str, path: Path) -> None:
    """Copy a shipped ``chat:<model>`` corpus (gzipped) into the cache, where a build would have put it."""
    import gzip

    shipped = SHIPPED_CHAT / model / "chat_corpus.jsonl.gz"
    if model != Path(model).name or not shipped.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path.with_suffix(".json"), (shipped.parent / "chat_corpus.json").read_bytes())
    atomic.write_bytes(path, gzip.decompress(shipped.read_bytes()))


def is_mix(source: str) -> bool:
    return MIX in source and not Path(source).expanduser().exists()   # a file may have a '+' in its name


def mix_path(source: str) -> Path:
    """The built mix of ``A+B[+...]`` (see the module docstring), built now if missing or stale."""
    parts, shares = _mix_parts(source)
    files = [source_files(CorpusSpec(p, "all")) for p in parts]
    h = hashlib.sha256(f"mix v{MIX_VERSION}\n{source}\n".encode())
    for _, paths in files:
        for f in paths:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    out = cache_root() / "corpora" / f"mix-{h.hexdigest()[:16]}.jsonl"
    if out.is_file():
        return out
    docs = [list(documents(CorpusSpec(p, "all"))) for p in parts]
    share = min(sum(len(d.text) for d in part) / n for part, n in zip(docs, shares))
    lines = []
    for name, part, n in zip(parts, docs, shares):
        random.Random(0).shuffle(part)
        used = 0
        for d in part:
            if used >= share * n:
                break
            used += len(d.text)
            lines.append(json.dumps({"text": d.text, "name": d.name, "source": name}, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out, ("\n".join(lines) + "\n").encode("utf-8"))
    return out


def _mix_parts(source: str) -> tuple[list[str], list[int]]:
    """The parts of a mix and their shares (``A*3`` → ``A``, 3)."""
    parts, shares = [], []
    for item in source.split(MIX):
        name, star, n = item.rpartition("*") if "*" in item else (item, "", "1")
        if not name or not n.isdigit() or int(n) < 1 or name.startswith("hf:"):
            raise ValueError(f"corpus {source!r}: a mix joins two or more local corpora with '+', each optionally "
                             "with a whole number of shares, e.g. english*2+chat:smollm2 (hf: datasets cannot be mixed)")
        parts.append(name)
        shares.append(int(n))
    if len(parts) < 2:
        raise ValueError(f"corpus {source!r}: a mix joins two or more local corpora with '+', e.g. english+chat:smollm2")
    return parts, shares


def _jsonl_documents(path: Path, split: str, named: bool = False) -> Iterator[Document]:
    """``named``: each line's ``name`` field names the document (a mix keeps its parts' names, so their splits)."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            name = f"{path.name}:{lineno}"
            if not named and not in_split(name, split):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{lineno}: each line needs a string field 'text'")
            if named:
                name = str(record.get("name") or name)
                if not in_split(name, split):
                    continue
            yield Document(name, record["text"])


def _hf_documents(source: str, split: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"corpus {source!r} needs the Hugging Face datasets library: pip install 'saelab[hf]'"
        ) from None
    _, name, *config = source.split(":")
    hf_split = {"all": "train", "train": "train", "validation": "validation"}[split]
    dataset = datasets.load_dataset(name, config[0] if config else None, split=hf_split, streaming=True)
    for i, record in enumerate(dataset):
        yield Document(f"{name}[{i}]", record["text"])


def documents(spec: CorpusSpec | str) -> Iterator[Document]:
    """Yield the corpus' documents in their fixed order."""
    spec = CorpusSpec(spec) if isinstance(spec, str) else spec
    files = source_files(spec)
    if files is None:
        return _hf_documents(spec.source, spec.split)
    root, paths = files
    if root.is_file() and root.suffix == ".jsonl":
        return _jsonl_documents(root, spec.split, named=is_mix(spec.source))
    return _read_text_files(root, paths, spec.split)


def token_stream(docs: Iterable[Document], tokenizer, bos_id: int, seed: int | None = 0) -> Iterator[int]:
    """BOS + tokens of each document, documents in an order shuffled by ``seed`` (None: as given)."""
    docs = list(docs) if seed is not None else docs
    if seed is not None:
        random.Random(seed).shuffle(docs)
    for doc in docs:
        yield bos_id
        yield from tokenizer.encode(doc.text, add_special_tokens=False, verbose=False)  # no "too long" warning: we pack


def pack(stream: Iterable[int], context: int, bos_id: int) -> Iterator[torch.Tensor]:
    """``[context]`` int64 windows: BOS, then the next ``context - 1`` tokens of the stream; a short tail is dropped.

    BOS tokens of the stream that fall right after a window's BOS are dropped (a document starting at the
    cut): every window starts with exactly one BOS.
    """
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    buf: list[int] = [bos_id]
    for tok in stream:
        if tok == bos_id and len(buf) == 1:
            continue                                   # the window's BOS already stands for the document's
        buf.append(tok)
        if len(buf) == context:
            yield torch.tensor(buf, dtype=torch.long)
            buf = [bos_id]


def bos_token_id(tokenizer) -> int:
    """The token that separates documents: BOS, else EOS, else CLS (encoder models)."""
    for attr in ("bos_token_id", "eos_token_id", "cls_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has no BOS, EOS or CLS token to separate documents with")


_identities: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_identity(tokenizer) -> dict:
    """Name, vocabulary size and a hash of the full tokenizer definition (what makes token ids comparable).

    Remembered per tokenizer object (serialising a large vocabulary takes a while, and a harvest asks
    twice: for the token cache and for the manifest); recomputed if tokens were added since.
    """
    try:
        size, known = _identities[tokenizer]
        if size == len(tokenizer):
            return dict(known)
    except (KeyError, TypeError):   # TypeError: an object that cannot be weakly referenced
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    identity = {"name_or_path": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer),
                "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    try:
        _identities[tokenizer] = (len(tokenizer), identity)
    except TypeError:
        pass
    return dict(identity)
