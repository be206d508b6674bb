"""Encode a dataset once into safetensors shards, so training holds neither the VAE nor the text encoders.

A cache folder holds `cache.json` (what produced it: `CacheSpec`, the examples' digest, shard size, progress),
`shard-NNNNN.safetensors` (rows of `latents` (n, C, h, w), `clip` (n, 77, CLIP-L+G width), `pooled` (n, P); the
captions and image paths in the file's metadata), `empty.safetensors` (the empty prompt, for caption dropout),
`negative.safetensors` (the CFG negative of Flash distillation) and `prompts.safetensors` (fixed prompts for
sample grids). The context is stored as its CLIP part only; the Flash SD3 recipe's T5 slot (gojasper/flash-diffusion
`src/flash/models/flash_sd3/flash_diffusion_model.py` and the initml/diffusers fork's `pipeline_stable_diffusion_3.py`
`_get_t5_prompt_embeds`: no T5, 77 zero tokens, CLIP features zero-padded to 4096, 154 tokens in all) is rebuilt
at load time by `assemble_context`, which is exactly what `TextEncoders.encode` returns without T5.

Latents are the VAE posterior's sample (seeded per example) mapped as the sampler expects them,
(z - shift_factor) * scaling_factor (SD3 pipeline; the Flash trainer omits the shift, a quirk not copied here).
Shards are renamed into place when complete, so an interrupted `prepare` resumes at the first missing one.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .. import rng
from ..outputs import atomic_json, atomic_write
from .data import DataError, Example, Problem, load_image

CACHE_VERSION = 1
CLIP_TOKENS = 77  # CLIP's context length
T5_TOKENS = 77  # zero tokens of the T5 slot (Flash SD3: tokenizer_max_length 77, text_encoder_3=None)
# The negative prompt of every CFG call in Flash SD3's distillation, for all three encoders
# (gojasper/flash-diffusion src/flash/models/flash_sd3/flash_diffusion_model.py L207-209).
FLASH_NEGATIVE_PROMPT = ("deformed, distorted, disfigured, poorly drawn, bad anatomy, wrong anatomy, extra limb, "
                         "missing limb, floating limbs, mutated hands and fingers, disconnected limbs, mutation, "
                         "mutated, ugly, disgusting, blurry, amputation, NSFW")


class CacheError(ValueError):
    """A cache folder that does not fit the request (another model, resolution, ...) or is unfinished."""


@dataclass(frozen=True)
class CacheSpec:
    """What produced a cache; two caches with equal specs and digests hold the same tensors."""

    model: str  # "demo", a hub repo id or an absolute path (training.models.model_id)
    resolution: int  # image side in pixels (square, centre-cropped)
    dtype: str  # torch dtype name of the encoders and of the stored tensors, e.g. "float32"
    latent_channels: int  # VAE latent channels
    scaling_factor: float  # latents = (z - shift_factor) * scaling_factor (vae/config.json)
    shift_factor: float
    clip_width: int  # CLIP-L + CLIP-G hidden widths (768 + 1280 for SD3)
    context_dim: int  # transformer text width the CLIP features are zero-padded to (4096 for SD3)
    pooled_dim: int  # CLIP-L + CLIP-G projection widths (2048)
    seed: int = 0  # posterior sample of example i uses seed + i
    t5_tokens: int = T5_TOKENS
    version: int = CACHE_VERSION

    def differences(self, other: CacheSpec) -> list[str]:
        return [f"{f.name} {getattr(self, f.name)!r} (wanted {getattr(other, f.name)!r})" for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


def examples_digest(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex.image}\0{ex.caption}\0".encode())
    return h.hexdigest()


def assemble_context(clip: torch.Tensor, context_dim: int, t5_tokens: int = T5_TOKENS) -> torch.Tensor:
    """(B, 77, clip_width) -> (B, 77 + t5_tokens, context_dim): zero feature padding, then zero T5 tokens."""
    clip = F.pad(clip, (0, context_dim - clip.shape[-1]))
    return torch.cat([clip, clip.new_zeros(clip.shape[0], t5_tokens, context_dim)], dim=1)


def encode_text(text, prompts: list[str], clip_width: int) -> dict[str, torch.Tensor]:
    context, pooled = text.encode(prompts, t5_tokens=0)  # (B, 77, context_dim): CLIP then zero padding
    return {"clip": context[:, :CLIP_TOKENS, :clip_width].contiguous().cpu(), "pooled": pooled.contiguous().cpu()}


def spec_for(model: str, resolution: int, vae, text, seed: int) -> CacheSpec:
    c = vae.config
    return CacheSpec(model=model, resolution=resolution, dtype=str(text.dtype).removeprefix("torch."),
                     latent_channels=c.latent_channels, scaling_factor=c.scaling_factor, shift_factor=c.shift_factor,
                     clip_width=text.clip_l.config.hidden_size + text.clip_g.config.hidden_size,
                     context_dim=text.context_dim,
                     pooled_dim=text.clip_l.config.projection_dim + text.clip_g.config.projection_dim, seed=seed)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    metadata = {k: json.dumps(v) for k, v in (meta or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def start_cache(folder: Path, spec: CacheSpec, examples: list[Example], shard_size: int,
                skipped: list[Problem]) -> dict:
    """Create cache.json, or check an existing one matches (resume). Returns the record."""
    record = {"spec": asdict(spec), "digest": examples_digest(examples), "examples": len(examples),
              "shard_size": shard_size, "skipped": [str(p) for p in skipped], "complete": False}
    index = folder / "cache.json"
    if index.is_file():
        try:
            old = json.loads(index.read_text(encoding="utf-8"))
            diffs = CacheSpec(**old["spec"]).differences(spec)
        except (ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{index} is not a cache index ({type(e).__name__}: {e}); use another folder or "
                             "--overwrite") from None
        if old["digest"] != record["digest"]:
            diffs.append("the list of images and captions changed")
        if old["shard_size"] != shard_size:
            diffs.append(f"shard size {old['shard_size']} (wanted {shard_size})")
        if diffs:
            raise CacheError(f"{folder} holds a cache made differently: {'; '.join(diffs)}; "
                             "use another folder or --overwrite")
        return old
    folder.mkdir(parents=True, exist_ok=True)
    atomic_json(index, record)
    return record


def encode_shard(examples: list[Example], first: int, spec: CacheSpec, vae, text, batch_size: int,
                 skip_bad: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Encode examples[...] (global indices from `first`); returns (tensors, metadata)."""
    rows, kept, bad = {"latents": [], "clip": [], "pooled": []}, [], []
    for start in range(0, len(examples), batch_size):
        images, batch = [], []
        for i, ex in enumerate(examples[start:start + batch_size], first + start):
            try:
                images.append(load_image(ex.image, spec.resolution))
                batch.append((i, ex))
            except DataError as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
        if not batch:
            continue
        pixels = torch.stack(images).to(vae.device, text.dtype)
        posterior = vae.encode(pixels)
        z = posterior_samples(posterior, [i for i, _ in batch], spec.seed)
        rows["latents"].append(vae.vae_to_latents(z).cpu())
        for k, v in encode_text(text, [ex.caption for _, ex in batch], spec.clip_width).items():
            rows[k].append(v)
        kept += batch
    tensors = {k: torch.cat(v) for k, v in rows.items()} if kept else {}
    meta = {"index": [i for i, _ in kept], "captions": [ex.caption for _, ex in kept],
            "images": [str(ex.image) for _, ex in kept], "skipped": bad}
    return tensors, meta


