"""The warm pipeline of the server: loading (the CLI's loader and flags), adapters and ControlNets chosen by
name per request, one batched call, PNG bytes with the CLI's metadata.

Adapters: every `--lora` is loaded at start and merged like flashsd3-sample does (same order, same
float32 arithmetic). A request that chooses another set (a subset, other scales, none) gets it by
restoring the adapted layers' base weights from a copy kept in host memory and merging that set; a merge
from the base weights is deterministic, so a set gives the same bytes as flashsd3-sample with those
--lora flags, however often the server switched. The copy costs the adapted weights' size in host RAM.

ControlNets: every `--controlnet` is checked and loaded at start as flashsd3-sample does it; a call runs with
the ones its requests chose (`pipe.controlnets`, in the request's order, as the CLI's flag order).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .. import cli, hub
from ..controlnet import flags as control_flags
from ..outputs import Job, image_metadata, png_info
from ..preflight import check_loras, model_config
from ..settings import Inputs, call
from .controls import pipeline_arguments


@dataclass(frozen=True)
class LoadedControlNet:
    name: str  # what requests choose it by
    source: str  # the --controlnet source (recorded in the metadata, as flashsd3-sample records it)
    scale: float  # its conditioning scale when a request gives none (--controlnet PATH:SCALE)
    net: object  # flashsd3.controlnet.ControlNet


class Engine:
    def __init__(self, pipe, args, dtype: str, default_size: int, loras: list[tuple[str, str, float]],
                 controlnets: list[LoadedControlNet] = ()):
        """loras: (name, source, scale) as loaded, named f"lora{k}" in the transformer as the CLI names them."""
        self.pipe, self.args, self.dtype, self.default_size = pipe, args, dtype, default_size
        self.demo = bool(args.demo)
        self.config = pipe.transformer.config
        self.loras = loras
        self.controlnets = list(controlnets)
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

    def controlnet(self, name, fail) -> LoadedControlNet:
        """The ControlNet loaded at start under `name`; fail(message) for anything else (a path included)."""
        found = next((c for c in self.controlnets if isinstance(name, str) and c.name == name), None)
        if found is None:
            have = ", ".join(c.name for c in self.controlnets) or "none (the server was started without --controlnet)"
            what = f"no ControlNet named {str(name)[:80]!r}" if isinstance(name, str) else \
                f"expected the name of a loaded ControlNet, got {type(name).__name__}"
            path = isinstance(name, str) and any(c in name for c in "/\\") or str(name).endswith(".safetensors")
            raise fail(f"{what}: ControlNets are chosen by name{', never by path' if path else ''}, among those "
                       f"loaded at start: {have}")
        return found

    def metadata(self, spec) -> dict:
        """flashsd3-sample's run metadata for these settings (prompt, index and seed are added per image)."""
        sources = {name: source for name, source, _ in self.loras}
        args = SimpleNamespace(width=spec.width, height=spec.height, demo=self.demo, model=self.args.model,
                               t5=self.args.t5)
        inputs = Inputs([(sources[name], scale) for name, scale in spec.loras], [spec.prompt], spec.edit,
                        spec.recipe, [u.run for u in spec.controls])
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
        nets = {c.name: c.net for c in self.controlnets}
        self.pipe.controlnets = [nets[u.name] for u in spec.controls]
        controls = pipeline_arguments([s for s, _ in items]) if spec.controls else {}
        images = call(self.pipe, edit, prompts, negative_prompt=negatives, height=spec.height, width=spec.width,
                      recipe=spec.recipe, seed=[s.seed + k for s, k in items], callback=callback, **controls)
        return [png_bytes(image, s, k) for image, (s, k) in zip(images, items, strict=True)]


def png_bytes(image, spec, k: int) -> bytes:
    meta = image_metadata(Job(k, spec.prompt, spec.seed + k), spec.meta)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(meta))  # as flashsd3.outputs.save_image writes files
    return buffer.getvalue()


def load_engine(args, device, dtype: str) -> Engine:
    """Check the model flags as flashsd3-sample does, load the pipeline, every --lora and every --controlnet
    (raises cli.UsageError)."""
    from ..lora import load_lora
    from ..preflight import PreflightError
    from ..weights import CheckpointError

    loras = cli.lora_list(args.lora, args.demo)
    pairs = [cli.parse_lora(v, "--controlnet") for v in args.controlnet or []]
    if not args.demo:
        cli.check_source(args.model, "--model")
    try:
        config = model_config(args.model, args.demo)
        check_loras(config, [source for source, _ in loras])
        runs = [control_flags.ControlRun(source, scale, None, "", control_flags.check_source(source, args.demo,
                                                                                           config))
                for source, scale in pairs]
    except PreflightError as e:
        raise cli.UsageError(str(e)) from None
    default_size = cli.DEMO_SIZE if args.demo else 1024
    args.height = args.width = default_size
    pipe = cli.load_pipeline(args, [], device, dtype, runs)
    controlnets = [LoadedControlNet(name, source, scale, net) for (source, scale), name, net
                   in zip(pairs, short_names([s for s, _ in pairs], "controlnet"), pipe.controlnets, strict=True)]
    pipe.controlnets = []
    named = []
    for k, ((source, scale), name) in enumerate(zip(loras, short_names([s for s, _ in loras]), strict=True)):
        try:
            load_lora(pipe.transformer, source, scale=scale, name=f"lora{k}")
        except hub.WeightsUnavailable as e:
            raise cli.UsageError(cli.weights_message(e, args.model)) from None
        except (CheckpointError, OSError) as e:
            raise cli.UsageError(f"cannot load --lora {source}: {e}") from None
        named.append((name, source, scale))
    return Engine(pipe, args, dtype, default_size, named, controlnets)


def short_names(sources: list[str], fallback: str = "lora") -> list[str]:
    """Short names requests choose adapters and ControlNets by: a file's stem, a folder's or hub repo's last
    part; repeats get -2, -3."""
    names: list[str] = []
    for source in sources:
        base = Path(source.rstrip("/\\")).name
        base = base[: -len(".safetensors")] if base.endswith(".safetensors") else base
        name, k = base or fallback, 2
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
