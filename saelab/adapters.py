"""PEFT/LoRA adapters: a base model plus an adapter folder as one model to study (extra ``finetune``: peft).

An adapter folder is what ``peft``'s ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors``. :func:`with_adapter` loads it onto a :class:`saelab.models.LoadedModel` and
merges it into the weights (``merge_and_unload``), so that the result is an ordinary HF module: every hook
name resolves as on the base model and no stage needs to know an adapter was there. Pickled adapters
(``adapter_model.bin``) are refused, as every pickle is.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

from saelab.errors import InvalidModel
from saelab.models import LoadedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter(path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def adapter_config(folder: Path) -> dict:
    """The adapter's ``adapter_config.json``, checked to be a JSON object."""
    file = folder / ADAPTER_CONFIG
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidModel(f"{file}: not a readable adapter config ({e}); re-save the adapter with peft") from e
    if not isinstance(cfg, dict):
        raise InvalidModel(f"{file}: expected a JSON object")
    return cfg


def with_adapter(base: LoadedModel, folder, copy_base: bool = True) -> LoadedModel:
    """``base`` with the PEFT adapter of ``folder`` merged into its weights (a deep copy unless ``copy_base``
    is False, when ``base``'s module is changed in place). The result's name is ``base+folder``."""
    folder = Path(folder)
    if not is_adapter(folder):
        raise InvalidModel(f"{folder}: not a PEFT adapter folder (no {ADAPTER_CONFIG}); give the tuned model's "
                           "folder or GGUF instead, or the folder that peft's save_pretrained wrote")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise InvalidModel(f"{folder}: no {ADAPTER_WEIGHTS} (saelab never loads pickled adapter_model.bin); "
                           "re-save the adapter with safe_serialization=True")
    if not peft_available():
        raise InvalidModel(f"{folder} is a PEFT adapter, which needs the package peft: pip install 'saelab[finetune]'")
    import peft  # the extra 'finetune'; only adapter users pay for the import

    module = copy.deepcopy(base.model) if copy_base else base.model
    cfg = adapter_config(folder)
    if cfg.get("peft_type") not in (None, "LORA"):
        raise InvalidModel(f"{folder}: peft_type {cfg.get('peft_type')!r}; saelab merges LoRA adapters only")
    try:
        tuned = peft.PeftModel.from_pretrained(module, str(folder), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as e:
        raise InvalidModel(f"{folder}: the adapter does not fit model {base.name!r} ({e})") from e
    merged = tuned.merge_and_unload().eval()
    return LoadedModel(merged, base.tokenizer, f"{base.name}+{folder}", base.family, base.is_causal, base.path,
                       base.gguf_sha256)