def posterior_samples(posterior, indices: list[int], seed: int) -> torch.Tensor:
    """mean + std * noise with example i's noise from seed + i: a latent does not depend on its batch."""
    noise = rng.randn([rng.offset_generator(seed, i) for i in indices], posterior.mean.shape[1:])
    return posterior.mean + posterior.std * noise.to(posterior.mean.device, posterior.mean.dtype)


def prepare_cache(folder: Path, examples: list[Example], spec: CacheSpec, vae, text, *, shard_size: int = 256,
                  batch_size: int = 8, skip_bad: bool = False, skipped: list[Problem] = (),
                  sample_prompts: list[str] | None = None, progress: Callable[[int], None] | None = None,
                  negative_prompt: str = FLASH_NEGATIVE_PROMPT) -> dict:
    """Encode `examples` into `folder` (resuming an unfinished cache); returns the final cache.json record.

    sample_prompts: fixed prompts for sample grids (default: the first four captions). negative_prompt: the CFG
    negative of Flash distillation (`negative.safetensors`; default the recipe's). progress(n) is called
    with the number of examples done after each shard (including shards found already written).
    """
    record = start_cache(folder, spec, examples, shard_size, list(skipped))
    prompts = sample_prompts or [ex.caption for ex in examples[:4]]
    _save_tensors(folder / "empty.safetensors", encode_text(text, [""], spec.clip_width))
    _save_tensors(folder / "negative.safetensors", encode_text(text, [negative_prompt], spec.clip_width),
                  {"prompts": [negative_prompt]})
    _save_tensors(folder / "prompts.safetensors", encode_text(text, prompts, spec.clip_width), {"prompts": prompts})
    if record["complete"]:  # only the prompt files were (re)written
        return record
    shards = []
    for k, first in enumerate(range(0, len(examples), shard_size)):
        path = folder / f"shard-{k:05d}.safetensors"
        if not path.is_file():
            with torch.no_grad():
                tensors, meta = encode_shard(examples[first:first + shard_size], first, spec, vae, text,
                                             batch_size, skip_bad)
            _save_tensors(path, tensors, meta)
        shards.append(path.name)
        if progress is not None:
            progress(min(first + shard_size, len(examples)))
    bad = [s for name in shards for s in _metadata(folder / name)["skipped"]]
    rows = [len(_metadata(folder / name)["index"]) for name in shards]
    record.update(shards=shards, rows=rows, skipped=record["skipped"] + bad, complete=True)
    if sum(rows) == 0:
        raise DataError(f"no usable example: all {len(examples)} images were skipped")
    atomic_json(folder / "cache.json", record)
    return record


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


