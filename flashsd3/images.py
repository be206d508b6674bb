"""Images in and out of the pipeline: reading files, checking masks, the resize policy, tensor conversion.

Policy for the image of img2img/inpainting (and its mask):
  * without height/width the output has the image's size, which must then be a multiple of the model's
    factor (VAE downscale x patch size, 16 for SD3): another size is refused, naming the nearest sizes,
    because a silent resize or crop would change the picture the user asked to edit;
  * with height/width the image (and mask) are resized to that size, with Lanczos as diffusers'
    VaeImageProcessor does (an explicit request);
  * the mask must have the image's size (refused otherwise: they would not line up) and one channel:
    grayscale, 1-bit, or RGB whose three channels are equal; a mask with colour or transparency is refused.
Files are checked before they are decoded (a regular file, at most MAX_PIXELS pixels by its header); 16-bit
and float grayscale images are converted by their range, not clipped (`to_rgb`).
Tensors are taken as they are: (3, H, W) or (B, 3, H, W) images in [0, 1], (H, W), (1, H, W) or (B, 1, H, W)
masks in [0, 1], already at the output size.
Mask preprocessing is diffusers' `StableDiffusion3InpaintPipeline.mask_processor` (grayscale, binarised at
0.5: white = repaint), then nearest-neighbour to the latent size (`prepare_mask_latents`).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .rules import edit_size

# Pillow's own DecompressionBombError threshold at its default setting (2 x Image.MAX_IMAGE_PIXELS, about
# 0.5 GB as RGB), kept here so the guard holds when a program has changed or disabled Pillow's.
MAX_PIXELS = 178_956_970
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # unsigned 16-bit grayscale (16-bit PNG / TIFF)


class ImageError(ValueError):
    """An image or mask that cannot be used; the message names the file or argument. `reason` is the
    message without the file, for callers that name it their own way (training data)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason if reason is not None else message


def read_image(path: str | Path, what: str = "image"):
    """Decode an image file into a PIL image of the file's mode, checked before decoding: a regular file
    whose header claims at most MAX_PIXELS pixels (a PNG header can claim 10^10 in a few bytes)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        reason = "does not exist" if not os.path.lexists(path) else f"is not a file ({_kind(path)})"
        raise ImageError(f"{what} {str(path)!r} {reason}", reason)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked below
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                reason = (f"its header claims {w}x{h} = {w * h:,} pixels, over the limit of {MAX_PIXELS:,} (a "
                          "decompression bomb, or an image too large to use); refused before decoding")
                raise ImageError(f"{what} {str(path)!r}: {reason}", reason)
            im.load()
            return im.copy()
    except Image.DecompressionBombError as e:  # Pillow's own check, in Image.open
        raise ImageError(f"{what} {str(path)!r}: refused before decoding: {e}", f"refused before decoding: {e}") \
            from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        if isinstance(e, ImageError):
            raise
        reason = f"unreadable image ({type(e).__name__}: {e})"
        raise ImageError(f"cannot read {what} {str(path)!r}: {e}", reason) from None


def load_image(path: str | Path):
    """Read an image file as RGB (PIL); see `read_image` for the checks and `to_rgb` for the conversion.
    Raises ImageError naming the file."""
    path = Path(path).expanduser()
    return to_rgb(read_image(path), f"image {str(path)!r}")


def load_mask(path: str | Path):
    """Read a mask file as one channel (PIL mode "L"); see `as_mask` for what is accepted."""
    path = Path(path).expanduser()
    return as_mask(read_image(path, "mask"), what=f"mask {str(path)!r}")


def to_rgb(im, what: str = "image"):
    """A PIL image as 8-bit RGB. 16-bit and 32-bit grayscale are scaled by their range (`to_8bit`), not
    clipped at 255 as Pillow's convert would (a 16-bit image would come out almost white); modes Pillow
    cannot convert are refused by name. Transparency is dropped (the colour channels are kept)."""
    if im.mode == "RGB":
        return im
    if im.mode in (*SIXTEEN_BIT, "I", "F"):
        return to_8bit(im, what).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{what}: mode {im.mode} cannot be converted to RGB ({e}); save it as 8-bit RGB",
                         f"mode {im.mode} cannot be converted to RGB ({e})") from None


def to_8bit(im, what: str = "image"):
    """A high-bit-depth grayscale PIL image as 8-bit ("L") by its range: 16-bit (I;16*) and 32-bit integer
    ("I", what Pillow gives 16-bit PNG/TIFF files in some versions) over 0..65535, float ("F") over 0..1,
    rounded to the nearest level (65535 -> 255, 257 * k -> k). Values outside that range are refused:
    their scale cannot be known."""
    from PIL import Image

    a = np.asarray(im)
    if im.mode == "F":
        top, what_range = 1.0, "0..1 for a float image"
        ok = bool(np.isfinite(a).all()) and a.min(initial=0) >= 0 and a.max(initial=0) <= 1
    else:
        top, what_range = 65535.0, "0..65535 for a 16/32-bit integer image"
        ok = a.min(initial=0) >= 0 and a.max(initial=0) <= 65535
    if not ok:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        reason = (f"{im.mode} image with values {lo:g}..{hi:g}, outside {what_range}: its scale is unknown; "
                  "save it as 8- or 16-bit")
        raise ImageError(f"{what}: {reason}", reason)
    return Image.fromarray(np.rint(a.astype(np.float64) * (255.0 / top)).astype(np.uint8), mode="L")


def _kind(path: Path) -> str:
    return "a folder" if path.is_dir() else "a device, pipe or socket"


def as_mask(im, what: str = "mask"):
    """A PIL image as a one-channel mask (mode "L"): grayscale and 1-bit as they are, 16-bit and float
    grayscale by their range (`to_8bit`), RGB only if its channels are equal; an alpha channel must be
    fully opaque (it would otherwise be a second mask)."""
    if im.mode in ("L", "1"):
        return im.convert("L")
    if im.mode in (*SIXTEEN_BIT, "I", "F"):
        return to_8bit(im, what)
    try:
        rgba = np.asarray(im.convert("RGBA"))
    except ValueError as e:
        raise ImageError(f"{what}: mode {im.mode} cannot be read as a mask ({e}); save it as 8-bit grayscale") \
            from None
    if (rgba[..., 3] != 255).any():
        raise ImageError(f"{what} has transparency ({im.mode}); save the mask as an opaque grayscale image "
                         "(white = repaint, black = keep)")
    if (rgba[..., 0] != rgba[..., 1]).any() or (rgba[..., 1] != rgba[..., 2]).any():
        raise ImageError(f"{what} is not a single-channel image: its {im.mode} channels differ; save it as "
                         "grayscale (white = repaint, black = keep)")
    return im.convert("L")


def output_size(image, height: int | None, width: int | None, factor: int) -> tuple[int, int]:
    """(height, width) of an edit: the given size, else the image's own (`rules.edit_size`)."""
    return edit_size(image_size(image), height, width, factor)


