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

The ``reference`` corpus (same build, its own files) is topical, technical prose from three more packages:

=================  ===============================================  =================================
python3-doc        the Python 3.11 documentation, reST sources      PSF licence version 2
                   (``html/_sources/**/*.rst.txt``), one per page
manpages,          Linux man-pages (sections 2, 3, 4, 5, 7 and       mostly Linux-man-pages-copyleft
manpages-dev       the C library), roff stripped to text,           (verbatim copies allowed), some
                   one per page                                     GPL-2+ and BSD; per page
dict-gcide         the GNU Collaborative International Dictionary   GPL-3+ (GCIDE, from Webster's
                   of English: headword entries, 12 to a document,  1913, public domain, plus
                   one document in ``GCIDE_ONE_IN`` kept            WordNet glosses)
=================  ===============================================  =================================

No sentence in either is written by saelab. Documents: WordNet senses are grouped 40 at a time in file
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
    "python3-doc": "PSF licence version 2 (the Python documentation)",
    "manpages": "Linux man-pages: mostly Linux-man-pages-copyleft (verbatim copies allowed), some GPL-2+ and BSD",
    "dict-gcide": "GPL-3+ (GCIDE: Webster's 1913, public domain, with additions under the GPL)",
}
REFERENCE = "reference"
PYDOC = Path("/usr/share/doc/python3.11/html/_sources")
MANPAGES = Path("/usr/share/man")
MAN_SECTIONS = ("man2", "man3", "man4", "man5", "man7")
GCIDE_PER_DOC, GCIDE_ONE_IN = 12, 2
PACKAGES = {NAME: ("wordnet-base", "fortunes", "dict-jargon", "dict-devil"),
            REFERENCE: ("python3-doc", "manpages", "manpages-dev", "dict-gcide")}
"""The Debian packages each corpus is built from (what ``scripts/install_english.sh`` installs)."""
SENSES_PER_DOC, FORTUNES_PER_DOC, WORDNET_ONE_IN = 40, 10, 3
_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _input_files() -> list[Path]:
    files = [WORDNET / f"data.{p}" for p in ("noun", "verb", "adj", "adv")]
    files += sorted(p for p in FORTUNES.glob("*") if p.is_file() and "." not in p.name and p.name != "ascii-art")
    files += [DICTD / f"{d}.{ext}" for d in ("jargon", "devil") for ext in ("index", "dict.dz")]
    return files


def _reference_files() -> list[Path]:
    files = sorted(PYDOC.rglob("*.rst.txt")) if PYDOC.is_dir() else []
    for section in MAN_SECTIONS:
        folder = MANPAGES / section
        files += sorted(p for p in folder.glob("*.gz") if p.is_file() and not p.is_symlink()) if folder.is_dir() else []
    return files + [DICTD / f"gcide.{ext}" for ext in ("index", "dict.dz")]


def _missing(name: str = NAME) -> list[str]:
    need = {"wordnet-base": WORDNET / "data.noun", "fortunes": FORTUNES / "fortunes",
            "dict-jargon": DICTD / "jargon.dict.dz", "dict-devil": DICTD / "devil.dict.dz",
            "python3-doc": PYDOC / "library" / "os.rst.txt", "manpages": MANPAGES / "man2" / "open.2.gz",
            "manpages-dev": MANPAGES / "man3" / "printf.3.gz", "dict-gcide": DICTD / "gcide.dict.dz"}
    return [pkg for pkg in PACKAGES[name] if not need[pkg].is_file()]


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
    seen: set[int] = set()
    for line in (DICTD / f"{name}.index").read_text(encoding="utf-8", errors="replace").splitlines():
        head, start, length = line.split("\t")[:3]
        if head.startswith("00-database") or head.startswith("00database") or _b64(start) in seen:
            continue                                          # GCIDE indexes one entry under several headwords
        seen.add(_b64(start))
        text = data[_b64(start):_b64(start) + _b64(length)].decode("utf-8", errors="replace").strip()
        if text:
            yield {"text": text, "source": f"dict-{name} {head}"}


def _gcide() -> Iterator[dict]:
    """GCIDE entries ``GCIDE_PER_DOC`` to a document, one document in ``GCIDE_ONE_IN`` (the whole dictionary
    would outweigh the rest of the corpus several times over)."""
    entries = list(_dictd("gcide"))
    for n, i in enumerate(range(0, len(entries), GCIDE_PER_DOC)):
        if n % GCIDE_ONE_IN == 0:
            group = entries[i:i + GCIDE_PER_DOC]
            yield {"text": "\n\n".join(e["text"] for e in group), "source": f"dict-gcide {group[0]['source'][11:]}"}


