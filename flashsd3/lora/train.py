"""Trainable LoRA adapters: create them, list their parameters, switch them off or rescale them for a call.

`add_lora` makes the adapters peft makes for the same `LoraConfig` on diffusers' SD3Transformer2DModel
(peft 0.21.2 `tuners/lora/layer.py` reset_lora_parameters): A ~ kaiming_uniform(a=sqrt(5)), B = 0, so
the model is unchanged at step 0; scale alpha / r. Adapters follow diffusers' module granularity, so
q, k and v get three adapters on their thirds of our fused `qkv`, as in a peft file. A and B are
nn.Parameters (in the model's state dict, under `<layer>.lora.<name>.<i>.A`) in the wider of float32 and
the base weight's dtype, as peft makes them (`tuners/tuners_utils.py`: `_move_adapter_to_device_of_base_layer`
gives them the base weight's dtype, `cast_adapter_dtype` lifts float16/bfloat16 to float32; a float64 base
trains float64 adapters); every other parameter of the model is frozen. The forward casts A and B to the
activations' dtype (lora/layers.py), so a bf16 base trains fp32 adapters the way autocast would.

A distillation teacher is the same module with its adapters off (`lora_disabled`), no weight copied.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ..config import FLASH_SD3_ADAPTER
from .formats import LoRAError, LoRASource, open_lora, peft_selects, plan_lora, read_piece
from .keys import Target, diffusers_targets, original_targets
from .layers import LoRALayer, LoRAUpdate
from .lora import _lora_layer, _lora_layers, _names, _new_name, lora_info

# target_modules of the published jasperai/flash-sd3 adapter_config.json, in its order: 222 modules at
# SD3-medium size, the patch-embedding Conv2d included (the one copy lives in config.FLASH_SD3_ADAPTER).
FLASH_SD3_TARGETS = FLASH_SD3_ADAPTER.target_modules


def add_lora(model: nn.Module, *, rank: int, alpha: float, targets: str | Sequence[str] = "flash-sd3",
             name: str = "default", dtype: torch.dtype | None = None,
             generator: torch.Generator | None = None) -> str:
    """Add a trainable adapter (A random, B = 0, scale alpha / rank); freeze every non-adapter parameter.

    targets: "flash-sd3" (the published adapter's 222 modules), "all-linear" (every Linear; q/k/v as
    three adapters), or module names in our naming ("joint_blocks.0.x_block.attn.qkv") or diffusers'
    ("transformer_blocks.0.attn.to_q"); as in peft, a name also selects every module whose name ends
    in "." + name ("attn.qkv" = all blocks' qkv). Returns the adapter's name.

    Call it after loading the base weights: A and B join the model's state dict (`<layer>.lora.<name>.<i>.A`),
    so a base checkpoint no longer loads strictly into the adapted model; `lora_state_dict` / `save_lora`
    hold the adapter alone. dtype: of A and B (default: the wider of float32 and each base weight's dtype).
    `generator`: a CPU generator A is drawn from (on the CPU, then moved to the layer's device, so the same
    seed gives the same adapters on any device); None draws from the global generator of the layer's device.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"add_lora: rank must be a positive int, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise LoRAError(f"add_lora: alpha must be a finite number, got {alpha!r}")
    name = _new_name(model, name, name)
    selected = select_targets(model, targets)
    for module, group in _by_module(selected).items():
        layer = _lora_layer(model, module)
        updates = [_new_update(layer, t, rank, alpha / rank, dtype, generator) for t in group]
        layer.add_adapter(name, updates, 1.0)
    freeze_base(model)
    return name


def select_targets(model: nn.Module, targets: str | Sequence[str]) -> dict[str, Target]:
    """Module name (diffusers naming where the layer has one, else ours) -> Target, for add_lora's `targets`."""
    diffusers = diffusers_targets(model)
    if targets == "flash-sd3":
        return {n: t for n, t in diffusers.items() if peft_selects({"target_modules": list(FLASH_SD3_TARGETS)}, n)}
    if targets == "all-linear":
        return {n: t for n, t in diffusers.items() if isinstance(model.get_submodule(t.module), nn.Linear)}
    if isinstance(targets, str) or not targets:
        raise LoRAError(f"add_lora: targets must be 'flash-sd3', 'all-linear' or a non-empty list of module names, "
                        f"got {targets!r}")
    ours = original_targets(model)
    selected: dict[str, Target] = {}
    for entry in targets:
        hits = [{n: t for n, t in naming.items() if peft_selects({"target_modules": [entry]}, n)}
                for naming in (ours, diffusers)]
        if hits[0] and hits[1] and set(hits[0].values()) != set(hits[1].values()):  # same layers: no matter
            raise LoRAError(f"add_lora: target {entry!r} is ambiguous: it names our {sorted(hits[0])[:3]} and "
                            f"diffusers' {sorted(hits[1])[:3]}; write more of the module path")
        if not (hits[0] or hits[1]):
            raise LoRAError(f"add_lora: target {entry!r} selects no Linear / Conv2d of this model (our names: "
                            "joint_blocks.{i}.x_block.attn.qkv, ...; diffusers names: "
                            "transformer_blocks.{i}.attn.to_q, ...)")
        selected.update(hits[1] or hits[0])
    _refuse_overlaps(selected)
    return selected


def _refuse_overlaps(selected: dict[str, Target]) -> None:
    for module in _by_module(selected):
        rows = sorted((t.start, t.stop, n) for n, t in selected.items() if t.module == module)
        for (_, stop, a), (start, _, b) in itertools.pairwise(rows):
            if start < stop:
                raise LoRAError(f"add_lora: targets {a!r} and {b!r} adapt the same rows of our {module}; pick one")


def _by_module(selected: dict[str, Target]) -> dict[str, list[Target]]:
    """Targets grouped by our module, in model order (the order of diffusers_targets / named_modules)."""
    out: dict[str, list[Target]] = {}
    for target in selected.values():
        out.setdefault(target.module, []).append(target)
    return {m: sorted(ts, key=lambda t: t.start) for m, ts in out.items()}


def _new_update(layer: nn.Module, target: Target, rank: int, scale: float, dtype: torch.dtype,
                generator: torch.Generator | None) -> LoRAUpdate:
    """peft's init: A kaiming-uniform with a = sqrt(5) (bound 1 / sqrt(fan_in)), B zeros. A conv gets a
    conv A with the layer's kernel and a 1x1 conv B."""
    rows, device = target.stop - target.start, layer.weight.device
    dtype = dtype or torch.promote_types(layer.weight.dtype, torch.float32)
    if isinstance(layer, nn.Conv2d):
        a_shape, b_shape = (rank, layer.in_channels, *layer.kernel_size), (rows, rank, 1, 1)
    else:
        a_shape, b_shape = (rank, layer.in_features), (rows, rank)
    draw_on = device if generator is None or device.type == "meta" else generator.device
    A = torch.empty(a_shape, device=draw_on, dtype=dtype)
    if not A.is_meta:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    A = A.to(device)
    B = torch.zeros(b_shape, device=device, dtype=dtype)  # rows in our order (for swapped targets too)
    return LoRAUpdate(nn.Parameter(A), nn.Parameter(B), target.start, target.stop, scale)


def our_rows(target: Target, B: torch.Tensor) -> torch.Tensor:
    """A file layer's LoRA B with its rows in our order: (scale, shift) -> (shift, scale) where the key table
    swaps halves (diffusers `AdaLayerNormContinuous` vs mmditx.py). Its own inverse, so save.py also uses it
    for ours -> file."""
    return target.rows.to_our_rows(B)


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on every parameter that is not a trainable adapter's A or B."""
    adapter = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        if id(p) not in adapter:
            p.requires_grad_(False)


def named_lora_parameters(model: nn.Module, name: str | None = None) -> list[tuple[str, nn.Parameter]]:
    """(state-dict name, parameter) of trainable adapters (all, or adapter `name`), in model order."""
    if name is not None and name not in lora_info(model):
        raise LoRAError(f"no adapter named {name!r}; loaded: {sorted(lora_info(model))}")
    out = []
    for module, layer in _lora_layers(model).items():
        for adapter, updates in layer.lora.items():
            if name is not None and adapter != name:
                continue
            for i, update in enumerate(updates):
                out += [(f"{module}.lora.{adapter}.{i}.{ab}", p) for ab, p in (("A", update.A), ("B", update.B))
                        if isinstance(p, nn.Parameter)]
    if name is not None and not out:
        raise LoRAError(f"adapter {name!r} is not trainable (loaded from a file); use make_trainable first")
    return out


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The trainable A and B (all adapters, or adapter `name`), in a deterministic order: layers in
    model order, then adapters, then updates, A before B. Give these to the optimiser."""
    return [p for _, p in named_lora_parameters(model, name)]


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Exact copies of adapter `name`'s trainable A and B, keyed as in the model's state dict."""
    return {k: p.detach().clone() for k, p in named_lora_parameters(model, name)}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str = "default") -> None:
    """Copy a `lora_state_dict` back into the adapter created with the same add_lora arguments."""
    params = dict(named_lora_parameters(model, name))
    missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    bad = [f"{k}: {list(state[k].shape)} vs {list(p.shape)}" for k, p in params.items()
           if k in state and state[k].shape != p.shape]
    if missing or extra or bad:
        raise LoRAError(f"adapter {name!r} state does not fit: missing {missing[:5]}, unexpected {extra[:5]}, "
                        f"shape mismatches {bad[:5]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


def make_trainable(model: nn.Module, name: str, dtype: torch.dtype = torch.float32) -> None:
    """Turn a loaded adapter's A and B (buffers in the weight dtype) into trainable `dtype` Parameters.
    For an adapter whose file holds more precision than the weights, prefer `load_trainable_lora`."""
    if lora_info(model).get(name) is None or lora_info(model)[name].merged:
        raise LoRAError(f"make_trainable: no unmerged adapter named {name!r}; loaded: {sorted(lora_info(model))}")
    for layer in _lora_layers(model).values():
        for update in layer.lora[name] if name in layer.lora else ():  # an nn.ModuleDict has no .get
            A, B = update.A, update.B
            del update.A, update.B  # buffers out, parameters in
            update.A, update.B = nn.Parameter(A.detach().to(dtype)), nn.Parameter(B.detach().to(dtype))
    freeze_base(model)


def load_trainable_lora(model: nn.Module, source: str | Path | LoRASource, *, name: str | None = None,
                        dtype: torch.dtype | None = torch.float32, device: torch.device | str | None = None) -> str:
    """Add the LoRA file at `source` (any layout load_lora reads) as a trainable adapter: A and B as
    `dtype` Parameters (None: the file's dtype) on `device` (None: each layer's device). A bias difference
    (ComfyUI `.diff_b`) that is not all zero is refused: it is neither trained nor saved by save_lora."""
    src = open_lora(source)
    name = _new_name(model, name, src.label)
    by_layer: dict[str, list[LoRAUpdate]] = {}
    for piece in plan_lora(model, src):
        layer = model.get_submodule(piece.target.module)
        A, B, bias = read_piece(src.reader, piece, layer, dtype=dtype,
                                device=layer.weight.device if device is None else device)
        if bias is not None and bool(bias.any()):
            raise LoRAError(f"{src.reader.source_of(piece.bias_key)}: {piece.bias_key!r} changes the bias of our "
                            f"{piece.target.module}; load_lora applies such bias differences (ComfyUI), but they "
                            "cannot be trained or saved in the peft, diffusers or kohya layouts")
        if A is not None:  # an all-zero bias difference changes nothing: dropped
            update = LoRAUpdate(nn.Parameter(A), nn.Parameter(B), piece.target.start, piece.target.stop, piece.scale)
            by_layer.setdefault(piece.target.module, []).append(update)
    for module, updates in by_layer.items():
        _lora_layer(model, module).add_adapter(name, updates, 1.0)
    freeze_base(model)
    return name


# Running with adapters off or rescaled ---------------------------------------------------------------

@contextmanager
def lora_scaled(model: nn.Module, scale: float, names: list[str] | None = None) -> Iterator[None]:
    """Run with the user scale of adapters `names` (default: all) set to `scale`; restored on exit, also
    on an exception. Nothing is copied; under activation checkpointing the recomputation in backward
    uses the scales of the forward pass (lora/checkpointing.py), so the context may end before backward."""
    names = _names(model, names)
    layers = [layer for layer in _lora_layers(model).values() if any(n in layer.lora for n in names)]
    merged = sorted({n for layer in layers for n in names if n in layer.lora_merged})
    if merged:
        raise LoRAError(f"adapters {merged} are merged into the weights; unmerge_lora them to disable or rescale")
    saved = [(layer, n, layer.lora_scale[n]) for layer in layers for n in names if n in layer.lora]
    try:
        for layer, n, _ in saved:
            layer.lora_scale[n] = scale
        yield
    finally:
        for layer, n, old in saved:
            layer.lora_scale[n] = old


@contextmanager
def lora_disabled(model: nn.Module, names: list[str] | None = None) -> Iterator[None]:
    """Run the base model (adapters `names`, default all, switched off) for the duration: a distillation
    teacher is the student with its adapters off. A model without adapters runs unchanged."""
    with lora_scaled(model, 0.0, names):
        yield


def adapter_layers(model: nn.Module, name: str) -> list[tuple[str, LoRALayer]]:
    """(our module name, layer) of the layers adapter `name` adapts, in model order."""
    _names(model, [name])
    return [(m, layer) for m, layer in _lora_layers(model).items() if name in layer.lora]
