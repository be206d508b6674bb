"""LoRA files: find them, recognise their layout, and plan (without reading data) what goes where.

Layouts (detected from the keys, never from file names):
  peft        `base_model.model.<diffusers path>.lora_A.weight` / `.lora_B.weight` + adapter_config.json
              (PEFT `save_pretrained`; the published jasperai/flash-sd3 adapter). The scale lives only
              in adapter_config.json: lora_alpha / r (8 / 64 = 0.125 for Flash SD3).
  diffusers   `transformer.<diffusers path>.lora_A.weight` (diffusers `save_lora_weights`, SD3 DreamBooth
              LoRA). diffusers 0.42.1 (`loaders/peft.py` load_lora_adapter) builds the LoraConfig from the
              file's `lora_adapter_metadata` JSON when present, else sets lora_alpha = r: scale 1.0.
              We also accept `<path>.alpha` scalars (alpha / r), which diffusers' SD3 loader refuses.
  peft-bare   the same keys with no prefix (a raw `get_peft_model_state_dict`), same scale rules.
  kohya       `lora_unet_<our name, '.'->'_'>.lora_down.weight` / `.lora_up.weight` / `.alpha`
              (sd-scripts `networks/lora_sd3.py`, ComfyUI); scale = alpha / rank, 1.0 if alpha is 0
              or absent. A fused qkv LoRA adapts the whole qkv layer.
  onetrainer  `lora_transformer_<diffusers path, '.'->'_'>.lora_down.weight` / ... / `.alpha`
              (OneTrainer `convert_sd3_lora.py`, "legacy diffusers"), same scale rule as kohya.
  lycoris     `lycoris_<diffusers path, '.'->'_'>.lora_down.weight` / ... / `.alpha`: LyCORIS's "lora" algorithm
              (lycoris/wrapper.py LycorisNetwork.LORA_PREFIX, save_weights), as SimpleTuner saves it with
              --lora_type=lycoris; same scale rule. LoHa / LoKr / other LyCORIS algorithms are refused by name.
  comfyui     `diffusion_model.<our name>.lora_up.weight` / `.lora_down.weight` [/ `.alpha`], as ComfyUI's
              LoRA trainer (comfy_extras/nodes_train.py TrainLoraNode, SaveLoRA) and extractor
              (comfy_extras/nodes_lora_extract.py calc_lora_model) write them: scale alpha / rank, 1.0 without
              alpha (comfy/weight_adapter/lora.py calculate_weight); a conv's A and B may be flat 2-D matrices
              (the trainer's). Their `.diff_b` bias differences (the default) are applied:
              bias += user scale x diff_b (comfy/lora.py "diff" patches); `.diff` full weight differences are
              refused by name.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import hub
from ..weights import CheckpointError, Reader, SafetensorsReader, all_finite, brief, listing, refuse_pickle
from .keys import Target, diffusers_targets, original_targets, underscored

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers `loaders/lora_base.py` LORA_ADAPTER_METADATA_KEY
MAX_ERRORS = 5  # problems listed in full; a LoRA for another model can have hundreds


class LoRAError(CheckpointError):
    """A LoRA file that cannot be applied: names the file and every key at fault."""


@dataclass(frozen=True)
class Format:
    name: str
    prefix: str
    naming: str  # "diffusers" or "original": the module names the file uses
    underscored: bool  # module names written with '_' for '.'
    down: str  # key suffix of A
    up: str  # key suffix of B
    alpha: bool  # may carry `<module>.alpha` scalars
    bias_diff: bool = False  # may carry `<module>.diff_b` bias differences (ComfyUI)
    flat_conv: bool = False  # a conv's A and B may be stored as 2-D matrices (ComfyUI's trainer)


_PEFT_AB, _KOHYA_AB = (".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight")
FORMATS = (
    Format("peft", "base_model.model.", "diffusers", False, *_PEFT_AB, alpha=False),
    Format("diffusers", "transformer.", "diffusers", False, *_PEFT_AB, alpha=True),
    Format("kohya", "lora_unet_", "original", True, *_KOHYA_AB, alpha=True),
    Format("onetrainer", "lora_transformer_", "diffusers", True, *_KOHYA_AB, alpha=True),
    Format("lycoris", "lycoris_", "diffusers", True, *_KOHYA_AB, alpha=True),
    Format("comfyui", "diffusion_model.", "original", False, *_KOHYA_AB, alpha=True, bias_diff=True, flat_conv=True),
)
LAYOUT_NAMES = "peft, diffusers, kohya, OneTrainer, LyCORIS (SimpleTuner), ComfyUI"
BARE = Format("peft-bare", "", "diffusers", False, *_PEFT_AB, alpha=True)

# Module names that show the file is for another model (checked after removing a layout prefix).
FOREIGN = (
    (r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]",
     "a UNet model (SD 1.x / SD 2.x / SDXL)"),
    (r"(single_transformer_blocks|single_blocks|double_blocks)[._]", "Flux"),
)
FOREIGN_PREFIXES = ("base_model.model.", "transformer.", "lora_unet_", "lora_transformer_", "unet.",
                    "diffusion_model.", "model.diffusion_model.", "")
TEXT_ENCODER = r"^(text_encoders?(_2|_3)?\.|lora_te[123]?_)"  # text_encoders.: ComfyUI's extractor
UNSUPPORTED_KINDS = (  # (regex searched in a key, what it is)
    ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), ("hada_", "LoHa (LyCORIS)"), ("lokr_", "LoKr (LyCORIS)"),
    (r"lora_B\.bias", "LoRA with bias (peft lora_bias)"), (r"\.lora_mid\.", "LoCon with a Tucker mid weight"),
    (r"\.diff$", "a full weight difference (.diff, ComfyUI)"), (r"\.diff_b$", "a bias difference (.diff_b)"),
    (r"\.(w_norm|b_norm)$", "a norm-layer adapter (LyCORIS)"), (r"\.(oft_|boft_|a1\.|b1\.)", "OFT / GLoRA"))
# adapter_config.json fields that change the forward pass beyond W + s*B@A: refused when set.
PEFT_UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens", "velora_config",
                    "monteclora_config", "arrow_config", "kasa_config", "use_bdlora", "layer_replication",
                    "trainable_token_indices", "target_parameters", "modules_to_save", "layers_to_transform",
                    "fan_in_fan_out")


@dataclass(frozen=True)
class LoRASource:
    reader: SafetensorsReader
    config: dict | None  # adapter_config.json or diffusers metadata (prefix stripped)
    config_name: str | None  # where `config` came from, for messages
    label: str  # default adapter name


@dataclass(frozen=True)
class Piece:
    """One LoRA module of the file, planned onto our model."""

    source: str  # the module's name in the file
    a_key: str | None  # None: the module only changes the bias
    b_key: str | None
    target: Target
    rank: int
    scale: float  # alpha / r (rsLoRA: alpha / sqrt(r)); the user's scale comes on top
    bias_key: str | None = None  # a bias difference (ComfyUI `.diff_b`), whole layer, at the user's scale


# Finding the files -------------------------------------------------------------------------------

def open_lora(source: str | Path | LoRASource) -> LoRASource:
    """A LoRA folder (PEFT layout or one .safetensors), a .safetensors file, or a Hub repo id (an opened
    LoRASource is returned as it is, so a caller that plans one file onto several models opens it once)."""
    if isinstance(source, LoRASource):
        return source
    path, label = Path(source), Path(source).name
    if not path.exists():
        if not hub.looks_like_repo_id(str(source)) or path.parent.is_dir():  # 'loras/x': a local folder's
            raise FileNotFoundError(f"LoRA not found: {source} (neither a local path nor a Hub repo id)")
        path = _download(str(source))  # a snapshot folder named by commit hash: keep the repo's name
    if not path.is_file() and not path.is_dir():
        raise LoRAError(f"{path}: not a file or folder (a device, pipe or socket); give a LoRA folder or file")
    if path.is_file():
        refuse_pickle(path)
        config = path.parent / PEFT_CONFIG if path.name == PEFT_WEIGHTS else None
        return _source([path], config, path.stem)
    if (path / PEFT_WEIGHTS).is_file():
        return _source([path / PEFT_WEIGHTS], path / PEFT_CONFIG, label)
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise LoRAError(f"{path}: expected {PEFT_WEIGHTS} or exactly one .safetensors file; {listing(path)}")
    return _source(files, None, label)


def _download(repo_id: str) -> Path:
    try:
        return hub.resolve(repo_id, patterns=["*.json", "*.safetensors"], what="LoRA")
    except hub.WeightsUnavailable as e:  # offline, unknown repo, gated repo: all end here
        raise LoRAError(str(e)) from e


def _source(files: list[Path], peft_config: Path | None, label: str) -> LoRASource:
    reader = SafetensorsReader(files)
    if peft_config is not None and peft_config.is_file():
        try:
            return LoRASource(reader, json.loads(peft_config.read_text()), str(peft_config), label)
        except json.JSONDecodeError as e:
            raise LoRAError(f"{peft_config}: not valid JSON ({e})") from e
    raw = reader.metadata.get(METADATA_KEY)
    if raw is None:
        return LoRASource(reader, None, None, label)
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoRAError(f"{reader.name}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from e
    config = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
    return LoRASource(reader, config or None, f"{reader.name} metadata {METADATA_KEY!r}", label)


def read_finite(reader: Reader, key: str, *, dtype: torch.dtype | None, device) -> torch.Tensor:
    """One LoRA tensor as `dtype` (None: the file's) on `device`, refused if it holds NaN/inf (one pass, on
    the device): such an adapter makes every image NaN, and every file written from it too."""
    t = reader.get(key).to(device=device, dtype=dtype)
    if not all_finite(t):
        raise LoRAError(f"{reader.source_of(key)}: LoRA tensor {key!r} holds NaN or inf values in {t.dtype}, so "
                        "every image would be NaN (a damaged file, a diverged training run, or values too large "
                        "for this dtype)")
    return t


# Recognising the layout ----------------------------------------------------------------------------

def detect_format(keys: list[str], name: str) -> Format:
    """The one layout every key is in; refuses other models' and text encoders' LoRAs by name."""
    foreign = foreign_model(keys)
    if foreign:
        raise LoRAError(f"{name}: {foreign}")
    text = [k for k in keys if re.match(TEXT_ENCODER, k)]
    if text:
        raise LoRAError(f"{name}: {len(text)} keys adapt a text encoder (e.g. {text[:3]}); flashsd3 applies LoRA "
                        "to the transformer only: save the transformer part of this LoRA on its own")
    claimed = {f.name: [k for k in keys if k.startswith(f.prefix)] for f in FORMATS}
    used = [f for f in FORMATS if claimed[f.name]]
    if len(used) == 1 and len(claimed[used[0].name]) == len(keys):
        return used[0]
    if not used and all(k.endswith(BARE.down) or k.endswith(BARE.up) or k.endswith(".alpha") for k in keys):
        return BARE
    if len(used) > 1:
        raise LoRAError(f"{name}: keys of several LoRA layouts mixed: "
                        + ", ".join(f"{f.name} ({f.prefix}*: {len(claimed[f.name])})" for f in used))
    other = sorted(k for k in keys if not any(k.startswith(f.prefix) for f in used))
    raise LoRAError(f"{name}: {len(other)} keys in no known SD3 LoRA layout ({LAYOUT_NAMES}), e.g. {other[:5]}")


def foreign_model(names: list[str]) -> str | None:
    """'this LoRA is for X, not SD3 (...)' if the names belong to a known other model family."""
    if any(n.startswith("unet.") for n in names):
        return "this LoRA is for a UNet model (SD 1.x / SD 2.x / SDXL), not SD3 (keys start with 'unet.')"
    for pattern, what in FOREIGN:
        hits = [n for n in names if any(n.startswith(p) and re.match(pattern, n[len(p):]) for p in FOREIGN_PREFIXES)]
        if hits:
            return f"this LoRA is for {what}, not SD3 (e.g. {hits[:3]})"
    return None


def group_keys(keys: list[str], fmt: Format, name: str) -> dict[str, dict[str, str]]:
    """module name (as in the file, prefix removed) -> {"A": key, "B": key[, "alpha": key]}."""
    roles = {fmt.down: "A", fmt.up: "B", **({".alpha": "alpha"} if fmt.alpha else {}),
             **({".diff_b": "bias"} if fmt.bias_diff else {})}
    modules: dict[str, dict[str, str]] = {}
    unknown = []
    for key in keys:
        hit = next((s for s in roles if key.endswith(s)), None)
        if hit is None:
            unknown.append(key)
            continue
        modules.setdefault(key[len(fmt.prefix) : -len(hit)], {})[roles[hit]] = key
    if unknown:
        kinds = sorted({what for k in unknown for part, what in UNSUPPORTED_KINDS if re.search(part, k)})
        hint = f" ({', '.join(kinds)} is not supported)" if kinds else ""
        raise LoRAError(f"{name}: {len(unknown)} keys are not LoRA A/B{'/alpha' if fmt.alpha else ''} "
                        f"weights of the {fmt.name} layout{hint}: {sorted(unknown)[:10]}")
    incomplete = sorted(m for m, r in modules.items() if not {"A", "B"} <= r.keys() and set(r) != {"bias"})
    if incomplete:
        raise LoRAError(f"{name}: modules without both {fmt.down} and {fmt.up}: {incomplete[:10]}")
    return modules


# Planning: every module onto a target, every shape and scale checked, no tensor data read ------------

def plan_lora(model: nn.Module, source: LoRASource) -> list[Piece]:
    """One Piece per LoRA module of the file; raises LoRAError listing every problem at once."""
    reader, name = source.reader, source.reader.name
    fmt = detect_format(reader.keys(), name)
    modules = group_keys(reader.keys(), fmt, name)
    targets = diffusers_targets(model) if fmt.naming == "diffusers" else original_targets(model)
    lookup = underscored(targets) if fmt.underscored else targets
    strays = sorted(m for m in modules if m not in lookup)
    if strays:
        hint = foreign_model(strays)
        raise LoRAError(f"{name}: {len(strays)} LoRA modules ({fmt.name} layout) target nothing in this SD3 "
                        f"transformer{' - ' + hint if hint else ''}: " + brief([fmt.prefix + m for m in strays], 10))
    config = _checked_config(fmt, source, modules)
    errors: list[str] = []
    if config is not None:
        errors += _selection_errors(config, source.config_name, modules, targets)
    pieces = []
    for module, keys in sorted(modules.items()):
        target, layer = lookup[module], model.get_submodule(lookup[module].module)
        if "bias" in keys:
            errors += _bias_errors(layer, target, keys["bias"], reader)
        if "A" not in keys:  # a bias difference alone
            pieces.append(Piece(module, None, None, target, 0, 0.0, keys["bias"]))
            continue
        shape_a = reader.shape(keys["A"])
        rank = shape_a[0] if shape_a else 0
        errors += _shape_errors(layer, target, keys, reader, fmt.flat_conv)
        scale = _scale(config, source.config_name, module, keys, rank, reader, errors)
        pieces.append(Piece(module, keys["A"], keys["B"], target, rank, scale, keys.get("bias")))
    if errors:
        width = _width_mismatch(model, pieces, reader)
        shown = "\n  ".join(errors[:MAX_ERRORS]) + (f"\n  ... and {len(errors) - MAX_ERRORS} more"
                                                    if len(errors) > MAX_ERRORS else "")
        raise LoRAError(f"{name}: cannot apply this LoRA ({fmt.name} layout)"
                        + (f": {width}; for example" if width else "") + f":\n  {shown}")
    return pieces


def _width_mismatch(model: nn.Module, pieces: list[Piece], reader: Reader) -> str | None:
    """'adapter is for width W, model has D' when the A matrices of the layers that read the
    D-wide residual stream all read another width."""
    D = model.config.hidden_size
    widths = {reader.shape(p.a_key)[1] for p in pieces
              if p.a_key and len(reader.shape(p.a_key)) == 2 and _in_features(model, p.target.module) == D}
    if len(widths) == 1 and widths != {D}:
        return f"adapter is for width {widths.pop()}, model has {D}"
    return None


def _in_features(model: nn.Module, module: str) -> int | None:
    return getattr(model.get_submodule(module), "in_features", None)


def _checked_config(fmt: Format, source: LoRASource, modules: dict) -> dict | None:
    """The PEFT-style config that sets the scale, if this layout uses one; refuses what we cannot honour."""
    config, where, name = source.config, source.config_name, source.reader.name
    has_alpha = any("alpha" in keys for keys in modules.values())
    if fmt.name == "peft" and config is None:
        raise LoRAError(f"{name}: PEFT adapter without {PEFT_CONFIG}: its scale (lora_alpha / r) is stored only "
                        "there, so it cannot be applied correctly; put the adapter_config.json beside the weights")
    if fmt.name not in ("peft", "diffusers", "peft-bare") or config is None:  # the others: .alpha keys
        return None
    if has_alpha:
        raise LoRAError(f"{name}: both .alpha keys and a LoRA config ({where}) set the scale; refusing to choose")
    problems = [f"{f}={config[f]!r} is not supported" for f in PEFT_UNSUPPORTED if _is_set(config.get(f))]
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type={config['peft_type']!r} is not LORA")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (trained base biases) is not supported")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or isinstance(config.get(field), bool):
            problems.append(f"{field} must be a number, got {config.get(field)!r}")
    if config.get("target_modules") in (None, "all-linear"):
        problems.append(f"target_modules={config.get('target_modules')!r} cannot be checked against the weights")
    if problems:
        raise LoRAError(f"{where}: " + "; ".join(problems))
    return config


def _is_set(value) -> bool:
    """A config field left at its default (None, False, empty) or set (layers_to_transform=0 is set)."""
    return value is not None and value is not False and value != [] and value != {}


def peft_selects(config: dict, module: str) -> bool:
    """Whether PEFT 0.21.2 wraps `module` (tuners_utils.check_target_module_exists): a string
    target_modules is a regex that must match the whole name; a list matches a name equal to an
    entry or ending in '.' + entry. exclude_modules works the same way and wins."""
    def hit(spec) -> bool:
        if isinstance(spec, str):
            return re.fullmatch(spec, module) is not None
        return module in spec or any(module.endswith("." + s) for s in spec)

    exclude = config.get("exclude_modules")
    return not (exclude and hit(exclude)) and hit(config["target_modules"])


def pattern_value(patterns: dict, module: str, default):
    """PEFT 0.21.2 rank_pattern / alpha_pattern lookup (utils/other.py get_pattern_key): the first key,
    in dict order, that as a regex matches the end of the name after a '.' boundary (or all of it)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _selection_errors(config: dict, where: str, modules: dict, targets: dict[str, Target]) -> list[str]:
    selected = {m for m in targets if peft_selects(config, m)}
    errors = []
    if extra := sorted(set(modules) - selected):
        errors.append(f"{where}: target_modules does not select {len(extra)} modules that have weights: {brief(extra)}")
    if absent := sorted(selected - set(modules)):
        errors.append(f"{where}: target_modules selects {len(absent)} modules without weights: {brief(absent)}")
    return errors