def _pydoc() -> Iterator[dict]:
    for path in sorted(PYDOC.rglob("*.rst.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            yield {"text": text, "source": f"python3-doc {path.relative_to(PYDOC).as_posix()}"}


_ROFF_ESCAPES = [(re.compile(r"\\f(\(..|\[[^]]*\]|.)"), ""), (re.compile(r"\\\((em|en)"), "-"),
                 (re.compile(r"\\\((aq|cq)"), "'"), (re.compile(r"\\\((dq|lq|rq)"), '"'),
                 (re.compile(r"\\\((bu|ci)"), "*"), (re.compile(r"\\\(.."), ""), (re.compile(r"\\\*(\(..|\[[^]]*\]|.)"), ""),
                 (re.compile(r"\\[-]"), "-"), (re.compile(r"\\[&|^%:]"), ""), (re.compile(r"\\e"), "\\\\"),
                 (re.compile(r"\\ "), " "), (re.compile(r"\\[sh]'[^']*'|\\s[-+]?\d"), "")]
_ROFF_JOINED = {"BR", "RB", "IR", "RI", "BI", "IB"}       # alternating fonts: the words touch
_ROFF_SPACED = {"B", "I", "SM", "SB", "SH", "SS", "TP", "IP", "UR", "MT"}
_ROFF_BREAKS = {"SH", "SS", "PP", "P", "LP", "TP", "IP", "sp"}


def roff_to_text(source: str) -> str:
    """Readable text of a man page's roff source: comments and layout requests dropped, the words of font
    macros (``.B``, ``.BR``...) and headings kept, font and character escapes resolved, filled lines joined
    into paragraphs (``.nf``/``.EX`` blocks kept line by line)."""
    paragraphs: list[list[str]] = [[]]
    fill = True
    for line in source.replace("\\\n", "").splitlines():
        if line.startswith((".\\\"", "'\\\"")):
            continue                                      # a comment
        if line.startswith((".", "'")):
            name, _, rest = line[1:].strip().partition(" ")
            if name in ("nf", "EX", "fi", "EE"):
                fill = name in ("fi", "EE")
            if name in _ROFF_BREAKS or name in ("nf", "EX", "fi", "EE", "br"):
                paragraphs.append([])
            if not rest.strip() or name not in _ROFF_JOINED | _ROFF_SPACED:
                continue
            words = [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', rest)]
            line = ("" if name in _ROFF_JOINED else " ").join(words)
            if name in ("SH", "SS"):
                paragraphs[-1].append(line.title() + "\n")   # a heading: a line of its own
                continue
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        if not line.strip():
            paragraphs.append([])
        elif fill:
            paragraphs[-1].append(line.strip())
        else:
            paragraphs[-1].append(line + "\n")
    text = "\n\n".join("".join(w if w.endswith("\n") else w + " " for w in para).strip()
                       for para in paragraphs if para)
    return re.sub(r" *\n *", "\n", text).strip()


def _manpages() -> Iterator[dict]:
    for section in MAN_SECTIONS:
        folder = MANPAGES / section
        for path in sorted(folder.glob("*.gz")) if folder.is_dir() else []:
            if path.is_symlink():
                continue
            source = gzip.open(path).read().decode("utf-8", errors="replace")
            if source.lstrip().startswith(".so "):
                continue                                          # a pointer to another page
            text = roff_to_text(source)
            if text:
                yield {"text": text, "source": f"manpages {section}/{path.name[:-3]}"}


BUILD_VERSION = 2
"""Bumped when the way documents are made changes (so built corpora are rebuilt)."""


def _fingerprint(name: str, files: list[Path]) -> str:
    h = hashlib.sha256(f"{name} v{BUILD_VERSION}\n".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _documents(name: str) -> Iterator[dict]:
    if name == NAME:
        return iter((*_wordnet(), *_fortunes(), *_dictd("jargon"), *_dictd("devil")))
    return iter((*_pydoc(), *_manpages(), *_gcide()))


def corpus_path(name: str = NAME) -> Path:
    """The built ``<name>.jsonl`` (``english`` or ``reference``; built now if missing or stale); a clear error
    if its packages are absent."""
    missing = _missing(name)
    if missing:
        raise FileNotFoundError(
            f"corpus {name!r} is built from Debian packages that are not installed: {', '.join(missing)}. "
            f"Run: bash scripts/install_english.sh (or apt-get install {' '.join(PACKAGES[name])})")
    folder = cache_root() / "corpora"
    out, record_path = folder / f"{name}.jsonl", folder / f"{name}.json"
    files = _input_files() if name == NAME else _reference_files()
    fingerprint = _fingerprint(name, files)
    if out.is_file() and record_path.is_file():
        try:
            if json.loads(record_path.read_text()).get("fingerprint") == fingerprint:
                return out
        except (OSError, json.JSONDecodeError):
            pass                                          # rebuild below
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, list[int]] = {}
    lines = []
    for doc in _documents(name):
        pkg = doc["source"].split()[0]
        docs_chars = counts.setdefault(pkg, [0, 0])
        docs_chars[0] += 1
        docs_chars[1] += len(doc["text"])
        lines.append(json.dumps(doc, ensure_ascii=False))
    atomic.write_bytes(out, ("\n".join(lines) + "\n").encode("utf-8"))
    record = {"name": name, "fingerprint": fingerprint, "n_files": len(files),
              "sources": {pkg: {"licence": SOURCES[pkg], "copyright": f"/usr/share/doc/{pkg}/copyright",
                                "documents": c[0], "characters": c[1]} for pkg, c in counts.items()},
              "hand_written_characters": 0}
    if name == NAME:
        record["files"] = [str(p) for p in files]
    atomic.write_json(record_path, record)
    return out
