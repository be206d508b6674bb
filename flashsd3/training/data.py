"""Image-caption data for training: a folder of images with same-name .txt captions, or a JSONL manifest.

Folder: `cat.png` + `cat.txt` (UTF-8 caption), searched recursively, sorted by path so every run sees the same
order; paths are resolved, so the same folder however spelled gives the same examples. Manifest: one JSON
object per line, {"image": path, "caption": text}; relative paths are relative to the manifest's folder.
Images are centre-cropped to a square and resized (bicubic, as diffusers' training scripts) to the training
resolution, then scaled to [-1, 1] for the VAE encoder.

Bad examples (an image without a caption, an unreadable image) are collected as `Problem`s naming the file:
the caller stops on the first (the default) or skips them with a count (`on_bad="skip"`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """The data cannot be used as given; the message names the file at fault."""


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def find_examples(source: str | Path) -> tuple[list[Example], list[Problem]]:
    """Examples of a folder or a .jsonl manifest, and the problems found without opening images."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"data not found: {source}")
    examples, problems = (folder_examples(source) if source.is_dir() else manifest_examples(source))
    if not examples and not problems:
        raise DataError(f"no images in {source} (looked for {', '.join(IMAGE_SUFFIXES)})"
                        if source.is_dir() else f"the manifest {source} lists no examples")
    return examples, problems


def folder_examples(folder: Path) -> tuple[list[Example], list[Problem]]:
    examples, problems = [], []
    folder = folder.resolve()
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            problems.append(Problem(image, f"no caption file {caption.name}"))
            continue
        try:
            examples.append(Example(image, caption.read_text(encoding="utf-8").strip()))
        except UnicodeDecodeError as e:
            problems.append(Problem(caption, f"the caption is not UTF-8 text (byte {e.start})"))
    return examples, problems


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file the user named (a manifest, a prompts file); DataError naming it otherwise."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def manifest_examples(manifest: Path) -> tuple[list[Example], list[Problem]]:
    examples, problems = [], []
    lines = read_text_file(manifest, "the manifest").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = Path(f"{manifest}:{n}")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise DataError(f"{where}: expected an object with an \"image\" path and a \"caption\"")
        image = (manifest.parent / row["image"]).resolve()
        caption = row.get("caption")
        if not isinstance(caption, str):
            problems.append(Problem(image, f"no caption (manifest line {n})"))
        elif not image.is_file():
            problems.append(Problem(image, f"image not found (manifest line {n})"))
        else:
            examples.append(Example(image, caption.strip()))
    return examples, problems


def centre_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square, resized to size x size (bicubic)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def load_image(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) float32 in [-1, 1]. Raises DataError naming the file if it cannot be used: the checks
    and conversions of the pipeline's images (flashsd3/images.py: decompression bombs refused before
    decoding, 16-bit images scaled by their range)."""
    from ..images import ImageError, read_image, to_rgb

    try:
        im = to_rgb(read_image(path))  # decodes the whole file: truncated data fails here, not later
    except ImageError as e:
        raise DataError(f"{path}: {e.reason}") from None
    pixels = np.asarray(centre_crop_resize(im, size), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0


def check_resolution(resolution: int, multiple: int = 16) -> int:
    """Training resolution: a positive multiple of VAE downscale x patch size (16 for SD3)."""
    if resolution <= 0 or resolution % multiple:
        raise DataError(f"resolution must be a positive multiple of {multiple} (VAE 8 x patch 2), got {resolution}")
    return resolution
