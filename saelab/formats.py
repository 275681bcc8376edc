"""Read and write SAE folders: ours (= the SAELens v6 layout), SAELens (v6 and older), sparsify, Gemma Scope.

Our folder, readable by SAELens ``SAE.load_from_disk`` without conversion::

    cfg.json                 SAELens v6 config: d_in, d_sae, dtype, architecture (standard | topk | jumprelu),
                             k (topk), apply_b_dec_to_input, normalize_activations, metadata{model_name, ...}
    sae_weights.safetensors  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in],
                             threshold [d_sae] (jumprelu, and batchtopk saved as jumprelu as SAELens does)
    sparsity.safetensors     {"sparsity": log10(feature density + 1e-10)} [d_sae], when the density is known
    saelab.json              provenance: how it was trained (model hash, corpus, tokens, config, stats)

``cfg.json`` + weights are what is needed to *run* the SAE (→ ``sae.cfg``); ``saelab.json`` describes
how it was made (→ ``sae.provenance``). Every foreign format is converted *exactly* into our math,
``z = act(W_encᵀ(x − b_dec) + b_enc)``, ``x̂ = W_decᵀ z + b_dec``, by folding its extra knobs into the
weights (no b_dec on the input, decoder-norm rescaling, a finetuning scaling factor); what cannot be
folded exactly is refused with an error naming the file and the setting. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from saelab import arch as architectures
from saelab.atomic import atomic_dir, regular_file, write_json, write_tensors
from saelab.errors import InvalidSAE
from saelab.provenance import Provenance
from saelab.sae import SAE, SAEConfig

CFG, WEIGHTS, SPARSITY, PROVENANCE = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "saelab.json"
SPARSIFY_WEIGHTS, GEMMA_SCOPE_PARAMS = "sae.safetensors", "params.npz"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: SAELens reads configs without a version >= 6 as the old flat kind."""
METADATA_KEYS = ("model_name", "hook_name", "hf_hook_name", "hook_io", "context_size", "prepend_bos",
                 "exclude_special_tokens", "model_weights_sha256")
"""Provenance keys that also go into cfg.json["metadata"] (where SAELens and Neuronpedia look for them)."""
SAELENS_LLM_METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index",
                             "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens",
                             "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
                             "sae_lens_version", "sae_lens_training_version")
"""Top-level keys of an old flat SAELens cfg.json that SAELens 6 moves into metadata."""
_DENSITY_EPS = 1e-10  # SAELens' epsilon inside log10(density + eps)
_INT, _STR, _BOOL, _DICT = ("an integer", int), ("a string", str), ("true or false", bool), ("an object", dict)
_SIZE = ("a positive integer", int)  # sizes and lengths: 0 or -1 ended deep inside (islice, empty tensors)
CFG_FIELDS = {"d_in": _SIZE, "d_sae": _SIZE, "k": _INT, "num_latents": _SIZE, "expansion_factor": _SIZE,
              "architecture": _STR, "activation": _STR, "activation_fn": _STR, "dtype": _STR, "device": _STR,
              "sae_lens_version": _STR, "hook_name": _STR, "hook_point": _STR, "model_name": _STR,
              "context_size": _SIZE, "apply_b_dec_to_input": _BOOL, "finetuning_scaling_factor": _BOOL,
              "rescale_acts_by_decoder_norm": _BOOL, "transcode": _BOOL, "skip_connection": _BOOL, "signed": _BOOL,
              "metadata": _DICT, "activation_fn_kwargs": _DICT}
"""The type each known cfg.json key (top level or in metadata) must have when present and not null."""


class Parsed(NamedTuple):
    """An SAE read from disk, already in our convention (float32 tensors, our architecture names)."""

    architecture: str
    k: int | None
    tensors: dict[str, torch.Tensor]
    metadata: dict
    provenance: dict


# -- save ------------------------------------------------------------------------------------------


