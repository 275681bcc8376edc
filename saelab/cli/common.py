"""What every stage module of the ``saelab`` command shares."""

from __future__ import annotations

import argparse
import json


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


MAX_SEED = 2**63 - 1   # torch and numpy seed generators take a signed or unsigned 64-bit integer


def seed(text: str) -> int:
    """argparse type of every --seed: an integer from 0 to 2^63 - 1 (2^70 overflowed inside torch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is out of range: seeds are integers from 0 to 2^63 - 1")
    return value


def positive(text: str) -> int:
    """argparse type of counts that must be at least 1 (--samples 0 used to divide by zero deep inside)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer (1 or more)")
    return value


CONTINUATION = "\n\t"   # kept as they are when a whole continuation is printed


def terminal_text(text: str, keep: str = "") -> str:
    """Model or corpus text made safe for a terminal: control characters (ESC, BEL, ...) written as escapes,
    so nothing is interpreted; ``keep`` lists those printed as they are (a continuation keeps its newlines)."""
    return "".join(c if c.isprintable() or c == " " or c in keep else repr(c)[1:-1] for c in text)
