"""The warm pipeline of the server: loading (the CLI's loader and flags), adapters chosen by name per
request, one batched call, PNG bytes with the CLI's metadata.

Adapters: every `--lora` is loaded at start and merged like flashsd3-sample does (same order, same
float32 arithmetic). A request that chooses another set (a subset, other scales, none) gets it by
restoring the adapted layers' base weights from a copy kept in host memory and merging that set; a merge
from the base weights is deterministic, so a set gives the same bytes as flashsd3-sample with those
--lora flags, however often the server switched. The copy costs the adapted weights' size in host RAM.
"""
from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import torch

from .. import cli, hub
from ..outputs import Job, image_metadata, png_info
from ..preflight import check_loras, model_config
from ..settings import Inputs, call


class Engine:
    def __init__(self, pipe, args, dtype: str, default_size: int, loras: list[tuple[str, str, float]]):
        """loras: (name, source, scale) as loaded, named f"lora{k}" in the transformer as the CLI names them."""
        self.pipe, self.args, self.dtype, self.default_size = pipe, args, dtype, default_size
        self.demo = bool(args.demo)
        self.config = pipe.transformer.config
        self.loras = loras
        self.model_label = "demo" if self.demo else _label(args.model)
        self._base = _base_weights(pipe.transformer) if loras else {}
        self._active: tuple | None = None
        self.activate(self.default_loras)

    @property
    def image_factor(self) -> int:
        return self.pipe.image_factor

    @property
    def default_loras(self) -> tuple[tuple[str, float], ...]:
        return tuple((name, scale) for name, _, scale in self.loras)

    def choose_loras(self, request: dict | None, fail) -> tuple[tuple[str, float], ...]:
        """{name: scale or None} -> ((name, scale), ...) in load order; None -> every adapter at its start scale."""
        if request is None:
            return self.default_loras
        known = {name: scale for name, _, scale in self.loras}
        unknown = [name for name in request if name not in known]
        if unknown:
            have = ", ".join(known) if known else "none (the server was started without --lora)"
            raise fail(f"no LoRA named {unknown[0]!r}: LoRAs are chosen among those loaded at start: {have}")
        return tuple((name, known[name] if request[name] is None else request[name])
                     for name, _, _ in self.loras if name in request)

    def metadata(self, spec) -> dict:
        """flashsd3-sample's run metadata for these settings (prompt, index and seed are added per image)."""
        sources = {name: source for name, source, _ in self.loras}
        args = SimpleNamespace(width=spec.width, height=spec.height, demo=self.demo, model=self.args.model,
                               t5=self.args.t5)
        inputs = Inputs([(sources[name], scale) for name, scale in spec.loras], [spec.prompt], spec.edit,
                        spec.recipe)
        return cli.run_metadata(args, inputs, self.dtype, spec.negative)

    def activate(self, chosen: tuple[tuple[str, float], ...]) -> None:
        """Merge exactly the adapters `chosen` (at their scales) into the base weights."""
        from ..lora import merge_lora, set_lora_scale

        if chosen == self._active or not self.loras:
            self._active = chosen
            return
        model, internal = self.pipe.transformer, {name: f"lora{k}" for k, (name, _, _) in enumerate(self.loras)}
        with torch.no_grad():
            for module, weight in self._base.items():
                layer = model.get_submodule(module)
                layer.weight.copy_(weight)
                layer.lora_merged.clear()  # the weights hold no adapter now
        scales = dict(chosen)
        for name, _, _ in self.loras:
            set_lora_scale(model, internal[name], scales.get(name, 0.0))  # 0: not applied in forward
        if chosen:
            merge_lora(model, sorted(internal[name] for name, _ in chosen))  # the CLI's order (sorted names)
        self._active = chosen

    def run(self, items: list[tuple[object, int]], callback) -> list[bytes]:
        """Images k of specs (all with one key) in one call -> PNG bytes with each image's metadata."""
        spec = items[0][0]
        self.activate(spec.loras)
        prompts = [s.prompt for s, _ in items]
        negatives = [s.negative or "" for s, _ in items] if spec.recipe.cfg else None
        edit = spec.edit
        if edit is not None and len(items) > 1:  # one image (and mask) per output image
            masks = None if edit.mask is None else [s.edit.mask for s, _ in items]
            edit = type(edit)([s.edit.image for s, _ in items], edit.image_path, masks, edit.mask_path, edit.strength)
        images = call(self.pipe, edit, prompts, negative_prompt=negatives, height=spec.height, width=spec.width,
                      recipe=spec.recipe, seed=[s.seed + k for s, k in items], callback=callback)
        return [png_bytes(image, s, k) for image, (s, k) in zip(images, items, strict=True)]


def png_bytes(image, spec, k: int) -> bytes:
    meta = image_metadata(Job(k, spec.prompt, spec.seed + k), spec.meta)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(meta))  # as flashsd3.outputs.save_image writes files
    return buffer.getvalue()


def load_engine(args, device, dtype: str) -> Engine:
    """Check the model flags as flashsd3-sample does, load the pipeline and every --lora (raises cli.UsageError)."""
    from ..lora import load_lora
    from ..preflight import PreflightError
    from ..weights import CheckpointError

    loras = cli.lora_list(args.lora, args.demo)
    if not args.demo:
        cli.check_source(args.model, "--model")
    try:
        config = model_config(args.model, args.demo)
        check_loras(config, [source for source, _ in loras])
    except PreflightError as e:
        raise cli.UsageError(str(e)) from None
    default_size = cli.DEMO_SIZE if args.demo else 1024
    args.height = args.width = default_size
    pipe = cli.load_pipeline(args, [], device, dtype)
    named = []
    for k, ((source, scale), name) in enumerate(zip(loras, lora_names([s for s, _ in loras]), strict=True)):
        try:
            load_lora(pipe.transformer, source, scale=scale, name=f"lora{k}")
        except hub.WeightsUnavailable as e:
            raise cli.UsageError(cli.weights_message(e, args.model)) from None
        except (CheckpointError, OSError) as e:
            raise cli.UsageError(f"cannot load --lora {source}: {e}") from None
        named.append((name, source, scale))
    return Engine(pipe, args, dtype, default_size, named)


def lora_names(sources: list[str]) -> list[str]:
    """Short names requests choose adapters by: a file's stem, a folder's or hub repo's last part; repeats
    get -2, -3."""
    names: list[str] = []
    for source in sources:
        base = Path(source.rstrip("/\\")).name
        base = base[: -len(".safetensors")] if base.endswith(".safetensors") else base
        name, k = base or "lora", 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _label(model: str) -> str:
    """A model's name for clients: a repo id as it is, a local path by its last part (no server paths)."""
    return model if hub.looks_like_repo_id(model) and not Path(model).exists() else Path(model).name


def _base_weights(model) -> dict[str, torch.Tensor]:
    """A host copy of every adapted layer's weight before any merge."""
    from ..lora.layers import LoRALayer

    return {name: m.weight.detach().to("cpu", copy=True) for name, m in model.named_modules()
            if isinstance(m, LoRALayer)}