def image_size(image, what: str = "image") -> tuple[int, int]:
    """(height, width) of a PIL image, a list of equal-size ones, or an image tensor (..., H, W)."""
    if isinstance(image, (list, tuple)) and image:
        sizes = {image_size(im, what) for im in image}
        if len(sizes) > 1:
            raise ImageError(f"{what}s of different sizes {sorted(sizes)}: give {what}s of one size")
        return sizes.pop()
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    if hasattr(image, "size") and hasattr(image, "mode"):
        return image.size[1], image.size[0]
    hint = f" (read a file with flashsd3.images.load_{'mask' if what == 'mask' else 'image'})" \
        if isinstance(image, (str, Path)) else ""
    raise ImageError(f"{what} must be a PIL image or a tensor, got {type(image).__name__}{hint}")


def preprocess_image(images, height: int, width: int) -> torch.Tensor:
    """PIL image(s) or a [0, 1] tensor -> (B, 3, height, width) float32 in [-1, 1] (VaeImageProcessor)."""
    if isinstance(images, torch.Tensor):
        x = images[None] if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ImageError(f"image tensor must be (3, H, W) or (B, 3, H, W), got {tuple(images.shape)}")
        _check_tensor(x, height, width, "image")
        return x.float() * 2 - 1
    pil = images if isinstance(images, (list, tuple)) else [images]
    arrays = [np.asarray(_resized(to_rgb(im), height, width), dtype=np.float32) / 255.0 for im in pil]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2 - 1


def preprocess_mask(masks, height: int, width: int) -> torch.Tensor:
    """PIL mask(s) or a [0, 1] tensor -> (B, 1, height, width) float32 of 0 (keep) and 1 (repaint)."""
    if isinstance(masks, torch.Tensor):
        m = masks.reshape(1, 1, *masks.shape) if masks.ndim == 2 else masks[None] if masks.ndim == 3 else masks
        if m.ndim != 4 or m.shape[1] != 1:
            raise ImageError(f"mask tensor must be (H, W), (1, H, W) or (B, 1, H, W), got {tuple(masks.shape)}")
        _check_tensor(m, height, width, "mask")
        m = m.float()
    else:
        pil = masks if isinstance(masks, (list, tuple)) else [masks]
        arrays = [np.asarray(_resized(as_mask(im), height, width), dtype=np.float32) / 255.0 for im in pil]
        m = torch.from_numpy(np.stack(arrays))[:, None]
    return (m >= 0.5).float()  # diffusers' binarize: < 0.5 -> 0, else 1


def check_mask_matches(image, mask) -> None:
    """The mask must cover the image pixel for pixel (before any resize)."""
    if image_size(image) != image_size(mask, "mask"):
        (ih, iw), (mh, mw) = image_size(image), image_size(mask, "mask")
        raise ImageError(f"mask is {mw}x{mh} but the image is {iw}x{ih} (width x height): they must be the same size")


def mask_to_latents(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) pixel mask -> (B, 1, h, w), nearest neighbour (diffusers prepare_mask_latents)."""
    return F.interpolate(mask, size=latent_hw)


def _resized(im, height: int, width: int):
    from PIL import Image

    return im if im.size == (width, height) else im.resize((width, height), resample=Image.LANCZOS)


def _check_tensor(x: torch.Tensor, height: int, width: int, what: str) -> None:
    if tuple(x.shape[-2:]) != (height, width):
        raise ImageError(f"{what} tensor is {x.shape[-1]}x{x.shape[-2]} (width x height), the output "
                         f"{width}x{height}: resize tensors before passing them")
    if not x.is_floating_point() or not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ImageError(f"{what} tensor must be floating point with values in [0, 1]")
