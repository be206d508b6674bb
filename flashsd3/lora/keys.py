"""Which of our layers a LoRA module name refers to, derived from the MMDiT key table.

LoRA files name the *layer* they adapt, in one of two namings:
  * diffusers module paths (`transformer_blocks.0.attn.to_q`): PEFT, diffusers, OneTrainer files;
  * our (official Stability) names (`joint_blocks.0.x_block.attn.qkv`): kohya / sd-scripts files.
A `Target` says where such a layer lives in our model. Nothing here is a second key table: the
diffusers side is read off `keymaps.mmdit.diffusers_table`, whose weight rows already say how each
diffusers layer becomes ours ("cat0": k-th of n equal row blocks of a fused layer, e.g. to_k = rows
D:2D of qkv; "swap_halves": (scale, shift) rows stored as (shift, scale), so a LoRA B swaps halves too).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..keymaps.mmdit import diffusers_table
from ..weights import resolve

LAYER_TYPES = (nn.Linear, nn.Conv2d)  # the layer kinds a LoRA can adapt


@dataclass(frozen=True)
class Target:
    """A LoRA'd layer as seen from our model: our module, its output rows, and row order."""

    module: str  # our module name, e.g. "joint_blocks.0.x_block.attn.qkv"
    start: int  # the file's layer is our output rows [start, stop)
    stop: int
    swap: bool = False  # the file's layer has (scale, shift) rows, ours (shift, scale)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Our Linear / Conv2d layers by module name (LoRA-wrapped ones included: they subclass these)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)}


def original_targets(model: nn.Module) -> dict[str, Target]:
    """Official naming: every layer is its own target."""
    return {name: Target(name, 0, m.weight.shape[0]) for name, m in lora_layers(model).items()}


def diffusers_targets(model: nn.Module) -> dict[str, Target]:
    """Diffusers module path -> Target, for every diffusers layer that has a counterpart in ours."""
    layers = lora_layers(model)
    plan = resolve([f"{name}.weight" for name in layers], diffusers_table(model.config.depth))
    targets = {}
    for key, (sources, transform) in plan.items():
        ours = key.removesuffix(".weight")
        rows, n = layers[ours].weight.shape[0], len(sources)
        if transform not in (None, "cat0", "swap_halves"):
            raise ValueError(f"key table transform {transform!r} for {key} has no LoRA counterpart")
        for k, source in enumerate(sources):
            start, stop = (k * rows // n, (k + 1) * rows // n) if transform == "cat0" else (0, rows)
            targets[source.removesuffix(".weight")] = Target(ours, start, stop, swap=transform == "swap_halves")
    return targets


def underscored(targets: dict[str, Target]) -> dict[str, Target]:
    """The same targets under kohya-style names ('.' written as '_').

    Underscored names are ambiguous to split ("joint_blocks_0_x_block" has five '_'), so they are
    never parsed: each known name is written the kohya way and looked up as a whole.
    """
    out: dict[str, Target] = {}
    seen: dict[str, str] = {}
    for name, target in targets.items():
        key = name.replace(".", "_")
        if key in seen:
            raise ValueError(f"module names {name!r} and {seen[key]!r} collide when '.' is written '_'")
        out[key], seen[key] = target, name
    return out
