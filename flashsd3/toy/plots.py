"""PNG figures drawn with PIL only (matplotlib is not a dependency): sample grids and a loss curve."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def image_grid(images: torch.Tensor, path: str | Path, *, columns: int = 12, scale: int = 4, pad: int = 2) -> None:
    """Save (n, 3, H, W) images in [-1, 1] as one PNG grid, each image upscaled `scale`x (nearest)."""
    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)
    H, W = h * scale + pad, w * scale + pad
    canvas = np.full((rows * H + pad, columns * W + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        tile = pixels[i].repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[pad + r * H : pad + r * H + h * scale, pad + c * W : pad + c * W + w * scale] = tile
    Image.fromarray(canvas).save(path)


def line_plot(series: dict[str, Sequence[float]], path: str | Path, *, title: str, xlabel: str = "step",
              log_y: bool = True, size: tuple[int, int] = (640, 400)) -> None:
    """A minimal line chart (one polyline per series, shared axes, min/max labels) saved as PNG."""
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    W, H = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    values = [np.asarray(v, dtype=np.float64) for v in series.values()]
    tf = (lambda a: np.log10(np.maximum(a, 1e-12))) if log_y else (lambda a: a)
    lo = min(float(tf(v).min()) for v in values)
    hi = max(float(tf(v).max()) for v in values)
    hi = hi if hi > lo else lo + 1
    n_max = max(len(v) for v in values)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for k, (name, v) in enumerate(zip(series, values)):
        xs = left + np.arange(len(v)) / max(n_max - 1, 1) * (W - left - right)
        ys = H - bottom - (tf(v) - lo) / (hi - lo) * (H - top - bottom)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colours[k % len(colours)], width=1)
        draw.text((left + 10, top + 5 + 14 * k), name, fill=colours[k % len(colours)])
    fmt = (lambda y: f"{10 ** y:.3g}") if log_y else (lambda y: f"{y:.3g}")
    draw.text((5, top), fmt(hi), fill="black")
    draw.text((5, H - bottom - 10), fmt(lo), fill="black")
    draw.text((left, H - bottom + 5), "0", fill="black")
    draw.text((W - right - 40, H - bottom + 5), str(n_max - 1), fill="black")
    draw.text((W // 2 - 20, H - bottom + 20), xlabel, fill="black")
    draw.text((left, 8), title + (" (log scale)" if log_y else ""), fill="black")
    img.save(path)
