"""Which of our layers a LoRA module name refers to, derived from the MMDiT key table.

LoRA files name the *layer* they adapt, in one of two namings:
  * diffusers module paths (`transformer_blocks.0.attn.to_q`): PEFT, diffusers, OneTrainer files;
  * our (official Stability) names (`joint_blocks.0.x_block.attn.qkv`): kohya / sd-scripts files.
A `Target` says where such a layer lives in our model. Nothing here is a second key table: the
diffusers side is read off `keymaps.mmdit.diffusers_table`, whose weight rows already say how each
diffusers layer becomes ours; the rule's transform gives the rows (`row_slices`: to_k = rows D:2D of
the fused qkv) and their order (`to_our_rows`: (scale, shift) rows become (shift, scale), so a LoRA B
on such a layer is reordered the same way).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..keymaps.mmdit import diffusers_table
from ..keymaps.rules import Transform, as_is, plan_keys

LAYER_TYPES = (nn.Linear, nn.Conv2d)  # the layer kinds a LoRA can adapt


@dataclass(frozen=True)
class Target:
    """A LoRA'd layer as seen from our model: our module, its output rows, and row order."""

    module: str  # our module name, e.g. "joint_blocks.0.x_block.attn.qkv"
    start: int  # the file's layer is our output rows [start, stop)
    stop: int
    rows: Transform = as_is  # `rows.to_our_rows(B)` puts a LoRA B's rows in our order (swap_halves)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Our Linear / Conv2d layers by module name (LoRA-wrapped ones included: they subclass these)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)}


def original_targets(model: nn.Module) -> dict[str, Target]:
    """Official naming: every layer is its own target."""
    return {name: Target(name, 0, m.weight.shape[0]) for name, m in lora_layers(model).items()}


def diffusers_targets(model: nn.Module) -> dict[str, Target]:
    """Diffusers module path -> Target, for every diffusers layer that has a counterpart in ours."""
    layers = lora_layers(model)
    plan = plan_keys([f"{name}.weight" for name in layers], diffusers_table(model.config.depth))
    targets = {}
    for key, step in plan.items():
        ours = key.removesuffix(".weight")
        slices = step.transform.row_slices(layers[ours].weight.shape[0], len(step.sources))
        for source, rows in zip(step.sources, slices, strict=True):
            targets[source.removesuffix(".weight")] = Target(ours, rows.start, rows.stop, step.transform)
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
