"""Load a model to study: ``load_model("builtin" | hub name | local HF folder)``.

Every model, the builtin one included, goes through the same Hugging Face path: causal LMs via
``AutoModelForCausalLM``, anything else (BERT and other encoders) via ``AutoModel`` for harvest and
analysis only. Models are loaded in float32 on CPU unless a device is given: CPU bf16 matmuls are
~400× slower than fp32 on the machines we target.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

BUILTIN = "builtin"


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
            h = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
            self._weights_hash = h.hexdigest()
        return self._weights_hash

    def describe(self) -> dict:
        return {"model_name": self.name, "family": self.family, "weights_sha256": self.weights_hash}


def resolve_path(name_or_path: str) -> tuple[str, Path | None]:
    """Map ``builtin`` to the shipped folder; keep hub ids; check that a local-looking path exists."""
    if name_or_path == BUILTIN:
        from saelab.builtin import MODEL_DIR

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
    return name_or_path, None


def load_model(name_or_path: str = BUILTIN, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a Hugging Face model and tokenizer by name, hub id or local folder."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    source, path = resolve_path(name_or_path)
    if path is not None:
        _refuse_pickled_weights(path)
    config = AutoConfig.from_pretrained(source)
    is_causal = _is_causal(config)
    cls = AutoModelForCausalLM if is_causal else AutoModel
    model = cls.from_pretrained(source, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    return LoadedModel(model, tokenizer, name_or_path, config.model_type, is_causal, path)


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _refuse_pickled_weights(path: Path) -> None:
    """A local folder whose weights exist only as pickles (pytorch_model.bin): refused, never unpickled,
    since unpickling a file can run any code in it."""
    if any(path.glob("*.safetensors")):
        return                          # transformers then reads the safetensors, never the pickles
    pickles = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
    if pickles:
        from saelab.errors import InvalidModel

        raise InvalidModel(f"{path}: the weights are only in pickle files ({', '.join(pickles[:3])}); saelab never "
                           "unpickles files, as that can run code hidden in them. Convert the folder to safetensors "
                           "where you trust it (model.save_pretrained(folder, safe_serialization=True))")


def _is_causal(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return False
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type != "bert"
