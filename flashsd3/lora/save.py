"""Write an adapter as a LoRA file, in the layouts formats.py reads: peft, diffusers, kohya.

  peft       folder with `adapter_model.safetensors` (`base_model.model.<diffusers path>.lora_A.weight`)
             + `adapter_config.json` (r, lora_alpha, target_modules): what `PeftModel.from_pretrained`
             loads onto diffusers' SD3Transformer2DModel, and the published jasperai/flash-sd3 layout.
  diffusers  `pytorch_lora_weights.safetensors` with `transformer.<diffusers path>` keys and the peft config
             in the `lora_adapter_metadata` header, as diffusers' `save_lora_weights` writes it.
  kohya      `lora_unet_<our name, '.' as '_'>.lora_down / .lora_up / .alpha` (sd-scripts lora_sd3, ComfyUI).
             These tools ignore adapter_config.json and take the scale from `.alpha` / rank, so every
             module gets its `.alpha` (the Flash adapter's 8 / 64 would otherwise run at 1.0, 8x too
             strong). One module per our layer: q, k and v adapters become one qkv LoRA (A stacked,
             B block-diagonal, rank 3r), as sd-scripts writes them.

The user scale (`set_lora_scale`, `lora_scaled`) is not saved: a file holds the adapter at alpha / r.
Each file is written to a temporary name beside its destination and renamed (flashsd3.outputs.atomic_write),
with the mode `open` would give it under the umask.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..outputs import atomic_write
from ..weights import all_finite
from .formats import METADATA_KEY, PEFT_CONFIG, PEFT_WEIGHTS, LoRAError, peft_selects
from .keys import diffusers_targets
from .train import FLASH_SD3_TARGETS, adapter_layers, our_rows

OUT_FORMATS = ("peft", "diffusers", "kohya")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers loaders/lora_base.py LORA_WEIGHT_NAME_SAFE
KOHYA_WEIGHTS = "lora.safetensors"  # file name when a kohya save is given a folder


@dataclass(frozen=True)
class Module:
    """One LoRA module as a file stores it: delta = scale * B @ A on the whole layer `name`."""

    name: str  # module path in the file's naming, no prefix
    A: torch.Tensor  # (r, in) or conv (r, in, kh, kw)
    B: torch.Tensor  # (out, r) or conv (out, r, 1, 1)
    scale: float  # alpha / r

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def save_lora(model: nn.Module, path: str | Path, *, name: str = "default", format: str = "peft",
              dtype: torch.dtype | None = None, overwrite: bool = True) -> Path:
    """Write adapter `name` to `path`; returns the weights file written.

    peft: `path` is a folder (created). diffusers / kohya: a `.safetensors` file, or a folder that gets
    `pytorch_lora_weights.safetensors` / `lora.safetensors`. dtype: of A and B in the file (default: as held).
    overwrite=False refuses to replace an existing file; a destination of another kind (a folder where the
    file goes, a device or pipe) is always refused. Everything is checked before anything is written.
    """
    files = destination(path, format, overwrite)
    if format == "peft":
        tensors, config = peft_layout(model, name)
        out = _checked_tensors(tensors, dtype)
        files[0].parent.mkdir(parents=True, exist_ok=True)
        atomic_write(files[0], lambda tmp: save_file(out, str(tmp), metadata={"format": "pt"}))
        atomic_write(files[1], lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
        return files[0]
    if format == "diffusers":
        tensors, metadata = diffusers_layout(model, name)
    else:
        tensors, metadata = kohya_layout(model, name), {"format": "pt"}
    out = _checked_tensors(tensors, dtype)
    files[0].parent.mkdir(parents=True, exist_ok=True)
    atomic_write(files[0], lambda tmp: save_file(out, str(tmp), metadata=metadata))
    return files[0]


def destination(path: str | Path, format: str, overwrite: bool) -> list[Path]:
    """The files `save_lora` writes for `path` (weights first), checked: no folder or special file where a
    file goes, no file where a folder goes, no existing file unless `overwrite`. Creates nothing."""
    path = Path(path)
    if format not in OUT_FORMATS:
        raise LoRAError(f"save_lora: format must be one of {OUT_FORMATS}, got {format!r}")
    if format == "peft" and path.suffix == ".safetensors":
        raise LoRAError(f"save_lora: the peft layout is a folder ({PEFT_WEIGHTS} + {PEFT_CONFIG}), got {path}")
    if format == "peft":
        folder, files = path, [path / PEFT_WEIGHTS, path / PEFT_CONFIG]
    elif path.suffix == ".safetensors":
        folder, files = path.parent, [path]
    else:
        folder = path
        files = [path / (DIFFUSERS_WEIGHTS if format == "diffusers" else KOHYA_WEIGHTS)]
    _check_folder(folder)
    for file in files:
        if os.path.lexists(file) and not (file.is_symlink() or file.is_file()):  # a link is replaced, not followed
            raise LoRAError(f"{file} exists and is not a file ({_kind(file)}); give another destination")
        if os.path.lexists(file) and not overwrite:
            raise LoRAError(f"{file} exists; pass --overwrite to replace it (or give another destination)")
    return files


def _check_folder(folder: Path) -> None:
    """`folder` and its existing ancestors must be folders (mkdir creates the missing ones)."""
    for p in (folder, *folder.parents):
        if p.is_dir():
            return
        if os.path.lexists(p):
            raise LoRAError(f"{p} exists and is not a folder ({_kind(p)}); the LoRA cannot be written under it")


def _kind(p: Path) -> str:
    mode = p.lstat().st_mode
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISLNK, "a symbolic link"))
    return next((what for test, what in kinds if test(mode)), "a special file")


# Layouts: key -> tensor (no I/O, so they run on a meta-device model) ------------------------------------

def peft_layout(model: nn.Module, name: str = "default") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config.json) of the peft layout."""
    modules = diffusers_modules(model, name)
    tensors = {}
    for m in modules:
        tensors[f"base_model.model.{m.name}.lora_A.weight"] = m.A
        tensors[f"base_model.model.{m.name}.lora_B.weight"] = m.B
    return tensors, peft_config(model, modules)


