"""The ``english`` corpus: broad English prose built offline from Debian text packages.

A real chat model needs English to show its features; saelab ships none, and no data set may be
downloaded at run time. Four Debian packages (``scripts/install_english.sh`` installs them; README
command 1 runs it) hold about 12 MB of English written by people, under licences that allow this use:

=================  ===============================================  =================================
package            what                                             licence (its /usr/share/doc/*/copyright)
=================  ===============================================  =================================
wordnet-base       WordNet 3.0 glosses: a definition and usage      WordNet 3.0 licence (Princeton;
                   examples for each of ~117k word senses           permissive, notice kept)
fortunes           the fortune-mod cookie files: quotations,        BSD-4-clause (fortune-mod); the
                   jokes, short prose (offensive set not included)  quotations' own authors
dict-jargon        The Jargon File 4.4.7 (hacker culture lexicon)   public domain
dict-devil         Ambrose Bierce, The Devil's Dictionary (1911)    public domain (copyright expired)
=================  ===============================================  =================================

No sentence in it is written by saelab. Documents: WordNet senses are grouped 40 at a time in file
order (which keeps a lexicographer file's topic together, e.g. ``noun.animal``) and one such document
in three is kept (all of WordNet would be three quarters of the corpus, a dictionary more than prose;
one third makes it about half), fortunes 10 at a time per file, one entry per Jargon/Devil headword. The built corpus is ``<cache>/corpora/english.jsonl``
(one ``{"text", "source"}`` object a line) plus ``english.json`` (sources, licences, counts), made on
first use and rebuilt when the installed files change; it then reads like any ``.jsonl`` corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Iterator

from saelab import atomic
from saelab.runtime import cache_root

NAME = "english"
WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
DICTD = Path("/usr/share/dictd")
SOURCES = {
    "wordnet-base": "WordNet 3.0 licence (Princeton University; permissive, notice kept)",
    "fortunes": "BSD-4-clause (fortune-mod); quotations by their authors",
    "dict-jargon": "public domain (The Jargon File 4.4.7)",
    "dict-devil": "public domain (Ambrose Bierce, The Devil's Dictionary, 1911)",
}
SENSES_PER_DOC, FORTUNES_PER_DOC, WORDNET_ONE_IN = 40, 10, 3
_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _input_files() -> list[Path]:
    files = [WORDNET / f"data.{p}" for p in ("noun", "verb", "adj", "adv")]
    files += sorted(p for p in FORTUNES.glob("*") if p.is_file() and "." not in p.name and p.name != "ascii-art")
    files += [DICTD / f"{d}.{ext}" for d in ("jargon", "devil") for ext in ("index", "dict.dz")]
    return files


def _missing() -> list[str]:
    need = {"wordnet-base": WORDNET / "data.noun", "fortunes": FORTUNES / "fortunes",
            "dict-jargon": DICTD / "jargon.dict.dz", "dict-devil": DICTD / "devil.dict.dz"}
    return [pkg for pkg, path in need.items() if not path.is_file()]


def _wordnet() -> Iterator[dict]:
    for i, doc in enumerate(_wordnet_all()):
        if i % WORDNET_ONE_IN == 0:
            yield doc


def _wordnet_all() -> Iterator[dict]:
    for pos in ("noun", "verb", "adj", "adv"):
        senses = []
        for line in (WORDNET / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue                                    # the licence header
            fields, gloss = line.split(" | ", 1)
            parts = fields.split()
            n_words = int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]          # adjective markers like (a)
            head = words[0] + (f" (also {', '.join(words[1:])})" if len(words) > 1 else "")
            senses.append(f"{head}, {_POS[parts[2]]}: {gloss.strip()}")
            if len(senses) == SENSES_PER_DOC:
                yield {"text": "\n".join(senses), "source": f"wordnet-base data.{pos}"}
                senses = []
        if senses:
            yield {"text": "\n".join(senses), "source": f"wordnet-base data.{pos}"}


def _fortunes() -> Iterator[dict]:
    for path in _input_files():
        if path.parent != FORTUNES:
            continue
        cookies = [c.strip("\n") for c in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        cookies = [c for c in cookies if c.strip()]
        for i in range(0, len(cookies), FORTUNES_PER_DOC):
            yield {"text": "\n\n".join(cookies[i:i + FORTUNES_PER_DOC]), "source": f"fortunes {path.name}"}


def _b64(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 64 + _B64.index(ch)
    return value


def _dictd(name: str) -> Iterator[dict]:
    """One entry per headword of a dictd database (``.index``: headword, offset, length in base 64)."""
    data = gzip.open(DICTD / f"{name}.dict.dz").read()        # dictzip is gzip-compatible
    for line in (DICTD / f"{name}.index").read_text(encoding="utf-8", errors="replace").splitlines():
        head, start, length = line.split("\t")[:3]
        if head.startswith("00-database") or head.startswith("00database"):
            continue
        text = data[_b64(start):_b64(start) + _b64(length)].decode("utf-8", errors="replace").strip()
        if text:
            yield {"text": text, "source": f"dict-{name} {head}"}


BUILD_VERSION = 2
"""Bumped when the way documents are made changes (so built corpora are rebuilt)."""


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256(f"english v{BUILD_VERSION}\n".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def corpus_path() -> Path:
    """The built ``english.jsonl`` (built now if missing or stale); a clear error if the packages are absent."""
    missing = _missing()
    if missing:
        raise FileNotFoundError(
            f"corpus 'english' is built from Debian packages that are not installed: {', '.join(missing)}. "
            "Run: bash scripts/install_english.sh (or apt-get install wordnet-base fortunes dict-jargon dict-devil)")
    folder = cache_root() / "corpora"
    out, record_path = folder / f"{NAME}.jsonl", folder / f"{NAME}.json"
    files = _input_files()
    fingerprint = _fingerprint(files)
    if out.is_file() and record_path.is_file():
        try:
            if json.loads(record_path.read_text()).get("fingerprint") == fingerprint:
                return out
        except (OSError, json.JSONDecodeError):
            pass                                          # rebuild below
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, list[int]] = {}
    lines = []
    for doc in (*_wordnet(), *_fortunes(), *_dictd("jargon"), *_dictd("devil")):
        pkg = doc["source"].split()[0]
        docs_chars = counts.setdefault(pkg, [0, 0])
        docs_chars[0] += 1
        docs_chars[1] += len(doc["text"])
        lines.append(json.dumps(doc, ensure_ascii=False))
    atomic.write_bytes(out, ("\n".join(lines) + "\n").encode("utf-8"))
    record = {"name": NAME, "fingerprint": fingerprint, "files": [str(p) for p in files],
              "sources": {pkg: {"licence": SOURCES[pkg], "copyright": f"/usr/share/doc/{pkg}/copyright",
                                "documents": c[0], "characters": c[1]} for pkg, c in counts.items()},
              "hand_written_characters": 0}
    atomic.write_json(record_path, record)
    return out