def save_sae(sae: SAE, path, **provenance) -> None:
    """Write ``sae`` as one folder at ``path``, atomically (a crash leaves the old folder or the new one).

    ``provenance`` (merged over ``sae.provenance``) goes to saelab.json; its METADATA_KEYS also go to
    cfg.json["metadata"], and ``feature_density`` [d_sae] also to sparsity.safetensors (as log10).
    Input scaling must already be folded into the weights (``sae.fold_input_scale``); record the factor
    as ``input_scale``.
    """
    prov = _jsonable({**sae.provenance, **provenance}, "provenance")
    prov.setdefault("trained_architecture", sae.cfg.architecture)
    for key in ("feature_density", "feature_max_act"):
        if key in prov and len(prov[key]) != sae.d_sae:
            raise ValueError(f"provenance {key!r} has {len(prov[key])} values but the SAE has d_sae={sae.d_sae}")
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if sae.rule.threshold_at_inference else [])
    tensors = {n: getattr(sae, n).detach().cpu().contiguous() for n in names}
    _check_finite(tensors, f"the SAE being saved to {path}", "refusing to save; the training run diverged")
    with atomic_dir(path) as tmp:
        write_json(tmp / CFG, _saelens_cfg(sae, prov))
        write_tensors(tmp / WEIGHTS, tensors)
        if "feature_density" in prov:
            density = torch.tensor(prov["feature_density"], dtype=torch.float32)
            write_tensors(tmp / SPARSITY, {"sparsity": torch.log10(density + _DENSITY_EPS)})
        write_json(tmp / PROVENANCE, prov)


def _saelens_cfg(sae: SAE, prov: dict) -> dict:
    """The SAELens v6 inference config (``SAEConfig.to_dict`` of StandardSAE / TopKSAE / JumpReLUSAE)."""
    metadata = {**sae.cfg.metadata, **{k: prov[k] for k in METADATA_KEYS if k in prov},
                "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None}
    cfg = {"architecture": sae.rule.saved_name, "d_in": sae.d_in, "d_sae": sae.d_sae,
           "dtype": str(sae.W_enc.dtype).removeprefix("torch."), "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none"}
    if sae.rule.ranks_per_token:
        cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    cfg["metadata"] = _jsonable(metadata, "metadata")
    return cfg


def _jsonable(obj, where: str):
    """Tensors/arrays → lists, Paths → str, recursively; anything else not JSON → TypeError naming it."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, where) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    raise TypeError(f"{where} is a {type(obj).__name__}, which cannot be written to JSON; pass plain values")


# -- load ------------------------------------------------------------------------------------------


def load_sae(path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder (ours, SAELens v6 or older, sparsify hook folder) or a Gemma Scope ``params.npz``.

    Returns the SAE in eval mode with float32 weights, ``sae.cfg.metadata`` from the format's config and
    ``sae.provenance`` from saelab.json ({} if none; plus ``feature_density`` from sparsity.safetensors).
    """
    path = Path(path)
    parsed = _read_any(path)
    t = parsed.tensors
    sae = SAE(SAEConfig(d_in=t["W_enc"].shape[0], d_sae=t["W_enc"].shape[1], architecture=parsed.architecture,
                        k=parsed.k, metadata=parsed.metadata))
    with torch.no_grad():
        for name, value in t.items():
            getattr(sae, name).copy_(value)
    sae.provenance = parsed.provenance
    return sae.eval().to(device)


def _read_any(path: Path) -> Parsed:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such SAE file or folder")
    if not path.is_dir():
        regular_file(path, "SAE file")
        _refuse_pickle(path)
        if path.suffix == ".npz":
            return _read_gemma_scope(path)
        if path.name not in (CFG, WEIGHTS, SPARSIFY_WEIGHTS, PROVENANCE):
            raise ValueError(f"{path}: not an SAE file; pass an SAE folder (cfg.json + weights) or a params.npz")
        path = path.parent
    names = {p.name for p in path.iterdir()}
    if WEIGHTS in names:
        return _read_saelens(path)
    if SPARSIFY_WEIGHTS in names:
        return _read_sparsify(path)
    if GEMMA_SCOPE_PARAMS in names:
        return _read_gemma_scope(path / GEMMA_SCOPE_PARAMS)
    for name in sorted(names):
        _refuse_pickle(path / name)
    subs = sorted(d.name for d in path.iterdir()
                  if d.is_dir() and ((d / CFG).exists() or (d / GEMMA_SCOPE_PARAMS).exists()))
    if len(subs) == 1:  # a run folder (runs/demo): its SAE is in sae/
        raise ValueError(f"{path} is not an SAE folder but holds one in {subs[0]}/; pass {path / subs[0]}")
    if subs:
        raise ValueError(f"{path} holds {len(subs)} SAEs (one per hook: {', '.join(subs)}); pass one of them, "
                         f"e.g. {path / subs[0]}")
    raise FileNotFoundError(f"{path}: no SAE found; expected cfg.json + {WEIGHTS} (saelab / SAELens), "
                            f"cfg.json + {SPARSIFY_WEIGHTS} (sparsify) or {GEMMA_SCOPE_PARAMS} (Gemma Scope)")


def _refuse_pickle(file: Path) -> None:
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{file}: a pickle file (torch.save/pickle format); saelab never unpickles files, "
                         "because unpickling runs arbitrary code. Convert it to safetensors where you trust it "
                         f"(a SAELens folder with {WEIGHTS}, or a params.npz without object arrays)")


