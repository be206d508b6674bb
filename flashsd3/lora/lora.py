"""Public LoRA API on an MMDiT: load, scale, merge / unmerge, remove, inspect.

Two ways to run an adapter, one set of weights:
  * unmerged (default after `load_lora`): each adapted layer adds s * B(A(x)) on its output rows;
    scales change for free (`set_lora_scale`), several adapters stack.
  * merged (`merge_lora`): W += s * B @ A once, computed in float32 (float64 for float64 weights)
    and rounded once to the weight's dtype; the forward is then the plain one (the layers only skip
    merged adapters).
`unmerge_lora` subtracts the same delta (no copy of the base weights is kept: at 2B parameters a copy
costs as much as the model). Exact in real arithmetic; in floating point each element comes back
within one rounding of the merge and one of the unmerge: |W_restored - W| <= eps * max(|W|, |W_merged|)
(eps of the weight dtype; tests/test_lora.py checks this for float16, bfloat16, float32, float64).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .formats import LoRAError, open_lora, plan_lora, read_piece
from .layers import LoRALayer, LoRAUpdate, wrap


@dataclass(frozen=True)
class LoRAInfo:
    name: str
    scale: float  # the user's scale (alpha / r is per layer, inside the updates)
    merged: bool
    layers: int  # our layers it adapts (q, k and v share one qkv layer)
    updates: int  # LoRA modules of the file
    params: int  # values in A and B (and bias differences)


def load_lora(model: nn.Module, source: str | Path, *, scale: float = 1.0, name: str | None = None) -> str:
    """Add the adapter at `source` (folder, .safetensors file or Hub repo id) unmerged; returns its name.

    The effective scale of each module is `scale` * alpha / r as the file defines it (see formats.py).
    Nothing is changed if any key, shape or config problem is found.
    """
    src = open_lora(source)
    name = _new_name(model, name, src.label)
    pieces = plan_lora(model, src)
    by_layer: dict[str, list[LoRAUpdate]] = {}
    biases: dict[str, torch.Tensor] = {}
    for piece in pieces:  # read everything before touching the model
        layer = model.get_submodule(piece.target.module)
        A, B, bias = read_piece(src.reader, piece, layer, dtype=layer.weight.dtype, device=layer.weight.device)
        updates = by_layer.setdefault(piece.target.module, [])
        if A is not None:
            updates.append(LoRAUpdate(A, B, piece.target.start, piece.target.stop, piece.scale))
        if bias is not None:
            biases[piece.target.module] = bias
    for module, updates in by_layer.items():
        _lora_layer(model, module).add_adapter(name, updates, scale, biases.get(module))
    return name


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """Change an unmerged adapter's user scale (0 switches it off)."""
    for layer in _layers_with(model, name):
        if name in layer.lora_merged:
            raise LoRAError(f"adapter {name!r} is merged into the weights; unmerge_lora it before rescaling")
    for layer in _layers_with(model, name):
        layer.lora_scale[name] = scale


def merge_lora(model: nn.Module, names: list[str] | None = None, *, discard: bool = False) -> None:
    """Fold adapters (default: all loaded, not yet merged) into the base weights at their scales.

    discard=True then forgets them (A and B freed, layers plain again): the merged weights stay, but
    they can no longer be unmerged or rescaled. For inference-only use (the Flash adapter's A and B
    are 87.6M values).
    """
    names = _names(model, names)
    for name in names:
        for layer in _layers_with(model, name):
            if name not in layer.lora_merged:
                layer.merge(name)
    if discard:
        for module, layer in list(_lora_layers(model).items()):
            for name in names:
                if name in layer.lora:
                    layer.forget_adapter(name)
            if not layer.lora:
                _replace(model, module, layer.plain())


def unmerge_lora(model: nn.Module, names: list[str] | None = None) -> None:
    """Subtract merged adapters (default: all) again; see the module docstring for the rounding bound."""
    for name in _names(model, names):
        for layer in _layers_with(model, name):
            if name in layer.lora_merged:
                layer.unmerge(name)


def remove_lora(model: nn.Module, name: str) -> None:
    """Drop an adapter (unmerging it first); layers left without adapters become plain layers again."""
    _layers_with(model, name)  # raises if unknown
    for module, layer in list(_lora_layers(model).items()):
        if name in layer.lora:
            layer.remove_adapter(name)
            if not layer.lora:
                _replace(model, module, layer.plain())


def lora_info(model: nn.Module) -> dict[str, LoRAInfo]:
    """Loaded adapters by name."""
    found: dict[str, list] = {}
    for layer in _lora_layers(model).values():
        for name, updates in layer.lora.items():
            entry = found.setdefault(name, [layer.lora_scale[name], name in layer.lora_merged, 0, 0, 0])
            entry[2] += 1
            entry[3] += len(updates)
            entry[4] += sum(u.A.numel() + u.B.numel() for u in updates)
            entry[4] += layer.lora_bias[name].diff.numel() if name in layer.lora_bias else 0
    return {name: LoRAInfo(name, *entry) for name, entry in found.items()}


# Helpers -----------------------------------------------------------------------------------------

def _lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def _lora_layer(model: nn.Module, module: str) -> LoRALayer:
    layer = model.get_submodule(module)
    if not isinstance(layer, LoRALayer):
        layer = wrap(layer)
        _replace(model, module, layer)
    return layer


def _replace(model: nn.Module, module: str, new: nn.Module) -> None:
    parent, _, child = module.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _layers_with(model: nn.Module, name: str) -> list[LoRALayer]:
    layers = [layer for layer in _lora_layers(model).values() if name in layer.lora]
    if not layers:
        raise LoRAError(f"no adapter named {name!r}; loaded: {sorted(lora_info(model))}")
    return layers


def _names(model: nn.Module, names: list[str] | None) -> list[str]:
    loaded = sorted(lora_info(model))
    if names is None:
        return loaded
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise LoRAError(f"no adapters named {unknown}; loaded: {loaded}")
    return list(names)


def _new_name(model: nn.Module, name: str | None, label: str) -> str:
    """The user's name, or the source's folder / file name with non-word characters as '_'.
    Names key nn.ModuleDicts, so they cannot be empty or contain '.'."""
    if name is None:
        name = re.sub(r"\W", "_", label)
    if not name or "." in name:
        raise LoRAError(f"invalid adapter name {name!r}: it must be non-empty and contain no '.'")
    if name in lora_info(model):
        raise LoRAError(f"an adapter named {name!r} is already loaded: either the same LoRA is given twice (give it "
                        "once, with the sum of the scales) or two LoRAs share a file name (rename one; from Python, "
                        "load_lora(..., name='other') also works)")
    return name
