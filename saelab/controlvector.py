"""saelab directions as llama.cpp control vectors: a dial that runs in any GGUF runtime.

llama.cpp has one steering hook, the *control vector*: a GGUF file of float32 tensors ``direction.N``
(``[n_embd]``), each added to the residual stream at *every* position (prompt and generated tokens)
with ``llama-server --control-vector FILE`` (or ``--control-vector-scaled FILE:SCALE``, which multiplies
every direction by SCALE). What llama.cpp does with ``direction.N`` (read in its source: common.cpp
``common_control_vector_load_one`` stores ``direction.N`` at row N − 1 of one buffer; llama-adapter.cpp
``llama_adapter_cvec::apply`` gives that row to the tensor of layer ``il = N``; every model's graph calls
``build_cvec(cur, il)`` on the output of layer ``il`` after its feed-forward residual, the ``l_out``
tensor): ``direction.N`` is added to the output of decoder layer N (0-based), which is saelab's
``blocks.N.hook_resid_post`` (TransformerLens numbering) and ``blocks.N+1.hook_resid_pre``. llama.cpp
has no tensor for layer 0 and refuses ``direction.0``: the output of block 0 cannot be steered.

The exported direction is in the units saelab's ``Add`` uses, so ``--control-vector FILE`` (scale 1)
adds exactly what ``Add(v)`` on each feature adds: ``Σ_f v_f · max_f · W_dec[f]`` (``max_f``: the
feature's max activation). Unlike saelab's steering it also edits BOS and attention sinks, and it
cannot clamp (no encoder, no error term): see docs/llamacpp.md.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping, NamedTuple

import gguf
import numpy as np
import torch

from saelab.atomic import atomic_path
from saelab.errors import SaelabError
from saelab.hooks import CANONICAL
from saelab.models import SMOLLM2_PACKAGE, smollm2_gguf
from saelab.steer import check_feature

ARCH = "controlvector"
"""``general.architecture`` of a control-vector file (what llama.cpp's cvector-generator writes)."""
_HF_TO_LLAMACPP = {"mistral": "llama", "gpt_neox": "gptneox", "gemma3_text": "gemma3"}
"""transformers' model_type → llama.cpp's architecture name, where they differ."""
_RAW_LAYER = re.compile(r"^(?:model\.layers|transformer\.h|gpt_neox\.layers|layers|h)\.(\d+)$")


class ControlVector(NamedTuple):
    directions: dict[int, np.ndarray]
    """llama.cpp layer N → the float32 ``[n_embd]`` vector stored as ``direction.N``."""
    model_hint: str
    """The model architecture it was made for (``controlvector.model_hint``, e.g. ``llama``)."""
    source: dict
    """saelab's record of how it was made (hook, features and strengths or direction file)."""


def llamacpp_layer(hook: str) -> int:
    """The N of ``direction.N`` that llama.cpp adds where saelab's ``hook`` reads (see the module docstring).

    ``blocks.L.hook_resid_post`` → L; ``blocks.L.hook_resid_pre`` → L − 1; a raw block path
    (``model.layers.L``, its output) → L. Hooks inside a block cannot be reached by a control vector."""
    m = CANONICAL.match(hook)
    if m:
        layer, kind = int(m[1]), m[2]
        if kind not in ("hook_resid_post", "hook_resid_pre"):
            raise SaelabError(f"hook {hook!r} is inside block {layer}: a llama.cpp control vector is added to the "
                              "residual stream between blocks only (blocks.L.hook_resid_post); use an SAE or "
                              "direction on such a hook")
        layer = layer if kind == "hook_resid_post" else layer - 1
    else:
        raw = _RAW_LAYER.match(hook)
        if raw is None:
            raise SaelabError(f"hook {hook!r}: a llama.cpp control vector is added at block outputs only; name "
                              "the hook as blocks.L.hook_resid_post")
        layer = int(raw[1])
    if layer < 1:
        raise SaelabError(f"hook {hook!r} is the output of block 0 (or the embeddings): llama.cpp never adds a "
                          "control vector there (it refuses direction.0); use a hook of a later block")
    return layer


def feature_direction(sae, strengths: Mapping[int, float], max_acts: Mapping[int, float]) -> torch.Tensor:
    """``Σ_f strengths[f] · max_acts[f] · W_dec[f]`` ``[d_in]`` (float32): what ``Add(strengths[f])`` on
    every feature adds at each edited position."""
    if not strengths:
        raise SaelabError("no feature given: pass --feature ID=STRENGTH (one or more)")
    out = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    for f, s in strengths.items():
        check_feature(sae, f)
        if not math.isfinite(s):
            raise SaelabError(f"feature {f}: the strength must be a finite number, got {s!r}")
        m = float(max_acts[f])
        if s != 0 and not m > 0:
            raise SaelabError(f"feature {f} has max activation {m} (dead on the analysis corpus): a multiple of "
                              "it is 0; give a direction file instead")
        out += s * m * sae.W_dec.detach()[f].double()  # (d_in,)
    return out.float()


def write_control_vector(path: Path | str, direction: torch.Tensor | np.ndarray, layer: int, model_hint: str,
                         source: Mapping | None = None) -> Path:
    """Write ``direction [n_embd]`` as llama.cpp's ``direction.<layer>`` (float32) to the GGUF ``path``
    (atomically: a reader sees the old file or the new one)."""
    vec = np.ascontiguousarray(np.asarray(direction, dtype=np.float32))  # (n_embd,)
    if vec.ndim != 1:
        raise SaelabError(f"a control vector's direction is one vector [n_embd], got shape {list(vec.shape)}")
    if not np.isfinite(vec).all():
        raise SaelabError(f"the direction for {path} holds NaN or inf values; nothing was written")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise SaelabError(f"llama.cpp layer {layer!r}: control vectors start at layer 1 (direction.0 is refused)")
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        w.add_string(f"{ARCH}.model_hint", model_hint)
        w.add_int32(f"{ARCH}.layer_count", 1)  # direction tensors in the file, as llama.cpp's generator counts
        w.add_string("saelab.source", json.dumps(dict(source or {}), sort_keys=True))
        w.add_tensor(f"direction.{layer}", vec)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_control_vector(path: Path | str) -> ControlVector:
    """Read a control-vector GGUF (ours or llama.cpp's) with the ``gguf`` package's reader, checking what
    llama.cpp checks: ``direction.N`` names with N ≥ 1, float32, one dimension, one length."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise SaelabError(f"{path} is not a readable GGUF file ({e})") from e
    hint = _string_field(reader, f"{ARCH}.model_hint")
    source = _string_field(reader, "saelab.source")
    directions: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if m is None or int(m[1]) < 1:
            raise SaelabError(f"{path}: tensor {t.name!r} is not direction.N with N >= 1 (llama.cpp refuses it)")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise SaelabError(f"{path}: {t.name} must be one float32 vector, got {t.tensor_type.name} {list(t.shape)}")
        directions[int(m[1])] = np.array(t.data, dtype=np.float32)
    if len({v.shape for v in directions.values()}) > 1:
        raise SaelabError(f"{path}: the direction tensors have different lengths")
    return ControlVector(directions, hint or "", json.loads(source) if source else {})


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def model_hint(model_name: str | None) -> str | None:
    """llama.cpp's architecture name of the model an SAE was trained on: the GGUF's
    ``general.architecture`` (``smollm2`` or a .gguf path), or an HF folder's ``model_type``; else None."""
    if not model_name:
        return None
    path = Path(model_name).expanduser()
    if model_name == "smollm2" or model_name == SMOLLM2_PACKAGE:
        path = smollm2_gguf()
    if path.suffix == ".gguf" and path.is_file():
        return _string_field(gguf.GGUFReader(str(path)), "general.architecture")
    config = path / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        return _HF_TO_LLAMACPP.get(model_type, model_type) if isinstance(model_type, str) else None
    return None