def _shape_errors(layer: nn.Module, target: Target, keys: dict, reader: SafetensorsReader,
                  flat_conv: bool = False) -> list[str]:
    a, b = reader.shape(keys["A"]), reader.shape(keys["B"])
    r, rows = (a[0] if a else None), target.stop - target.start
    if isinstance(layer, nn.Conv2d):  # peft / kohya: A has the layer's kernel, B is 1x1
        want = {"A": (r, layer.in_channels, *layer.kernel_size), "B": (rows, r, 1, 1)}
        if flat_conv and len(a) == 2:  # ComfyUI's trainer: the same matrices, flattened
            want = {"A": (r, math.prod(want["A"][1:])), "B": (rows, r)}
    else:
        want = {"A": (r, layer.in_features), "B": (rows, r)}
    where = f"our {target.module} rows {target.start}:{target.stop} of weight {list(layer.weight.shape)}"
    errors = [f"{keys[k]}: shape {list(s)}, expected {list(want[k])} ({where})"
              for k, s in (("A", a), ("B", b)) if tuple(s) != want[k]]
    if "alpha" in keys and math.prod(reader.shape(keys["alpha"])) != 1:
        errors.append(f"{keys['alpha']}: shape {list(reader.shape(keys['alpha']))}, expected a scalar")
    return errors