def _read_json(file: Path) -> dict:
    regular_file(file, "SAE config")
    if not file.exists():
        raise FileNotFoundError(f"{file}: missing; the SAE folder needs it")
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e}); the file is damaged, re-save or re-download it") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    regular_file(file, "SAE weights file")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e}); re-save or re-download it") from e
    ints = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in tensors.items() if not v.is_floating_point()]
    if ints:   # converting would load them silently as weights they were never meant to be
        raise InvalidSAE(f"{file}: tensor(s) {', '.join(ints)} are not floating point; SAE weights are float "
                         "tensors. The file is damaged or not an SAE")
    return {k: v.float() for k, v in tensors.items()}


def _check_fields(cfg: dict, file: Path, where: str = "") -> None:
    """Each known key of ``cfg`` has its type (:data:`CFG_FIELDS`); numbers are finite. Names the file and key."""
    for key, value in cfg.items():
        if key not in CFG_FIELDS or value is None:
            continue
        what, kind = CFG_FIELDS[key]
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is int and isinstance(value, float) and math.isfinite(value) and value == int(value):
            ok = True   # 4096.0 from a JSON writer that only knows floats
        if ok and (what, kind) == _SIZE:
            ok = value >= 1
        if not ok:
            raise InvalidSAE(f"{file}: {where}{key} must be {what}, got {value!r}; fix or regenerate the config")
    if isinstance(cfg.get("metadata"), dict) and not where:
        _check_fields(cfg["metadata"], file, "metadata.")


def _check_finite(tensors: dict[str, torch.Tensor], where, what_to_do: str) -> None:
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            n_bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: {name} has {n_bad} NaN/inf values; {what_to_do}")


def _check_tensors(t: dict, required: dict[str, tuple], file: Path, allowed_extra: tuple = ()) -> None:
    """Every required key present with its shape, nothing unknown, all finite."""
    missing = [k for k in required if k not in t]
    if missing:
        raise ValueError(f"{file}: missing tensor(s) {', '.join(missing)} (found {', '.join(sorted(t)) or 'none'}); "
                         "the file is incomplete or not this SAE format")
    unknown = sorted(set(t) - set(required) - set(allowed_extra))
    if unknown:
        raise ValueError(f"{file}: unexpected tensor(s) {', '.join(unknown)} for this architecture; "
                         "saelab cannot reproduce what they do, so it refuses rather than guess")
    for k, shape in required.items():
        if tuple(t[k].shape) != shape:
            raise ValueError(f"{file}: {k} has shape {list(t[k].shape)}, expected {list(shape)} "
                             f"(from the config's d_in/d_sae); config and weights do not belong together")
    _check_finite(t, file, "the weights are corrupt; re-download or retrain")


def _shapes(d_in: int, d_sae: int, threshold: bool) -> dict[str, tuple]:
    s = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    return {**s, "threshold": (d_sae,)} if threshold else s


def _fold_b_dec_off_input(t: dict) -> None:
    """Formats that encode ``x`` (not ``x − b_dec``): b_enc += b_decᵀ W_enc makes ours compute the same."""
    t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]


def _int_field(cfg: dict, key: str, file: Path) -> int:
    if key not in cfg:
        raise ValueError(f"{file}: missing key {key!r}; the config is incomplete")
    value = cfg[key]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value) or value < 1):
        raise ValueError(f"{file}: {key} must be a positive integer, got {value!r}")
    return int(value)


# -- SAELens (and ours) ----------------------------------------------------------------------------


def _read_saelens(folder: Path) -> Parsed:
    file = folder / CFG
    cfg = _read_json(file)
    _check_fields(cfg, file)
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if version and _major(version) >= 6:
        spec = {**cfg, "metadata": dict(cfg.get("metadata") or {})}
    else:
        spec = _flat_to_v6(cfg, file)
    tensors = _read_safetensors(folder / WEIGHTS)
    arch, k, tensors = _saelens_to_ours(spec, tensors, file, folder / WEIGHTS)
    provenance = _read_json(folder / PROVENANCE) if (folder / PROVENANCE).exists() else {}
    if "feature_density" not in provenance and (folder / SPARSITY).exists():
        provenance["feature_density"] = _density_from_sparsity(folder / SPARSITY, tensors["b_enc"].shape[0])
    return Parsed(arch, k, tensors, spec["metadata"], provenance)


