"""Reading texts given by a user: one reader for files of texts and for JSON lines on a stream.

A file is one text per non-blank line, or, as ``.jsonl``/``.json``, one JSON string or object with a
``text`` (or ``prompt``) string per line. Errors name the file (or ``input``) and the line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator


def parse_texts(lines: Iterable[str], source: str = "input") -> Iterator[str]:
    """Texts from JSON lines: each a JSON string or an object with a ``text`` (or ``prompt``) string; blank
    lines skipped. ``source`` names where the lines come from in errors (``source:line``)."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{n}: not valid JSON ({e.msg} at column {e.colno}); expected one JSON string "
                             "or object per line") from None
        text = obj if isinstance(obj, str) else _field(obj)
        if not isinstance(text, str):
            raise ValueError(f"{source}:{n}: expected a JSON string or an object with a 'text' (or 'prompt') string")
        yield text


def read_texts(path: Path | str) -> list[str]:
    """The texts of a file: ``.jsonl``/``.json`` as :func:`parse_texts`, anything else one per non-blank line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file of texts")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    if file.suffix in (".jsonl", ".json"):
        return list(parse_texts(lines, str(path)))
    return [line for line in lines if line.strip()]


def _field(obj) -> str | None:
    """An object's ``text`` string (an empty one too), else its ``prompt`` string."""
    if not isinstance(obj, dict):
        return None
    return obj["text"] if isinstance(obj.get("text"), str) else obj.get("prompt")