def _bias_errors(layer: nn.Module, target: Target, key: str, reader: SafetensorsReader) -> list[str]:
    if layer.bias is None:
        return [f"{key}: a bias difference for our {target.module}, which has no bias"]
    if tuple(reader.shape(key)) != tuple(layer.bias.shape):
        return [f"{key}: shape {list(reader.shape(key))}, expected {list(layer.bias.shape)} (the bias of our "
                f"{target.module})"]
    return []


def read_piece(reader: Reader, piece: Piece, layer: nn.Module, *, dtype: torch.dtype | None, device):
    """(A, B, bias difference or None) of a planned piece, each refused if it holds NaN/inf: A and B shaped
    as the layer's kind wants them (a flat ComfyUI conv LoRA as conv kernels), B's rows in our order."""
    A = B = bias = None
    if piece.a_key is not None:
        A = read_finite(reader, piece.a_key, dtype=dtype, device=device)
        B = read_finite(reader, piece.b_key, dtype=dtype, device=device)
        if isinstance(layer, nn.Conv2d) and A.ndim == 2:
            A, B = A.reshape(A.shape[0], layer.in_channels, *layer.kernel_size), B.reshape(*B.shape, 1, 1)
        B = piece.target.rows.to_our_rows(B)
    if piece.bias_key is not None:
        bias = read_finite(reader, piece.bias_key, dtype=dtype, device=device)
    return A, B, bias


def _scale(config: dict | None, where: str | None, module: str, keys: dict, rank: int,
           reader: SafetensorsReader, errors: list[str]) -> float:
    """alpha / r. From the config (peft semantics, rank_pattern / alpha_pattern / rsLoRA), else from
    an `.alpha` scalar (0 means "no alpha", as sd-scripts), else 1.0 (diffusers without metadata)."""
    if config is not None:
        r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        if r != rank:
            errors.append(f"{where}: rank {r} for {module}, but {keys['A']} has shape {list(reader.shape(keys['A']))}")
            return 0.0
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    if "alpha" in keys and rank:
        alpha = float(reader.get(keys["alpha"]).reshape(-1)[0])
        if not math.isfinite(alpha):
            errors.append(f"{keys['alpha']}: alpha is {alpha}")
        return alpha / rank if alpha else 1.0
    return 1.0
