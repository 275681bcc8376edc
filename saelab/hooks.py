"""Hook points: canonical TransformerLens names ↔ HF modules, and contexts to capture or intervene.

Canonical names (per layer L): ``blocks.L.hook_resid_pre`` (input of block L), ``hook_resid_mid``
(between attention and MLP), ``hook_resid_post`` (output of block L), ``hook_attn_out``,
``hook_mlp_out``, and ``blocks.L.mlp.hook_post`` (MLP neurons: the input of the down projection).
Each resolves, per architecture family, to a module and whether its *input* or *output* is meant.
A raw module path is accepted too: ``model.layers.3`` (its output) or ``model.layers.3:input``.

``capture`` records activations during a forward pass; ``intervene`` replaces them by ``f(act)``.
Both remove their hooks on exit, also when the forward pass raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from saelab.hook_table import CANONICAL, IO, LAYER_LISTS, family_name, family_table

@dataclass(frozen=True)
class HookPoint:
    """A resolved hook: which module, and whether its input or its output is the activation."""

    name: str
    """The name the user gave (canonical or raw module path)."""
    module_path: str
    """Dotted path of the HF module inside the model."""
    io: IO
    """``input``: the module's first input; ``output``: its (first) output."""
    layer: int | None
    """Block index for canonical names, None for raw paths."""

    @property
    def hf_hook_name(self) -> str:
        return self.module_path if self.io == "output" else f"{self.module_path}:input"


class HookError(ValueError):
    """A hook name that does not exist in this model."""


def as_module(model) -> nn.Module:
    """Accept an ``nn.Module`` or a :class:`saelab.models.LoadedModel` (which wraps one)."""
    return model if isinstance(model, nn.Module) else model.model


def family_of(model: nn.Module) -> str | None:
    return family_name(getattr(getattr(model, "config", None), "model_type", None))


def layer_list_path(model: nn.Module) -> str:
    for path in LAYER_LISTS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return path
    raise HookError(f"cannot find the list of blocks in this {type(model).__name__}; use raw module paths")


def _family_table(model: nn.Module) -> dict[str, tuple[str, IO]]:
    cfg = getattr(model, "config", None)
    return family_table(getattr(cfg, "model_type", None), getattr(cfg, "use_parallel_residual", True))


def hook_names(model: nn.Module) -> list[str]:
    """Every canonical hook name valid for this model, block by block."""
    model = as_module(model)
    prefix = layer_list_path(model)
    layers = model.get_submodule(prefix)
    names = []
    for layer_idx, block in enumerate(layers):
        for suffix, (rel, _io) in _family_table(model).items():
            if not rel or _has_submodule(block, rel):
                names.append(f"blocks.{layer_idx}.{suffix}")
    return names


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def resolve(model: nn.Module, name: str) -> HookPoint:
    """Resolve a canonical name or raw module path to a :class:`HookPoint`; unknown names fail clearly."""
    model = as_module(model)
    m = CANONICAL.match(name)
    if m:
        layer, suffix = int(m.group(1)), m.group(2)
        valid = hook_names(model)
        if name not in valid:
            raise HookError(f"hook {name!r} does not exist in this {type(model).__name__}. "
                            f"Valid hooks: {', '.join(valid)}")
        rel, io = _family_table(model)[suffix]
        path = f"{layer_list_path(model)}.{layer}" + (f".{rel}" if rel else "")
        return HookPoint(name, path, io, layer)
    path, _, io = name.partition(":")
    io = io or "output"
    if io not in ("input", "output") or not path or not _has_submodule(model, path):
        raise HookError(f"unknown hook {name!r} for this {type(model).__name__}. Valid hooks: "
                        f"{', '.join(hook_names(model))} (or a module path such as "
                        f"'{layer_list_path(model)}.0', optionally with ':input')")
    return HookPoint(name, path, io, None)


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


class _StopForward(Exception):
    """Raised inside a hook to skip the rest of the forward pass once everything is captured."""


