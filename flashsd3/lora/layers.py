"""LoRA layers: nn.Linear / nn.Conv2d subclasses that keep `.weight` and `.bias` where they were.

LoRA (Hu et al., arXiv 2106.09685): y = W x + b + s * B (A x), rank r = A.shape[0], s = alpha / r. An adapter
may also change the bias (ComfyUI's `.diff_b`): + user scale * diff, a `BiasUpdate`.
Each adapter contributes one or more `LoRAUpdate`s; an update changes only its own output rows, so
diffusers' separate to_q / to_k / to_v adapters land on their thirds of our fused `qkv`.

The layer replaces the plain one in the model and shares its Parameter objects, so state_dict keys
(`...attn.qkv.weight`) and strict loading are unchanged; A and B of an adapter loaded from a file
are non-persistent buffers: they follow `.to()` but never appear in a state dict. Trainable adapters
(`add_lora`, lora/train.py) hold fp32 nn.Parameters, cast to the activations' dtype in forward.
Same idea as flux's `LinearLora` (subclass of nn.Linear); peft instead wraps the layer and moves
the weight to `base_layer.weight`.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRAUpdate(nn.Module):
    """One adapter's low-rank update of output rows [start, stop): scale * B @ A."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, start: int, stop: int, scale: float):
        super().__init__()
        if isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter):  # trainable (lora/train.py add_lora)
            self.A, self.B = A, B
        else:  # loaded from a file: follows .to(), never in a state dict
            self.register_buffer("A", A, persistent=False)  # (r, in) or conv (r, in, kh, kw)
            self.register_buffer("B", B, persistent=False)  # (stop - start, r) or conv (stop - start, r, 1, 1)
        self.start, self.stop = start, stop
        self.scale = scale  # alpha / r from the file's config; the user's scale is kept by the layer

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """scale * B @ A shaped like the layer's weight rows [start, stop), computed in `dtype`.

        For a conv, A is a k x k conv and B a 1x1 conv, so their product is B[:, :, 0, 0] @ A.flatten(1).
        """
        delta = self.B.flatten(1).to(dtype) @ self.A.flatten(1).to(dtype)  # (rows, in * kh * kw)
        return (self.scale * delta).view(self.stop - self.start, *self.A.shape[1:])

    def extra_repr(self) -> str:
        return f"rows={self.start}:{self.stop}, rank={self.rank}, scale={self.scale:g}"


class BiasUpdate(nn.Module):
    """One adapter's change of the layer's bias (ComfyUI's `.diff_b`): bias + user scale * diff."""

    def __init__(self, diff: torch.Tensor):
        super().__init__()
        self.register_buffer("diff", diff, persistent=False)  # (out,)