def _major(version) -> int:
    match = re.match(r"\s*(\d+)", str(version))
    return int(match.group(1)) if match else 0


def _flat_to_v6(cfg: dict, file: Path) -> dict:
    """An old flat SAELens cfg.json → v6 keys (as SAELens' handle_pre_6_0_config does)."""
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    c = {renames.get(k, k): v for k, v in cfg.items()}
    c.setdefault("architecture", "standard")
    act, k = c.get("activation_fn") or "relu", (c.get("activation_fn_kwargs") or {}).get("k")
    if act == "topk" and k is not None:
        c["architecture"], c["k"] = "topk", k
    elif act != "relu":
        raise ValueError(f"{file}: activation_fn {act!r} is not supported (saelab runs relu, topk and jumprelu "
                         "SAEs); convert the SAE to one of those")
    norm = c.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:  # old configs: a flag for Anthropic's input scaling
        c["normalize_activations"] = "expected_average_only_in" if norm else "none"
    c["metadata"] = {key: c[key] for key in SAELENS_LLM_METADATA_KEYS if key in c}
    return c


def _saelens_to_ours(spec: dict, t: dict, cfg_file: Path, weights_file: Path):
    """Check a SAELens config + state dict and fold its options into our weights → (arch, k, tensors)."""
    saved = spec.get("architecture")
    d_in, d_sae = _int_field(spec, "d_in", cfg_file), _int_field(spec, "d_sae", cfg_file)
    if saved is None:
        raise ValueError(f"{cfg_file}: missing key 'architecture'; the config is incomplete")
    rule = architectures.by_saved_name(saved)
    if rule is None:
        raise ValueError(f"{cfg_file}: SAELens architecture {saved!r} is not supported; saelab loads "
                         f"{', '.join(architectures.saved_names())} (batchtopk kinds are saved as jumprelu)")
    if saved != rule.saved_name and "topk_threshold" in t:  # a BatchTopK training checkpoint: one global threshold
        t["threshold"] = torch.full((d_sae,), float(t.pop("topk_threshold")))
    norm = spec.get("normalize_activations", "none")
    if norm != "none":
        raise ValueError(f"{cfg_file}: normalize_activations={norm!r} is not supported: its input scaling is "
                         "not stored in the folder. Fold the scale into the weights (W_enc·s, W_dec/s, b_dec/s) "
                         "and set normalize_activations to \"none\"")
    if "log_threshold" in t:
        t["threshold"] = t.pop("log_threshold").exp()
    scaling = t.pop("scaling_factor", None)
    _check_tensors(t, _shapes(d_in, d_sae, rule.threshold_at_inference), weights_file)
    if scaling is not None:  # old SAELens: x̂ = (z · s) W_dec + b_dec
        if scaling.shape != (d_sae,) or not torch.isfinite(scaling).all():
            raise ValueError(f"{weights_file}: scaling_factor must be {d_sae} finite values")
        if not torch.allclose(scaling, torch.ones_like(scaling)):
            if not spec.get("finetuning_scaling_factor"):
                raise ValueError(f"{cfg_file}: weights have a scaling_factor but finetuning_scaling_factor is false")
            t["W_dec"] = t["W_dec"] * scaling[:, None]
    k = _int_field(spec, "k", cfg_file) if rule.needs_k else None
    if rule.ranks_per_token and spec.get("rescale_acts_by_decoder_norm"):
        norms = t["W_dec"].norm(dim=1)  # (d_sae,) as SAELens' _fold_norm_topk
        t.update(W_enc=t["W_enc"] * norms, b_enc=t["b_enc"] * norms, W_dec=t["W_dec"] / norms[:, None])
    if not spec.get("apply_b_dec_to_input", True):
        _fold_b_dec_off_input(t)
    return rule.name, k, t


def _density_from_sparsity(file: Path, d_sae: int) -> list[float]:
    log_density = _read_safetensors(file).get("sparsity")
    if log_density is None or log_density.shape != (d_sae,):
        raise ValueError(f"{file}: expected a 'sparsity' tensor of shape [{d_sae}]")
    return (torch.pow(10.0, log_density.double()) - _DENSITY_EPS).clamp_min(0).tolist()


# -- sparsify --------------------------------------------------------------------------------------