@contextmanager
def capture(model: nn.Module, names: list[str] | str, stop_early: bool = False,
            detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record activations at hooks: ``with capture(model, [...]) as acts: model(ids)``.

    ``acts[name]`` is ``[batch, seq, d]`` after the forward. With ``stop_early`` the forward is
    aborted right after the last requested hook fired; call it through :func:`run_to_hooks`.
    """
    model = as_module(model)
    names = [names] if isinstance(names, str) else list(names)
    points = [resolve(model, n) for n in names]
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def record(point: HookPoint, value: torch.Tensor) -> None:
        acts[point.name] = value.detach() if detach else value
        if stop_early and len(acts) == len(points):
            raise _StopForward

    for point in points:
        mod = model.get_submodule(point.module_path)
        if point.io == "output":
            handles.append(mod.register_forward_hook(lambda m, a, out, p=point: record(p, _first(out))))
        else:
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, kwargs, p=point: record(p, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_to_hooks(model: nn.Module, input_ids: torch.Tensor, names: list[str] | str,
                 attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Forward ``input_ids [batch, seq]`` only as far as the last requested hook; return the activations."""
    model = as_module(model)
    with capture(model, names, stop_early=True) as acts:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return acts


@contextmanager
def intervene(model: nn.Module, edits: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Replace the activation at each hook by ``f(activation)`` during forward passes in the block.

    ``f`` gets ``[batch, seq, d]`` and must return the same shape. Works with ``generate`` (each
    call sees the new positions only when the KV cache is on).
    """
    model = as_module(model)
    handles = []
    for name, fn in edits.items():
        point = resolve(model, name)
        mod = model.get_submodule(point.module_path)
        if point.io == "output":
            handles.append(mod.register_forward_hook(lambda m, a, out, f=fn: _replace_output(out, f)))
        else:
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, kwargs, f=fn: _replace_input(args, kwargs, f), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _checked(fn, value: torch.Tensor) -> torch.Tensor:
    new = fn(value)
    if new.shape != value.shape:
        raise ValueError(f"an intervention returned shape {tuple(new.shape)}, expected {tuple(value.shape)}")
    return new.to(value.dtype)


def _replace_output(out, fn):
    if isinstance(out, tuple):
        return (_checked(fn, out[0]), *out[1:])
    return _checked(fn, out)


def _replace_input(args, kwargs, fn):
    if args:
        return (_checked(fn, args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": _checked(fn, kwargs["hidden_states"])}


@torch.no_grad()
def hook_shapes(model: nn.Module, names: list[str] | None = None) -> dict[str, int]:
    """Width of the activation at each hook, found by one forward pass on 4 tokens."""
    model = as_module(model)
    names = names or hook_names(model)
    ids = torch.ones(1, 4, dtype=torch.long, device=next(model.parameters()).device)
    with capture(model, names) as acts:
        model(input_ids=ids)
    return {n: int(acts[n].shape[-1]) for n in names}


class PrefixReplay:
    """Run the blocks below a hook once per batch, then replay their outputs in later forwards.

    Evaluation runs the same batch several times (clean, spliced, ablated) and only what comes
    after the hook differs. ``record()`` stores the outputs of every block that lies wholly before
    the hook during the first forward; inside ``replay()`` those blocks return their stored outputs
    without computing anything (their forward hooks still run). For ``blocks.L.hook_resid_post``
    block L itself is replayed too: the hook edits its output after the replayed forward. Raw module
    paths replay nothing. The stored outputs belong to one batch: record again for the next.
    """

    def __init__(self, model: nn.Module, hook: str):
        model = as_module(model)
        point = resolve(model, hook)
        n = 0
        if point.layer is not None:
            block_path = f"{layer_list_path(model)}.{point.layer}"
            n = point.layer + (1 if point.module_path == block_path and point.io == "output" else 0)
        self.blocks = list(model.get_submodule(layer_list_path(model)))[:n] if n else []
        self.outputs: list = []

    @contextmanager
    def record(self) -> Iterator[None]:
        self.outputs = [None] * len(self.blocks)

        def keep(i: int, out) -> None:
            self.outputs[i] = out

        handles = [b.register_forward_hook(lambda m, a, out, i=i: keep(i, out)) for i, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replay(self) -> Iterator[None]:
        if any(out is None for out in self.outputs):
            raise RuntimeError("PrefixReplay.replay() before a complete record() of this batch")
        for block, out in zip(self.blocks, self.outputs):
            block.forward = lambda *args, _out=out, **kwargs: _out   # an instance attribute shadows the method
        try:
            yield
        finally:
            for block in self.blocks:
                del block.forward


FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
               "model.decoder.final_layer_norm", "norm", "ln_f")


def final_norm(model) -> nn.Module | None:
    """The norm between the last block and the unembedding (None for models without one)."""
    model = as_module(model)
    for path in FINAL_NORMS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    return None