class LoRALayer:
    """Adapter bookkeeping shared by LoRALinear and LoRAConv2d (mixin over the nn layer)."""

    lora: nn.ModuleDict  # adapter name -> ModuleList[LoRAUpdate]
    lora_bias: nn.ModuleDict  # adapter name -> BiasUpdate, for adapters that also change the bias
    lora_scale: dict[str, float]  # adapter name -> user scale
    lora_merged: dict[str, float]  # adapter name -> user scale that was folded into .weight (and .bias)

    def _init_lora(self) -> None:
        self.lora, self.lora_bias = nn.ModuleDict(), nn.ModuleDict()
        self.lora_scale, self.lora_merged = {}, {}

    def add_adapter(self, name: str, updates: list[LoRAUpdate], scale: float,
                    bias: torch.Tensor | None = None) -> None:
        self.lora[name] = nn.ModuleList(updates)
        if bias is not None:
            self.lora_bias[name] = BiasUpdate(bias)
        self.lora_scale[name] = scale

    def active_updates(self) -> Iterator[tuple[LoRAUpdate, float]]:
        """(update, total scale) for every adapter that is neither merged nor scaled to zero."""
        for name, updates in self.lora.items():
            user = self.lora_scale[name]
            if name in self.lora_merged or user == 0:
                continue
            for update in updates:
                yield update, user * update.scale

    def active_bias(self) -> Iterator[tuple[torch.Tensor, float]]:
        """(bias difference, user scale) for every adapter that changes the bias, is not merged nor off."""
        for name, update in self.lora_bias.items():
            user = self.lora_scale[name]
            if name not in self.lora_merged and user != 0:
                yield update.diff, user

    def merge(self, name: str) -> None:
        """weight += user_scale * delta of adapter `name`; the forward then skips it."""
        self._add_to_weight(name, self.lora_scale[name])
        self.lora_merged[name] = self.lora_scale[name]

    def unmerge(self, name: str) -> None:
        """weight -= the delta `merge` added (at the scale it used)."""
        self._add_to_weight(name, -self.lora_merged.pop(name))

    @torch.no_grad()
    def _add_to_weight(self, name: str, scale: float) -> None:
        """weight[rows] += scale * delta, added in float32 (float64 for float64 weights), then
        rounded once to the weight's dtype."""
        for update in self.lora[name]:
            rows = self.weight[update.start : update.stop]
            compute = torch.promote_types(rows.dtype, torch.float32)
            rows.copy_((rows.to(compute) + scale * update.delta_weight(compute)).to(rows.dtype))
        if name in self.lora_bias:
            compute = torch.promote_types(self.bias.dtype, torch.float32)
            diff = self.lora_bias[name].diff.to(compute)
            self.bias.copy_((self.bias.to(compute) + scale * diff).to(self.bias.dtype))

    def remove_adapter(self, name: str) -> None:
        if name in self.lora_merged:
            self.unmerge(name)
        self.forget_adapter(name)

    def forget_adapter(self, name: str) -> None:
        """Drop the adapter's A, B and scale; a merged delta stays in the weight."""
        del self.lora[name], self.lora_scale[name]
        if name in self.lora_bias:
            del self.lora_bias[name]
        self.lora_merged.pop(name, None)


class LoRALinear(LoRALayer, nn.Linear):
    """nn.Linear plus unmerged LoRA updates; same parameters, same state dict."""

    def __init__(self, base: nn.Linear):
        nn.Linear.__init__(self, base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # shared, not copied
        self.train(base.training)
        self._init_lora()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., out)
        for update, s in self.active_updates():
            A, B = update.A.to(x.dtype), update.B.to(x.dtype)  # fp32 trainable adapters on a bf16 model
            out[..., update.start : update.stop].add_(F.linear(F.linear(x, A), B), alpha=s)
        for diff, s in self.active_bias():
            out.add_(diff.to(out.dtype), alpha=s)
        return out

    def plain(self) -> nn.Linear:
        """A plain nn.Linear sharing this layer's parameters (for when the last adapter is removed)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight, layer.bias = self.weight, self.bias
        return layer.train(self.training)


class LoRAConv2d(LoRALayer, nn.Conv2d):
    """nn.Conv2d plus unmerged LoRA updates (A: conv with the layer's kernel/stride, B: 1x1 conv, as peft)."""

    def __init__(self, base: nn.Conv2d):
        if base.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions is not supported (groups={base.groups})")
        nn.Conv2d.__init__(self, **_conv_args(base), device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.train(base.training)
        self._init_lora()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)  # (B, out, h, w)
        for update, s in self.active_updates():
            h = self._conv_forward(x, update.A.to(x.dtype), None)  # (B, r, h, w): same kernel, stride and padding
            out[:, update.start : update.stop].add_(F.conv2d(h, update.B.to(x.dtype)), alpha=s)
        for diff, s in self.active_bias():
            out.add_(diff.to(out.dtype)[:, None, None], alpha=s)  # (out, 1, 1) over (B, out, h, w)
        return out

    def plain(self) -> nn.Conv2d:
        layer = nn.Conv2d(**_conv_args(self), device="meta")
        layer.weight, layer.bias = self.weight, self.bias
        return layer.train(self.training)


def _conv_args(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode)


def wrap(layer: nn.Module) -> LoRALayer:
    """The LoRA version of a plain Linear / Conv2d (returned as is if it already is one)."""
    if isinstance(layer, LoRALayer):
        return layer
    if isinstance(layer, nn.Linear):
        return LoRALinear(layer)
    if isinstance(layer, nn.Conv2d):
        return LoRAConv2d(layer)
    raise TypeError(f"LoRA supports nn.Linear and nn.Conv2d, not {type(layer).__name__}")