def _read_sparsify(folder: Path) -> Parsed:
    """EleutherAI sparsify: x̂ = Σ topk(ReLU(encoder(x − b_dec))) · W_dec[i] + b_dec (``SparseCoder``).

    ``encoder`` is an nn.Linear (weight [d_sae, d_in], so W_enc is its transpose); W_dec is stored
    [d_sae, d_in] like ours (sparsify decodes with ``embedding_bag(indices, W_dec)``).
    """
    file = folder / CFG
    cfg = _read_json(file)
    _check_fields(cfg, file)
    for flag, why in (("transcode", "a transcoder (it does not subtract b_dec and predicts another hook)"),
                      ("skip_connection", "a skip connection (W_skip)"), ("signed", "signed activations")):
        if cfg.get(flag):
            raise ValueError(f"{file}: {flag}=true: {why} is not supported by saelab's SAE")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{file}: activation {cfg['activation']!r} is not supported; saelab loads sparsify "
                         "TopK SAEs only")
    d_in = _int_field(cfg, "d_in", file)
    d_sae = int(cfg.get("num_latents") or 0) or d_in * _int_field(cfg, "expansion_factor", file)
    k = _int_field(cfg, "k", file)
    raw = _read_safetensors(folder / SPARSIFY_WEIGHTS)
    _check_tensors(raw, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in),
                         "b_dec": (d_in,)}, folder / SPARSIFY_WEIGHTS)
    tensors = {"W_enc": raw["encoder.weight"].T.contiguous(), "b_enc": raw["encoder.bias"],
               "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
    metadata = {"hf_hook_name": folder.name}
    layer = re.fullmatch(r"(?:model\.)?layers\.(\d+)", folder.name)
    if layer:  # the output of decoder layer N is the residual stream after block N
        metadata["hook_name"] = f"blocks.{layer.group(1)}.hook_resid_post"
    run_cfg = folder.parent / "config.json"  # sparsify's run config, one level up
    if run_cfg.exists() and _read_json(run_cfg).get("model"):
        metadata["model_name"] = _read_json(run_cfg)["model"]
    return Parsed("topk", k, tensors, metadata, {})


# -- Gemma Scope -----------------------------------------------------------------------------------


def _read_gemma_scope(file: Path) -> Parsed:
    """Gemma Scope ``params.npz``: z = ReLU(pre)·1[pre > θ] with pre = x W_enc + b_enc (no b_dec on the input)."""
    regular_file(file, "SAE weights file")
    try:
        data = np.load(file, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{file}: a single array, not an .npz archive of named parameters (W_enc, ...)")
        with data:
            arrays = {("W_" + k[2:] if k.startswith("w_") else k): data[k] for k in data.files}
    except ValueError as e:
        if "pickle" in str(e) or "Object arrays" in str(e):
            raise ValueError(f"{file}: holds pickled/object arrays; saelab loads npz files with "
                             "allow_pickle=False only. Re-save the parameters as plain float arrays") from e
        raise
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{file}: not a readable .npz file ({e}); re-download it") from e
    non_float = [k for k, a in arrays.items() if a.dtype.kind != "f"]
    if non_float:
        raise ValueError(f"{file}: array(s) {', '.join(non_float)} are not floating point")
    t = {k: torch.from_numpy(np.asarray(a, dtype=np.float32)) for k, a in arrays.items()}
    if "W_enc" not in t or t["W_enc"].ndim != 2:
        raise ValueError(f"{file}: missing the 2-d array W_enc [d_in, d_sae]; not a Gemma Scope params.npz")
    d_in, d_sae = t["W_enc"].shape
    _check_tensors(t, _shapes(d_in, d_sae, threshold=True), file)
    _fold_b_dec_off_input(t)
    return Parsed("jumprelu", None, t, {}, {})


# -- provenance helpers ----------------------------------------------------------------------------


def feature_max_activations(sae: SAE) -> torch.Tensor:
    """Per-feature max activation ``[d_sae]`` recorded in saelab.json (``feature_max_act``)."""
    values = Provenance.of(sae).feature_max_act
    if values is None:
        raise ValueError("this SAE has no per-feature max activations (saelab.json 'feature_max_act'); run the "
                         "analysis pass (features.db has them) or re-save the SAE with feature_max_act=...")
    out = torch.tensor(values, dtype=torch.float32, device=sae.W_dec.device)
    if out.shape != (sae.d_sae,) or not torch.isfinite(out).all():
        raise ValueError(f"saelab.json 'feature_max_act' must be {sae.d_sae} finite numbers, "
                         f"got shape {list(out.shape)}")
    return out
