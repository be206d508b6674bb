"""Images from requests (multipart files or base64 strings): size checked from the header before any
pixel is decoded (decompression bombs), formats limited to what PIL reads safely, masks converted from
each API's convention to the pipeline's (grayscale, white = repaint). Nothing here touches a file."""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from .errors import ApiError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def from_base64(text, what: str, status: int) -> bytes:
    """A base64 string (optionally a data: URL) -> bytes."""
    if not isinstance(text, str):
        raise ApiError(status, f"{what}: expected a base64 string, got {type(text).__name__}", param=what,
                       code="invalid_image")
    try:
        return base64.b64decode(DATA_URL.sub("", text.strip()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(status, f"{what}: not valid base64", param=what, code="invalid_image") from None


def open_image(data: bytes, what: str, max_pixels: int, status: int):
    """Decode an uploaded image (PIL, loaded) after checking its header's size against `max_pixels`."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(status, f"{what} is empty", param=what, code="invalid_image")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:  # PIL's own check of the header, past 2 x MAX_IMAGE_PIXELS
        raise ApiError(status, f"{what} is refused before decoding: {e}", param=what, code="image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ApiError(status, f"{what} is not a readable image ({', '.join(FORMATS)})", param=what,
                       code="invalid_image") from None
    w, h = im.size
    if w * h > max_pixels or w < 1 or h < 1:
        raise ApiError(status, f"{what} is {w}x{h} = {w * h} pixels; this server accepts uploads of at most "
                       f"{max_pixels} pixels (--max-upload-pixels)", param=what, code="image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ApiError(status, f"{what} is corrupt or truncated: {str(e)[:120]}", param=what,
                       code="invalid_image") from None
    return im


def rgb(im):
    return im if im.mode == "RGB" else im.convert("RGB")


def _alpha(im):
    """The alpha channel (PIL "L") if the image has transparency, else None."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").getchannel("A")
    return None


def openai_mask(im, status: int = 400):
    """OpenAI's mask: fully transparent pixels (alpha 0) are repainted -> white; the rest kept -> black."""
    alpha = _alpha(im)
    if alpha is None:
        raise ApiError(status, f"mask has no alpha channel ({im.mode}): OpenAI's mask marks the area to edit with "
                       "fully transparent pixels; send an RGBA or LA PNG", param="mask", code="invalid_mask")
    return alpha.point(lambda a: 255 if a == 0 else 0)


def a1111_mask(im, invert: bool):
    """A1111's mask: white = repaint (its `create_binary_mask`: the alpha channel if there is transparency,
    else the gray level, thresholded at 128); `inpainting_mask_invert` repaints the black part instead."""
    alpha = _alpha(im)
    gray = alpha if alpha is not None and alpha.getextrema() != (255, 255) else im.convert("L")
    return gray.point(lambda v: 0 if (v > 128) == invert else 255)
