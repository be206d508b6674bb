"""Activation checkpointing of the MMDiT, applied from outside the model (as torchtitan's
`activation_checkpoint.py` wraps each block): each joint block keeps only its inputs while the graph is built
and is recomputed in backward (`torch.utils.checkpoint`, non-reentrant), trading one more forward of the block
for its activation memory. The model file stays the model: `MMDiT.forward` calls its blocks as always.

The recomputation runs during backward, after a `lora_scaled` / `lora_disabled` context of the forward pass may
have ended (a distillation teacher call, a scale sweep): it runs under the LoRA scales the block had in its
forward pass (`same_lora_scales`), so checkpointed and plain runs give the same gradients, bitwise.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import LoRALayer

_CLASSES: dict[type, type] = {}  # block class -> its checkpointed subclass


def checkpoint_blocks(model: nn.Module, enabled: bool = True) -> None:
    """Recompute each of `model.joint_blocks` in backward (enabled), or stop doing so. Parameter names, the
    state dict and `copy.deepcopy` are unchanged: each block becomes an instance of a subclass of its own class
    whose forward checkpoints the original forward while gradients are being recorded."""
    for block in model.joint_blocks:
        plain = getattr(type(block), "_plain", type(block))
        block.__class__ = _checkpointed(plain) if enabled else plain


def _checkpointed(cls: type) -> type:
    if cls not in _CLASSES:
        def forward(self, *args):
            run = super(sub, self).forward
            if not torch.is_grad_enabled():  # sampling, a teacher call under no_grad: nothing to keep
                return run(*args)
            return checkpoint(run, *args, use_reentrant=False, context_fn=partial(same_lora_scales, self))

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "_plain": cls})
        _CLASSES[cls] = sub
    return _CLASSES[cls]


def same_lora_scales(block: nn.Module):
    """checkpoint's context_fn: (forward context, recompute context), the latter re-applying the LoRA scales
    the block's LoRA layers (lora/layers.py) had when the forward ran, and restoring the current ones after."""
    layers = [m for m in block.modules() if isinstance(m, LoRALayer)]
    scales = [dict(m.lora_scale) for m in layers]

    @contextmanager
    def recompute():
        now = [dict(m.lora_scale) for m in layers]
        for m, s in zip(layers, scales, strict=True):
            m.lora_scale.update(s)
        try:
            yield
        finally:
            for m, s in zip(layers, now, strict=True):
                m.lora_scale.clear()
                m.lora_scale.update(s)

    return nullcontext(), recompute()
