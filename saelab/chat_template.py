"""Chat templates rendered within bounds of time and size.

A tokenizer's chat template is Jinja code that comes with the model. transformers renders it in Jinja's
immutable sandbox (no file access, no private attributes), but the sandbox bounds neither time nor size:
two nested ``range(100000)`` loops run for hours while holding the model (a served request kept every
later one out and the server deaf to SIGTERM), and ``"x" * 10**12`` asks for a terabyte in one C call.
Here the same sandboxed environment renders the template with these bounds:

- steps: Python lines run while rendering, counted by a trace function on this thread only
  (``sys.settrace``; the caller's tracer, a debugger's or coverage's, is put back afterwards);
- time: a wall-clock deadline checked at every step;
- size: the rendered text is counted as it streams out, and the operands of ``*``, ``**``, ``+`` and ``%``
  are checked before one C call could build a huge string, list or number from them.

Any failure inside the template (its own ``raise_exception``, a blocked sandbox escape, a bound hit) is
one :class:`ChatTemplateError` naming the model, never a traceback. Both the prompt encoder
(:func:`saelab.generation.prompt_ids`) and the chat corpus render through :func:`render_chat`.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import jinja2

from saelab.errors import ChatTemplateError


@dataclass(frozen=True)
class TemplateLimits:
    """How much one rendering of a chat template may do."""

    steps: int = 2_000_000
    """Python lines run while rendering (SmolLM2's template needs a few hundred)."""
    seconds: float = 10.0
    """Wall-clock time for one rendering."""
    chars: int = 1_000_000
    """Characters of rendered text, and the largest string or list one operator may build."""


class _OverBudget(BaseException):
    """Raised inside the template's frames by the tracer or an operator check; carries the reason. A
    BaseException, so that no ``except Exception`` in Jinja's runtime can swallow it and render on."""


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = True, name: str = "the model",
                limits: TemplateLimits = TemplateLimits()) -> str:
    """The tokenizer's chat template rendered over ``messages`` (``[{"role", "content"}]``), as
    ``tok.apply_chat_template(..., tokenize=False)`` gives it, within ``limits``; ``name`` names the model
    in errors."""
    source = tok.get_chat_template()
    try:
        template = _compile(source, limits)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template of {name} does not compile: {_one_line(e)}") from None
    context = {**tok.special_tokens_map, "messages": [dict(m) for m in messages], "tools": None, "documents": None,
               "add_generation_prompt": add_generation_prompt}
    return _bounded(lambda: _stream(template, context, limits), limits, name)


def chat_ids(tok, messages: list[dict], add_generation_prompt: bool = True, name: str = "the model",
             limits: TemplateLimits = TemplateLimits()) -> list[int]:
    """Token ids of :func:`render_chat`'s text (no special tokens added: the template writes its own)."""
    text = render_chat(tok, messages, add_generation_prompt, name, limits)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _stream(template, context: dict, limits: TemplateLimits) -> str:
    parts, size = [], 0
    for piece in template.generate(**context):
        size += len(piece)
        if size > limits.chars:
            raise _OverBudget(f"wrote more than {limits.chars:,} characters")
        parts.append(piece)
    return "".join(parts)


def _bounded(render, limits: TemplateLimits, name: str) -> str:
    """``render()`` under a tracer that stops it after ``limits.steps`` lines or ``limits.seconds``."""
    deadline = time.monotonic() + limits.seconds
    steps = 0

    def tracer(frame, event, arg):
        nonlocal steps
        steps += 1
        if steps > limits.steps:
            raise _OverBudget(f"ran more than {limits.steps:,} steps")
        if time.monotonic() > deadline:
            raise _OverBudget(f"ran longer than {limits.seconds:g} s")
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        return render()
    except _OverBudget as e:
        raise ChatTemplateError(f"the chat template of {name} {e} and was stopped: the template loops too long or "
                                "builds too much text; fix or replace the tokenizer's chat_template") from None
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template of {name} tried something the sandbox forbids ({_one_line(e)}); "
                                "it was not run further: do not use this template") from None
    except Exception as e:  # the template is the model's code: any failure in it is the template's, not ours
        raise ChatTemplateError(f"the chat template of {name} failed: {type(e).__name__}: {_one_line(e)}") from None
    finally:
        sys.settrace(previous)


@lru_cache(maxsize=8)
def _compile(source: str, limits: TemplateLimits):
    """The template in transformers' chat-template environment (its sandbox, filters and globals), with
    the size-growing operators intercepted."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    env = _compile_jinja_template("").environment.overlay()
    env.intercepted_binops = frozenset({"*", "**", "+", "%"})
    base = env.call_binop

    def call_binop(context, operator, left, right):
        _check_operands(operator, left, right, limits.chars)
        return base(context, operator, left, right)

    env.call_binop = call_binop
    return env.from_string(source)


_WIDTH = re.compile(r"%[-#0 +]*(\d+)|%[-#0 +]*\d*\.(\d+)")


def _check_operands(operator: str, left, right, most: int) -> None:
    """Refuse before computing an operation whose result would exceed ``most`` items or digits."""
    sized = (str, bytes, list, tuple)
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, sized) and isinstance(n, int) and len(seq) * max(n, 0) > most:
                raise _OverBudget(f"built a sequence of more than {most:,} items")
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        if len(left) + len(right) > most:
            raise _OverBudget(f"built a sequence of more than {most:,} items")
    elif operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
        if abs(right) > 1024 and abs(left) > 1:
            raise _OverBudget(f"raised a number to the power {right}")
    elif operator == "%" and isinstance(left, str):
        if any(int(w or p or 0) > most for w, p in _WIDTH.findall(left)):
            raise _OverBudget(f"formatted a field wider than {most:,} characters")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]