class CachedData:
    """A finished cache, read row by row from its memory-mapped shards. Opening it checks every file it
    names (a CacheError names the file at fault); rows are read only when asked for."""

    def __init__(self, folder: str | Path):
        self.folder = folder = Path(folder)
        index = folder / "cache.json"
        if not index.is_file():
            raise CacheError(f"{folder} is not a cache (no cache.json): make one with `flashsd3-train prepare`")
        try:
            self.record = json.loads(index.read_text(encoding="utf-8"))
            if self.record.get("complete") is False:
                raise CacheError(f"the cache {folder} is unfinished: run the same `flashsd3-train prepare` again")
            shards, rows = self.record["shards"], self.record["rows"]
            self.spec = CacheSpec(**self.record["spec"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON / UTF-8, fields missing or wrong
            if isinstance(e, CacheError):
                raise
            raise CacheError(f"{index} is not a cache index ({type(e).__name__}: {e}); prepare the cache again") \
                from None
        self._files = [_open_shard(folder / name, n) for name, n in zip(shards, rows, strict=True)]
        self._where = [(k, r) for k, n in enumerate(rows) for r in range(n)]  # row -> (shard, row)

    @property
    def latent_side(self) -> int:
        """Side of the cached latents (read from the first shard's header)."""
        shard = next(k for k, n in enumerate(self.record["rows"]) if n)
        return self._files[shard].get_slice("latents").get_shape()[-1]

    def __len__(self) -> int:
        return len(self._where)

    def check(self, model: str, resolution: int | None = None) -> None:
        """Refuse a cache made for another model (or resolution) than the run's."""
        wrong = [f"model {self.spec.model!r} (this run: {model!r})" for _ in [0] if self.spec.model != model]
        if resolution is not None and self.spec.resolution != resolution:
            wrong.append(f"resolution {self.spec.resolution} (this run: {resolution})")
        if wrong:
            raise CacheError(f"the cache {self.folder} was made for {' and '.join(wrong)}: prepare a cache for it")

    def _rows(self, name: str, indices: list[int]) -> torch.Tensor:
        out = []
        for i in indices:
            shard, row = self._where[i]
            out.append(self._files[shard].get_slice(name)[row:row + 1])
        return torch.cat(out)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents (B, C, h, w), context (B, 154, context_dim), pooled (B, P)) in the cache dtype."""
        clip = self._rows("clip", indices)
        return self._rows("latents", indices), self.context(clip), self._rows("pooled", indices)

    def context(self, clip: torch.Tensor) -> torch.Tensor:
        return assemble_context(clip, self.spec.context_dim, self.spec.t5_tokens)

    def prompt_file(self, name: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(context, pooled, prompts) of empty.safetensors, prompts.safetensors or negative.safetensors."""
        path = self.folder / name
        if not path.is_file():
            raise CacheError(f"the cache {self.folder} has no {name} (see `flashsd3-train prepare --help`)")
        try:
            with safe_open(str(path), "pt") as f:
                prompts = json.loads((f.metadata() or {}).get("prompts", '[""]'))
                return self.context(f.get_tensor("clip")), f.get_tensor("pooled"), prompts
        except Exception as e:  # SafetensorError (truncated), ValueError (metadata), KeyError (tensor)
            raise CacheError(f"{path}: unreadable ({type(e).__name__}: {e}); prepare the cache again") from None


def _open_shard(path: Path, rows: int):
    """A shard opened lazily (header checked against its file size by safetensors) with its row count checked."""
    try:
        f = safe_open(str(path), "pt")
        shapes = [f.get_slice(k).get_shape()[0] for k in ("latents", "clip", "pooled")] if rows else [0] * 3
    except Exception as e:  # SafetensorError (truncated, not safetensors), OSError (missing), KeyError
        raise CacheError(f"{path}: unreadable shard ({type(e).__name__}: {e}); prepare the cache again") from None
    if shapes != [rows] * 3:
        raise CacheError(f"{path}: holds {shapes[0]} rows, cache.json says {rows}; prepare the cache again")
    return f
