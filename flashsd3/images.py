"""Images in and out of the pipeline: reading files, checking masks, the resize policy, tensor conversion.

Policy for the image of img2img/inpainting (and its mask):
  * without height/width the output has the image's size, which must then be a multiple of the model's
    factor (VAE downscale x patch size, 16 for SD3): another size is refused, naming the nearest sizes,
    because a silent resize or crop would change the picture the user asked to edit;
  * with height/width the image (and mask) are resized to that size, with Lanczos as diffusers'
    VaeImageProcessor does (an explicit request);
  * the mask must have the image's size (refused otherwise: they would not line up) and one channel:
    grayscale, 1-bit, or RGB whose three channels are equal; a mask with colour or transparency is refused.
Tensors are taken as they are: (3, H, W) or (B, 3, H, W) images in [0, 1], (H, W), (1, H, W) or (B, 1, H, W)
masks in [0, 1], already at the output size.
Mask preprocessing is diffusers' `StableDiffusion3InpaintPipeline.mask_processor` (grayscale, binarised at
0.5: white = repaint), then nearest-neighbour to the latent size (`prepare_mask_latents`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class ImageError(ValueError):
    """An image or mask that cannot be used; the message names the file or argument."""


def load_image(path: str | Path):
    """Read an image file as RGB (PIL). Raises ImageError naming the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except FileNotFoundError:
        raise ImageError(f"image {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"cannot read image {str(path)!r}: {e}") from None


def load_mask(path: str | Path):
    """Read a mask file as one channel (PIL mode "L"); see `as_mask` for what is accepted."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    try:
        with Image.open(path) as im:
            im.load()
            return as_mask(im, what=f"mask {str(path)!r}")
    except FileNotFoundError:
        raise ImageError(f"mask {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"cannot read mask {str(path)!r}: {e}") from None


def as_mask(im, what: str = "mask"):
    """A PIL image as a one-channel mask (mode "L"): grayscale and 1-bit as they are, RGB only if its
    channels are equal; an alpha channel must be fully opaque (it would otherwise be a second mask)."""
    if im.mode in ("L", "1"):
        return im.convert("L")
    if im.mode in ("I", "I;16", "F"):
        raise ImageError(f"{what}: {im.mode} (high bit depth) masks are not supported; save it as 8-bit grayscale")
    rgba = np.asarray(im.convert("RGBA"))
    if (rgba[..., 3] != 255).any():
        raise ImageError(f"{what} has transparency ({im.mode}); save the mask as an opaque grayscale image "
                         "(white = repaint, black = keep)")
    if (rgba[..., 0] != rgba[..., 1]).any() or (rgba[..., 1] != rgba[..., 2]).any():
        raise ImageError(f"{what} is not a single-channel image: its {im.mode} channels differ; save it as "
                         "grayscale (white = repaint, black = keep)")
    return im.convert("L")


def output_size(image, height: int | None, width: int | None, factor: int) -> tuple[int, int]:
    """(height, width) of an edit: the given size, else the image's own (refused if not a multiple of factor)."""
    h, w = image_size(image)
    if height is None and width is None:
        if h % factor or w % factor:
            raise ImageError(
                f"image is {w}x{h} (width x height), not a multiple of {factor}: pass width and height to resize it "
                f"(e.g. {max(factor, w // factor * factor)}x{max(factor, h // factor * factor)}), or crop it")
        return h, w
    if height is None or width is None:
        raise ValueError("give both height and width (to resize the image), or neither (keep its size)")
    return height, width


def image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image, a list of equal-size ones, or an image tensor (..., H, W)."""
    if isinstance(image, (list, tuple)) and image:
        sizes = {image_size(im) for im in image}
        if len(sizes) > 1:
            raise ImageError(f"images of different sizes {sorted(sizes)}: give images of one size")
        return sizes.pop()
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    if hasattr(image, "size") and hasattr(image, "mode"):
        return image.size[1], image.size[0]
    raise ImageError(f"image must be a PIL image or a tensor, got {type(image).__name__}")


def preprocess_image(images, height: int, width: int) -> torch.Tensor:
    """PIL image(s) or a [0, 1] tensor -> (B, 3, height, width) float32 in [-1, 1] (VaeImageProcessor)."""
    if isinstance(images, torch.Tensor):
        x = images[None] if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ImageError(f"image tensor must be (3, H, W) or (B, 3, H, W), got {tuple(images.shape)}")
        _check_tensor(x, height, width, "image")
        return x.float() * 2 - 1
    pil = images if isinstance(images, (list, tuple)) else [images]
    arrays = [np.asarray(_resized(im.convert("RGB"), height, width), dtype=np.float32) / 255.0 for im in pil]
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
    if image_size(image) != image_size(mask):
        (ih, iw), (mh, mw) = image_size(image), image_size(mask)
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