def diffusers_layout(model: nn.Module, name: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of diffusers' `save_lora_weights` layout."""
    modules = diffusers_modules(model, name)
    tensors = {}
    for m in modules:
        tensors[f"transformer.{m.name}.lora_A.weight"] = m.A
        tensors[f"transformer.{m.name}.lora_B.weight"] = m.B
    config = {f"transformer.{k}": v for k, v in peft_config(model, modules).items()}
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def kohya_layout(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Tensors of the kohya / ComfyUI layout, `.alpha` = scale * rank for every module."""
    tensors = {}
    for m in kohya_modules(model, name):
        key = "lora_unet_" + m.name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = m.A
        tensors[f"{key}.lora_up.weight"] = m.B
        tensors[f"{key}.alpha"] = torch.tensor(m.scale * m.rank, dtype=torch.float32)
    return tensors


def diffusers_modules(model: nn.Module, name: str) -> list[Module]:
    """The adapter per diffusers layer, in model order. An update over a fused layer (our qkv) becomes
    one module per diffusers layer it covers (same A, B's rows); (scale, shift) rows are swapped back."""
    _refuse_bias(model, name)
    by_layer: dict[str, list[tuple[str, object]]] = {}
    for dname, target in diffusers_targets(model).items():
        by_layer.setdefault(target.module, []).append((dname, target))
    modules = []
    for module, layer in adapter_layers(model, name):
        for update in layer.lora[name]:
            parts = [(d, t) for d, t in by_layer[module] if update.start <= t.start and t.stop <= update.stop]
            if sum(t.stop - t.start for _, t in parts) != update.stop - update.start:
                raise LoRAError(f"adapter {name!r}: rows {update.start}:{update.stop} of our {module} are no whole "
                                f"diffusers layer(s) ({[(d, t.start, t.stop) for d, t in by_layer[module]]}); "
                                "save it in the kohya layout")
            for dname, t in parts:
                B = our_rows(t, update.B[t.start - update.start : t.stop - update.start])  # back to file rows
                modules.append(Module(dname, update.A, B, update.scale))
    names = Counter(m.name for m in modules)
    if twice := sorted(n for n, c in names.items() if c > 1):
        raise LoRAError(f"adapter {name!r} has several updates on the diffusers layers {twice}; save it as kohya")
    return modules


def kohya_modules(model: nn.Module, name: str) -> list[Module]:
    """The adapter per our layer, in model order. Several updates of one layer (q, k, v on qkv) or one
    that covers some rows only are written as one LoRA: A stacked, B placed on its rows (block-diagonal),
    each B times its scale / the first update's scale, so that one alpha serves all."""
    _refuse_bias(model, name)
    modules = []
    for module, layer in adapter_layers(model, name):
        updates = list(layer.lora[name])
        rows = layer.weight.shape[0]
        if len(updates) == 1 and (updates[0].start, updates[0].stop) == (0, rows):
            modules.append(Module(module, updates[0].A, updates[0].B, updates[0].scale))
            continue
        scale, rank = updates[0].scale, sum(u.rank for u in updates)
        ref = updates[0].B
        B = torch.zeros((rows, rank, *ref.shape[2:]), dtype=ref.dtype, device=ref.device)
        col = 0
        for u in updates:
            B[u.start : u.stop, col : col + u.rank] = u.B.detach() * (u.scale / scale)
            col += u.rank
        modules.append(Module(module, torch.cat([u.A.detach() for u in updates], dim=0), B, scale))
    return modules


def _refuse_bias(model: nn.Module, name: str) -> None:
    biased = [module for module, layer in adapter_layers(model, name) if name in layer.lora_bias]
    if biased:
        raise LoRAError(f"adapter {name!r} changes the biases of {len(biased)} layers (ComfyUI .diff_b, e.g. "
                        f"{biased[:2]}), which the peft, diffusers and kohya layouts cannot hold")


def peft_config(model: nn.Module, modules: list[Module]) -> dict:
    """adapter_config.json: the most common rank / alpha, others as exact-name rank / alpha patterns;
    target_modules = the published Flash SD3 list when it selects exactly these modules, else their names."""
    alphas = {m.name: _number(m.scale * m.rank) for m in modules}
    r = Counter(m.rank for m in modules).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    names = {m.name for m in modules}
    flash = {n for n in diffusers_targets(model) if peft_selects({"target_modules": list(FLASH_SD3_TARGETS)}, n)}
    targets = list(FLASH_SD3_TARGETS) if names == flash else sorted(names)
    exact = {m.name: "^" + re.escape(m.name) for m in modules}  # peft get_pattern_key: (.*\.)?(key)$
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets,
        "rank_pattern": {exact[m.name]: m.rank for m in modules if m.rank != r},
        "alpha_pattern": {exact[n]: a for n, a in alphas.items() if a != alpha},
        "use_rslora": False, "use_dora": False, "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "inference_mode": True, "task_type": None, "base_model_name_or_path": None, "revision": None,
    }


def _number(x: float) -> int | float:
    """alpha as an int when it is one (the published config writes 8), else the float."""
    return int(round(x)) if math.isclose(x, round(x), rel_tol=0, abs_tol=1e-9 * max(1.0, abs(x))) else x


# Writing ----------------------------------------------------------------------------------------------

def _checked_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """CPU copies in the file's dtype, refused if any is on the meta device or holds NaN/inf (every loader
    of ours refuses such a file; a value may also overflow the asked dtype)."""
    meta = [k for k, t in tensors.items() if t.is_meta]
    if meta:
        raise LoRAError(f"save_lora: {len(meta)} tensors are on the meta device (no values), e.g. {meta[:2]}")
    out = {}
    for key, t in tensors.items():  # own copies: safetensors refuses tensors sharing memory (q/k/v share A)
        t = t.detach().to("cpu")
        out[key] = (t.to(dtype) if dtype is not None and key.endswith(".weight") else t).clone().contiguous()
        if not all_finite(out[key]):
            cast = f" (after the cast to {dtype}: values too large for it?)" if dtype is not None else ""
            raise LoRAError(f"save_lora: {key} holds NaN or inf{cast}; nothing was written")
    return out

