"""The table of canonical hook names per model family, without torch: :mod:`saelab.hooks` resolves names
against a loaded model with it, and :mod:`saelab.model_names` checks a hook name against a model's
``config.json`` before the model is loaded (a wrong name then fails in a second, not after the load).
"""

from __future__ import annotations

import re
from typing import Literal

IO = Literal["input", "output"]

LAYER_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "bert.encoder.layer", "encoder.layer",
               "model.decoder.layers", "layers", "h")

# hook suffix → (module path relative to the block, input or output); "" is the block itself.
PRE_NORM = {
    "hook_resid_pre": ("", "input"),
    "hook_resid_mid": ("post_attention_layernorm", "input"),
    "hook_resid_post": ("", "output"),
    "hook_attn_out": ("self_attn", "output"),
    "hook_mlp_out": ("mlp", "output"),
    "mlp.hook_post": ("mlp.down_proj", "input"),
}
FAMILIES: dict[str, dict[str, tuple[str, IO]]] = {
    "llama": PRE_NORM,
    "gemma": PRE_NORM,
    "phi3": PRE_NORM,
    "gemma2": {
        **PRE_NORM,
        # Gemma 2 normalises each sublayer's output before adding it to the residual stream:
        # what the stream receives is the output of those post-norms.
        "hook_resid_mid": ("pre_feedforward_layernorm", "input"),
        "hook_attn_out": ("post_attention_layernorm", "output"),
        "hook_mlp_out": ("post_feedforward_layernorm", "output"),
    },
    "gpt2": {
        "hook_resid_pre": ("", "input"),
        "hook_resid_mid": ("ln_2", "input"),
        "hook_resid_post": ("", "output"),
        "hook_attn_out": ("attn", "output"),
        "hook_mlp_out": ("mlp", "output"),
        "mlp.hook_post": ("mlp.c_proj", "input"),
    },
    "gpt_neox": {
        "hook_resid_pre": ("", "input"),
        "hook_resid_mid": ("post_attention_layernorm", "input"),  # sequential-residual configs only
        "hook_resid_post": ("", "output"),
        "hook_attn_out": ("attention", "output"),
        "hook_mlp_out": ("mlp", "output"),
        "mlp.hook_post": ("mlp.dense_4h_to_h", "input"),
    },
    "bert": {
        # BERT is post-norm: the stream between sublayers is the attention block's normalised output.
        "hook_resid_pre": ("", "input"),
        "hook_resid_mid": ("attention", "output"),
        "hook_resid_post": ("", "output"),
        "hook_attn_out": ("attention.output.dense", "output"),
        "hook_mlp_out": ("output.dense", "output"),
        "mlp.hook_post": ("intermediate", "output"),
    },
}
FAMILY_ALIASES = {"mistral": "llama", "qwen2": "llama", "qwen3": "llama", "olmo": "llama", "olmo2": "llama",
                  "gemma3_text": "gemma2", "roberta": "bert", "phi": None}
CANONICAL = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|"
                       r"hook_mlp_out|mlp\.hook_post)$")


def family_name(model_type: str | None) -> str | None:
    """The family whose table a ``config.model_type`` uses (None: unknown, raw module paths only)."""
    if model_type in FAMILIES:
        return model_type
    return FAMILY_ALIASES.get(model_type)


def family_table(model_type: str | None, parallel_residual: bool = True) -> dict[str, tuple[str, IO]]:
    """Hook suffix → (module path in the block, input or output) for a model type; pre-norm for unknown ones.
    ``parallel_residual``: the config's ``use_parallel_residual`` (GPT-NeoX/Pythia)."""
    family = family_name(model_type)
    table = dict(FAMILIES.get(family, PRE_NORM))
    if family == "gpt_neox" and parallel_residual:
        del table["hook_resid_mid"]  # attention and MLP both read resid_pre: no stream between them
    return table
