"""The LLM explainer and judge, and their client for OpenAI-compatible chat endpoints.

``LLMClient`` speaks ``POST {base_url}/chat/completions``: vLLM, Ollama, llama.cpp's server, LM Studio
and OpenAI all speak this protocol, so one client on the standard library's urllib serves every backend
without an SDK dependency. It retries what is worth retrying (HTTP 429 and 5xx, timeouts, dropped
connections) with exponential backoff (honouring ``Retry-After``), fails at once with a clear message
on what is not (401, 404, malformed replies), follows no redirect (urllib would send the API key on
to wherever ``Location`` points), and keeps a tally of requests, tokens (from the replies'
``usage``) and estimated cost.

``llm_explanation`` prompts as Bills et al. 2023 ("Language models can explain neurons in language
models") and Neuronpedia do: excerpts with the firing tokens marked ``<<like this>>`` and their
activations on a 0-10 scale. ``LLMJudge`` is the detection judge of EleutherAI's "Automatically
Interpreting Millions of Features" (2024): numbered excerpts, one yes/no answer per excerpt.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Sequence

from saelab.explain import Example, FeatureRecord, UnusableReply, quote_token

__all__ = ["LLMClient", "LLMError", "LLMReplyError", "LLMTally", "LLMJudge", "llm_explanation"]

API_KEY_ENVS = ("SAELAB_LLM_API_KEY", "OPENAI_API_KEY")


class LLMError(OSError):
    """Talking to the chat endpoint failed: unreachable, timed out after retries, refused, or a malformed reply."""


class LLMReplyError(LLMError, UnusableReply):
    """A well-formed reply whose text is not what the prompt asked for (no explanation, unanswered excerpts)."""


@dataclass
class LLMTally:
    """What a client has spent so far."""

    requests: int = 0
    """HTTP requests sent, retries included."""
    retries: int = 0
    """Requests that were retries of a failed one (429, 5xx, timeout, dropped connection)."""
    replies: int = 0
    """Successful replies."""
    prompt_tokens: int = 0
    """Sum of ``usage.prompt_tokens`` over the replies."""
    completion_tokens: int = 0
    """Sum of ``usage.completion_tokens`` over the replies."""
    replies_without_usage: int = 0
    """Replies that reported no ``usage`` (their tokens are missing from the sums)."""
    cost_usd: float = 0.0
    """Estimated cost from the client's prices per million tokens (0 when no price was given)."""

    def summary(self) -> str:
        text = (f"LLM: {self.replies} replies, {self.requests} requests ({self.retries} retries), "
                f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion tokens")
        if self.replies_without_usage:
            text += f" ({self.replies_without_usage} replies without usage)"
        return text + (f", est. ${self.cost_usd:.4f}" if self.cost_usd else "")


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: urllib would resend the Authorization header to wherever Location points
    (another host included), handing the API key and the prompt to it. Returning None makes the 3xx
    reply an HTTPError, which ``LLMClient._post`` reports as one clear error."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


class LLMClient:
    """Chat completions against ``base_url`` (e.g. ``http://localhost:8000/v1``).

    api_key: sent as a Bearer token; when None, the first of ``api_key_env`` or the environment variables
    SAELAB_LLM_API_KEY / OPENAI_API_KEY that is set, else none (local servers need none).
    timeout: seconds a single request may wait for the server (connect, and each read).
    max_retries: retries after the first attempt, with delay ``backoff * 2**attempt`` (capped at 30 s).
    price_prompt / price_completion: USD per million prompt / completion tokens, for the cost tally.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, api_key_env: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0, temperature: float = 0.0,
                 price_prompt: float = 0.0, price_completion: float = 0.0):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"LLM endpoint {base_url!r} must be an http(s) URL like http://localhost:8000/v1")
        if not model:
            raise ValueError("no LLM model name given (the endpoint's model id, e.g. --model Qwen/Qwen2.5-7B-Instruct)")
        if api_key_env and api_key is None and not os.environ.get(api_key_env):
            raise ValueError(f"environment variable {api_key_env} (named for the LLM API key) is not set")
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        envs = (api_key_env,) if api_key_env else API_KEY_ENVS
        from_env = next((os.environ[e] for e in envs if os.environ.get(e)), None)
        self.api_key = api_key if api_key is not None else from_env
        self.timeout, self.max_retries, self.backoff = float(timeout), int(max_retries), float(backoff)
        self.temperature = temperature
        self.price_prompt, self.price_completion = price_prompt, price_completion
        self.tally = LLMTally()

    def explain(self, record: FeatureRecord) -> str:
        """A one-sentence explanation of ``record``'s feature (:func:`llm_explanation`): the explainer
        interface of :func:`saelab.explain.explain_and_score`."""
        return llm_explanation(self, record)

    def chat(self, messages: list[dict], *, max_tokens: int = 256) -> str:
        """The assistant's text for ``messages`` ([{"role": ..., "content": ...}]); LLMError on failure."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": self.temperature}
        reply = self._post(json.dumps(body).encode())
        return self._content(reply)

    def _post(self, data: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last, wait = "", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(30.0, max(wait, self.backoff * 2 ** (attempt - 1))))
                self.tally.retries += 1
            self.tally.requests += 1
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                if 300 <= e.code < 400:
                    raise LLMError(_redirect_message(self.url, e.code, e.headers.get("Location"))) from e
                detail = _error_detail(e.read())
                if e.code != 429 and e.code < 500:
                    raise LLMError(f"{self.url} answered HTTP {e.code}: {detail}{_hint(e.code)}") from e
                last, wait = f"HTTP {e.code}: {detail}", _retry_after(e.headers.get("Retry-After"))
                continue
            except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                timed_out = isinstance(reason, TimeoutError)
                last = f"no reply within {self.timeout:g} s" if timed_out else f"connection failed: {reason}"
                wait = 0.0
                continue
            return self._parse(raw)
        raise LLMError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last error: {last}")

    def _parse(self, raw: bytes) -> dict:
        try:
            reply = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LLMError(f"malformed reply from {self.url}: not JSON ({e}); it began {raw[:200]!r}") from e
        if not isinstance(reply, dict):
            raise LLMError(f"malformed reply from {self.url}: expected a JSON object, got {type(reply).__name__}")
        if "error" in reply and "choices" not in reply:
            raise LLMError(f"{self.url} returned an error: {_error_detail(json.dumps(reply).encode())}")
        self.tally.replies += 1
        usage = reply.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            p, c = usage["prompt_tokens"], int(usage.get("completion_tokens") or 0)
            self.tally.prompt_tokens += p
            self.tally.completion_tokens += c
            self.tally.cost_usd += (p * self.price_prompt + c * self.price_completion) / 1e6
        else:
            self.tally.replies_without_usage += 1
        return reply

    def _content(self, reply: dict) -> str:
        choices = reply.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LLMError(f"malformed reply from {self.url}: no 'choices' list (keys: {sorted(reply)})")
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            raise LLMError(f"malformed reply from {self.url}: choices[0].message.content is missing or not text "
                           f"(finish_reason={choices[0].get('finish_reason')!r})")
        return content


def _error_detail(body: bytes) -> str:
    """The server's error message: OpenAI's {"error": {"message": ...}}, a plain string, or the raw body."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body[:300].decode("utf-8", "replace").strip() or "(empty body)"
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    msg = err.get("message", err) if isinstance(err, dict) else err
    return str(msg)[:300]


def _redirect_message(url: str, code: int, location: str | None) -> str:
    where = repr(location[:300]) if location else "(no Location header)"
    return (f"{url} answered HTTP {code}, a redirect to {where}: saelab follows no redirect, so that the API "
            "key and the prompts never go to an address you did not name; if the new address is right, "
            "give it as the endpoint")


def _hint(code: int) -> str:
    if code in (401, 403):
        return f" (check the API key: --api-key-env VAR, or set {' / '.join(API_KEY_ENVS)})"
    if code == 404:
        return (" (check the URL: it should be the API base including /v1, e.g. http://localhost:8000/v1, "
                "and the model id)")
    return ""


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:  # an HTTP date instead of seconds: fall back to our own backoff
        return 0.0


# -- prompts, explainer and judge -----------------------------------------------------------------

_EXPLAIN_SYSTEM = (
    "We are studying features inside a language model (code, English or chat text). Each feature fires "
    "on particular tokens of a text, depending on the token and its context. You will see excerpts where "
    "the feature fires; the tokens where it fires are marked <<like this>>, and after each excerpt its "
    "firing tokens are listed with their activation on a 0-10 scale. Say in one short sentence what the "
    "feature fires on: which tokens, and in what context. Quote tokens in backticks. Do not list many "
    "examples. Answer with one line: `Explanation: <your explanation>`.")
_JUDGE_SYSTEM = (
    "A feature inside a language model is described by an explanation. For each numbered excerpt (a JSON "
    "string), decide whether the feature fires on any token of it, judging from the explanation alone. "
    "Answer with exactly one line per excerpt, `N: yes` or `N: no`, and nothing else.")
_THINK = re.compile(r"<think>.*?(</think>|$)", re.S)  # reasoning models' scratchpad is not the answer


def _marked(ex: Example, scale: float) -> tuple[str, str]:
    """(text with firing runs wrapped in <<>>, "`tok` 10, ..." for the strongest firing tokens)."""
    levels = [min(10, round(10 * a / scale)) if a > 0 else 0 for a in ex.acts]
    parts, inside = [], False
    for tok, lv in zip(ex.tokens, levels):
        if (lv > 0) != inside:
            parts.append("<<" if lv > 0 else ">>")
            inside = lv > 0
        parts.append(tok)
    parts.append(">>" if inside else "")
    firing = sorted((i for i, lv in enumerate(levels) if lv > 0), key=lambda i: (-ex.acts[i], i))[:8]
    return "".join(parts), ", ".join(f"{quote_token(ex.tokens[i])} {levels[i]}" for i in firing)


def explanation_messages(record: FeatureRecord, examples: Sequence[Example]) -> list[dict]:
    scale = record.max_act or max((max(e.acts, default=0.0) for e in examples), default=0.0) or 1.0
    blocks = []
    for n, ex in enumerate(examples, 1):
        text, acts = _marked(ex, scale)
        blocks.append(f"Excerpt {n}:\n{text}\nActivations: {acts or '(below 1 on this scale)'}")
    user = "\n\n".join(blocks)
    if record.positive_logits:
        user += "\n\nTokens the feature makes more likely next: " + ", ".join(
            quote_token(t) for t, _ in record.positive_logits[:10])
    return [{"role": "system", "content": _EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def parse_explanation_reply(reply: str) -> str:
    text = _THINK.sub("", reply).strip()
    tail = re.split(r"(?i)explanation\s*:", text)[-1]
    line = next((ln.strip() for ln in tail.splitlines() if ln.strip()), "")
    line = line.strip().strip("\"'").strip()
    if not line:
        raise LLMReplyError(f"the LLM gave no explanation; its reply was {reply[:200]!r}")
    return line


def judge_messages(explanation: str, texts: Sequence[str]) -> list[dict]:
    user = f"Explanation: {explanation}\n\nExcerpts:\n" + "\n".join(
        f"{n}. {json.dumps(t, ensure_ascii=False)}" for n, t in enumerate(texts, 1))
    return [{"role": "system", "content": _JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_judgements(reply: str, n: int) -> list[bool]:
    """``N: yes/no`` lines → n booleans; bare yes/no lines in order are accepted when there are exactly n."""
    lines = [ln.strip() for ln in _THINK.sub("", reply).splitlines() if ln.strip()]
    numbered = {}
    for ln in lines:
        m = re.match(r"\W*(\d+)\W+(yes|no)\b", ln, re.I)
        if m:
            numbered.setdefault(int(m[1]), m[2].lower() == "yes")
    if all(i in numbered for i in range(1, n + 1)):
        return [numbered[i] for i in range(1, n + 1)]
    bare = [ln.lower().strip(" .*") for ln in lines]
    if len(bare) == n and all(b in ("yes", "no") for b in bare):
        return [b == "yes" for b in bare]
    missing = [i for i in range(1, n + 1) if i not in numbered]
    raise LLMReplyError(f"the LLM judge did not answer excerpts {missing} of {n}; its reply began {reply[:200]!r}")


@dataclass
class LLMJudge:
    """Asks the LLM, ``batch_size`` contexts per request, whether the feature fires in each."""

    client: LLMClient
    batch_size: int = 10
    """Contexts per request: fewer requests, but long batches make small models lose count."""
    max_chars: int = 600
    """Each context is cut to this many characters (around its middle) to bound the prompt."""

    def __call__(self, explanation: str, contexts: list[list[str]]) -> list[bool]:
        out: list[bool] = []
        for b in range(0, len(contexts), self.batch_size):
            out += self._batch(explanation, contexts[b:b + self.batch_size])
        return out

    def _batch(self, explanation: str, contexts: list[list[str]]) -> list[bool]:
        texts = [_clip("".join(c), self.max_chars) for c in contexts]
        reply = self.client.chat(judge_messages(explanation, texts), max_tokens=8 * len(texts) + 16)
        return parse_judgements(reply, len(texts))


def _clip(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    mid = len(text) // 2
    return "…" + text[max(0, mid - n // 2):mid + n // 2] + "…"


def llm_explanation(client: LLMClient, record: FeatureRecord, *, max_examples: int = 12) -> str:
    """Ask the LLM for a one-sentence explanation (prompt after Bills et al. 2023, see ``explanation_messages``)."""
    examples = (list(record.top) + list(record.quantile))[:max_examples]
    return parse_explanation_reply(client.chat(explanation_messages(record, examples), max_tokens=120))
