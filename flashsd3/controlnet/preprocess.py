"""Control images from ordinary ones: Canny edges, a blur, a "tile" (low-resolution) version.

    python -m flashsd3.controlnet.preprocess canny photo.png edges.png --low 100 --high 200
    python -m flashsd3.controlnet.preprocess blur photo.png blurred.png --radius 8
    python -m flashsd3.controlnet.preprocess tile photo.png tile.png --factor 4

Canny uses OpenCV's `cv2.Canny` when `cv2` imports, else `canny_torch`, a pure-torch copy of its algorithm
(OpenCV imgproc/src/canny.cpp, aperture 3, L1 gradient): 3x3 Sobel with replicated borders; on a colour image each
pixel takes the channel of largest |dx| + |dy|; non-maximum suppression along the gradient quantised to 0/45/90/135
degrees with OpenCV's fixed-point tan(22.5) test and its tie rules; hysteresis: 8-connected pixels above `low`
reached from pixels above `high`. tests/test_controlnet_preprocess.py compares the two on photos-like and noisy
images (identical maps). Depth and pose estimators need weights of their own: give those control images ready-made.
Blur and tile are plain PIL resamplings: what the ControlNets were trained on is not published in detail.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TG22 = 13573  # round(tan(22.5 deg) * 2**15), OpenCV canny.cpp
CANNY_SHIFT = 15


def canny(image, low: float = 100, high: float = 200):
    """PIL image -> RGB PIL image of its Canny edges (white on black). OpenCV if installed, else `canny_torch`."""
    from PIL import Image

    arr = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    try:
        import cv2
    except ImportError:
        edges = canny_torch(torch.from_numpy(arr.copy()), low, high).numpy()
    else:
        edges = cv2.Canny(arr, low, high)
    return Image.fromarray(edges).convert("RGB")


def canny_torch(image: torch.Tensor, low: float = 100, high: float = 200) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) -> uint8 (H, W) edge map of 0 and 255, as cv2.Canny(image, low, high)."""
    img = image.to(torch.int64)
    img = img[..., None] if img.ndim == 2 else img
    dx, dy = _sobel(img.permute(2, 0, 1))  # (C, H, W) each
    mag = dx.abs() + dy.abs()
    best = mag.argmax(0, keepdim=True)  # the first channel of largest magnitude, as OpenCV's strict '<'
    dx, dy, mag = (t.gather(0, best)[0] for t in (dx, dy, mag))
    low, high = int(np.floor(min(low, high))), int(np.floor(max(low, high)))
    candidate = (mag > low) & _local_max(mag, dx, dy)
    return (_hysteresis(candidate, candidate & (mag > high)) * 255).to(torch.uint8)


def _sobel(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) int64 -> 3x3 Sobel dx, dy with replicated borders (OpenCV's BORDER_REPLICATE in Canny)."""
    p = F.pad(img[None].double(), (1, 1, 1, 1), mode="replicate")[0]
    smooth_y = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # (C, H, W + 2)
    smooth_x = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]  # (C, H + 2, W)
    return (smooth_y[:, :, 2:] - smooth_y[:, :, :-2]).long(), (smooth_x[:, 2:] - smooth_x[:, :-2]).long()


def _local_max(mag: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Non-maximum suppression with OpenCV's sectors and ties: strictly above the 'before' neighbour, at least the
    'after' one (horizontal, vertical), strictly above both diagonally. Outside the image the magnitude is 0."""
    m = F.pad(mag, (1, 1, 1, 1))
    H, W = mag.shape

    def at(di, dj):  # the neighbour (i + di, j + dj) of every pixel
        return m[1 + di:1 + di + H, 1 + dj:1 + dj + W]

    x, y = dx.abs(), dy.abs() << CANNY_SHIFT
    tg22x = x * TG22
    tg67x = tg22x + (x << (CANNY_SHIFT + 1))
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    same_sign = (dx ^ dy) >= 0  # OpenCV: s = (dx ^ dy) < 0 ? -1 : 1
    diagonal = torch.where(same_sign, (mag > at(-1, -1)) & (mag > at(1, 1)), (mag > at(-1, 1)) & (mag > at(1, -1)))
    return torch.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)),
                       torch.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)), diagonal))


def _hysteresis(candidate: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    """Grow `strong` through 8-connected `candidate` pixels until nothing changes."""
    edges, allowed = strong.float()[None, None], candidate.float()[None, None]
    while True:
        grown = F.max_pool2d(edges, 3, stride=1, padding=1) * allowed
        if torch.equal(grown, edges):
            return edges[0, 0].bool()
        edges = grown


def blur(image, radius: float = 8):
    """A Gaussian blur of `radius` pixels (PIL's GaussianBlur): a control image for blur / tile ControlNets."""
    from PIL import ImageFilter

    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius))


def tile(image, factor: float = 4):
    """The image at 1/factor of its size, brought back to its size (box down, bicubic up): the low-resolution
    input of tile / upscaling ControlNets. factor >= 1, not necessarily whole (A1111's tile_resample rate)."""
    from PIL import Image

    im = image.convert("RGB")
    small = im.resize((max(1, int(im.width / factor)), max(1, int(im.height / factor))), resample=Image.BOX)
    return small.resize(im.size, resample=Image.BICUBIC)


def main(argv: list[str] | None = None) -> int:
    from ..images import ImageError, load_image
    from ..outputs import OutputError, atomic_write, new_file_mode

    p = argparse.ArgumentParser(prog="python -m flashsd3.controlnet.preprocess", description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=("canny", "blur", "tile"))
    p.add_argument("image", type=Path)
    p.add_argument("out", type=Path, help="a new .png file (an existing one only with --overwrite)")
    p.add_argument("--low", type=float, default=100, help="canny: lower hysteresis threshold (default 100)")
    p.add_argument("--high", type=float, default=200, help="canny: upper threshold (default 200)")
    p.add_argument("--radius", type=float, default=8, help="blur: Gaussian radius in pixels (default 8)")
    p.add_argument("--factor", type=int, default=4, help="tile: downscale factor (default 4)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.out.exists() and not args.overwrite:
            raise OutputError(f"{args.out} exists; not overwriting it (use --overwrite)")
        if args.factor < 1 or args.radius < 0:
            raise OutputError("--factor must be >= 1 and --radius >= 0")
        image = load_image(args.image)
        out = {"canny": lambda: canny(image, args.low, args.high), "blur": lambda: blur(image, args.radius),
               "tile": lambda: tile(image, args.factor)}[args.kind]()
        atomic_write(args.out, lambda tmp: out.save(tmp, format="PNG"), args.overwrite, new_file_mode())
    except (ImageError, OutputError, OSError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
