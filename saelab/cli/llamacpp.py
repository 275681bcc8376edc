"""``saelab export control-vector``: an SAE's features (or a direction) as a llama.cpp control vector."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

from saelab.cli.steering import _parse_edit

_SOURCES = "give --feature ID=STRENGTH (one or more), --direction FILE.safetensors or --concept FILE[=STRENGTH]"


def add_control_vector_args(p) -> None:
    g = p.add_argument_group("control-vector (the positional argument is the SAE folder; --out is the .gguf file)")
    g.add_argument("--feature", action="append", metavar="ID=STRENGTH",
                   help="add STRENGTH × the feature's max activation along its decoder direction, as "
                        "'saelab steer --mode add' does (repeat for a feature set)")
    g.add_argument("--direction", metavar="FILE.safetensors",
                   help="a direction instead: a safetensors file holding 'direction' [d_in], in residual units")
    g.add_argument("--scale", type=float, default=1.0, help="multiply the direction file by this (default 1)")
    g.add_argument("--concept", metavar="FILE[=STRENGTH]",
                   help="a concept file of this SAE (saelab concept --save) at its strength or STRENGTH: an add dial "
                        "in × max activation, or a raw difference-of-means vector (a control vector is one constant "
                        "added at every position, so clamp and × residual-norm dials cannot be exported)")
    g.add_argument("--features-db", help="features.db for max activations (default: features.db beside the "
                                         "SAE if present, else the SAE's own record)")
    g.add_argument("--model-hint", help="llama.cpp architecture name stored in the file (default: from the "
                                        "SAE's model: the GGUF's general.architecture or config.json's model_type)")


def run_control_vector(args) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("writing a control vector needs the gguf package: pip install 'saelab[gguf]'")
    from saelab.controlvector import write_control_vector
    from saelab.formats import load_sae

    if sum(map(bool, (args.feature, args.direction, args.concept))) != 1:
        raise ValueError(f"export control-vector: {_SOURCES} (exactly one)")
    sae = load_sae(args.db)
    direction, source, hook = _direction(args, sae)
    layer, hint, gguf_model = _target(args, sae, hook)
    out = write_control_vector(args.out, direction, layer, hint, source)
    print(f"wrote {out}: direction.{layer} (|v| {float(direction.norm()):.3g}, {direction.numel()} floats) for "
          f"{hook}, model hint {hint!r}; llama.cpp adds it at every position, prompt included")
    model = shlex.quote(str(gguf_model)) if gguf_model else "MODEL.gguf"
    print(f"run it: llama-server -m {model} --control-vector {shlex.quote(str(out))}   "
          f"(--control-vector-scaled {shlex.quote(str(out))}:S multiplies it by S)")


def _direction(args, sae):
    """(direction [d_in], the record stored in the file, the SAE's hook)."""
    from saelab.controlvector import feature_direction
    from saelab.steer import check_feature, max_activations, sae_hook_name

    hook = sae_hook_name(sae)
    if args.direction:
        return _direction_file(args, sae), {"hook": hook, "direction": str(args.direction), "scale": args.scale}, hook
    if args.concept:
        import torch

        concept, strengths = _concept_strengths(args.concept, sae)
        if concept.mode == "vector":
            direction = torch.tensor(concept.direction, dtype=torch.float32) * next(iter(strengths.values()))
            return direction, {"hook": hook, "concept": concept.name, "strength": next(iter(strengths.values()))}, hook
    else:
        strengths = {}
        for spec in args.feature:
            f, edit = _parse_edit(spec, "add")
            if f in strengths:
                raise ValueError(f"--feature {spec!r}: feature {f} is given twice")
            strengths[f] = edit.value
            check_feature(sae, f)
    db = _features_db(args, sae)
    try:
        maxes = max_activations(sae, [f for f, s in strengths.items() if s != 0], db=db)
    finally:
        if db is not None:
            db.close()
    maxes.update({f: 0.0 for f, s in strengths.items() if s == 0})
    direction = feature_direction(sae, strengths, maxes)
    record = {"hook": hook, "features": {str(f): s for f, s in strengths.items()},
              "max_act": {str(f): maxes[f] for f in strengths}}
    return direction, record, hook


def _concept_strengths(arg: str, sae):
    """(the concept file, {feature: strength} — or {None: strength} for a vector dial) of ``--concept FILE[=S]``;
    a dial that is no constant vector is refused, saying why."""
    from saelab.conceptfile import load_concept, parse_concept_arg

    path, strength = parse_concept_arg(arg)
    concept = load_concept(path, sae)
    strength = concept.strength if strength is None else strength
    constant = concept.mode in ("add", "vector") and concept.unit != "norm"   # a vector dial in "max" is its raw multiple
    if not constant:
        raise ValueError(f"--concept {path}: its dial is {concept.mode} in × {concept.unit} units, which is not one "
                         "constant vector; a llama.cpp control vector can carry an add dial in × max activation "
                         "(--feature ID=STRENGTH) or a raw direction (--direction), nothing that depends on the "
                         "position (clamp, ablate, × residual norm)")
    if concept.mode == "vector":
        return concept, {None: strength}
    return concept, {f: strength for f in concept.features}


def _direction_file(args, sae):
    import math

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not math.isfinite(args.scale):
        raise ValueError(f"--scale {args.scale}: must be a finite number")
    try:
        tensors = load_file(args.direction)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"--direction {args.direction}: not a readable safetensors file ({e})") from None
    vec = tensors.get("direction")
    if vec is None or vec.ndim != 1 or vec.shape[0] != sae.cfg.d_in:
        shape = None if vec is None else list(vec.shape)
        raise ValueError(f"--direction {args.direction}: needs a tensor 'direction' of shape [{sae.cfg.d_in}] (the "
                         f"SAE's d_in); found {shape if shape else 'none'} among {sorted(tensors)}")
    return vec.float() * args.scale


def _features_db(args, sae):
    from saelab.featuredb import FeatureDB

    path = Path(args.features_db) if args.features_db else Path(args.db).resolve().parent / "features.db"
    if not (args.features_db or path.is_file()):
        return None
    db = FeatureDB.open(path)
    db.check_sae(sae, args.db)  # another SAE's max activations would give the wrong strengths
    return db


def _target(args, sae, hook):
    """(llama.cpp layer, model hint, the model's GGUF file when it is one)."""
    from saelab.controlvector import llamacpp_layer, model_hint
    from saelab.models import smollm2_gguf
    from saelab.provenance import Provenance

    name = Provenance.of(sae).model_name
    hint = args.model_hint or model_hint(name)
    if not hint:
        raise ValueError(f"{args.db}: cannot tell the llama.cpp architecture of model {name!r}; pass --model-hint "
                         "(e.g. llama)")
    gguf_model = smollm2_gguf() if name == "smollm2" else (Path(name) if name and name.endswith(".gguf") else None)
    return llamacpp_layer(hook), hint, gguf_model
