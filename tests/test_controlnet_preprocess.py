"""Control-image helpers: our pure-torch Canny against OpenCV's cv2.Canny itself, blur / tile, the CLI."""
import numpy as np
import pytest
import torch
from PIL import Image

from flashsd3.controlnet.preprocess import blur, canny, canny_torch, main, tile
from helpers_controlnet import one_thread  # noqa: F401 (autouse fixture: single-threaded)


def smooth(h, w, channels, seed):
    """A photo-like uint8 image: a bicubic-upsampled random field (soft edges, every gradient direction)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(1, channels, h // 8, w // 8, generator=g, dtype=torch.float64)
    f = torch.nn.functional.interpolate(f, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return (f[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


IMAGES = {
    "rgb": smooth(96, 128, 3, 0),  # colour: OpenCV keeps each pixel's channel of largest gradient
    "gray": smooth(64, 80, 1, 1)[..., 0],
    "noise": np.random.default_rng(2).integers(0, 256, (40, 56, 3), dtype=np.uint8),  # ties and borders everywhere
}


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("low, high", [(100, 200), (20, 60), (150.7, 80.2)])  # swapped and fractional thresholds
def test_torch_canny_equals_opencv(name, low, high):
    cv2 = pytest.importorskip("cv2", reason="OpenCV is the Canny reference (opencv-python-headless, test extra)")
    image = IMAGES[name]
    ours = canny_torch(torch.from_numpy(image.copy()), low, high).numpy()
    ref = cv2.Canny(image, low, high)
    assert ref.any() and (ref == 0).any()
    assert np.array_equal(ours, ref), f"{(ours != ref).sum()} of {ref.size} pixels differ"


def test_canny_blur_tile_keep_the_size():
    im = Image.fromarray(IMAGES["rgb"])
    for out in (canny(im), blur(im, 3), tile(im, 4)):
        assert out.size == im.size and out.mode == "RGB"
    edges = np.asarray(canny(im))
    assert set(np.unique(edges)) <= {0, 255} and (edges[..., 0] == edges[..., 2]).all()
    assert np.abs(np.asarray(tile(im, 4)).astype(int) - IMAGES["rgb"]).mean() > 0  # detail is lost


def test_cli_writes_and_refuses(tmp_path, capsys):
    src, out = tmp_path / "in.png", tmp_path / "edges.png"
    Image.fromarray(IMAGES["rgb"]).save(src)
    assert main(["canny", str(src), str(out)]) == 0 and Image.open(out).size == (128, 96)
    assert main(["blur", str(src), str(out)]) == 2  # exists
    assert "not overwriting" in capsys.readouterr().err
    (tmp_path / "bad.png").write_text("not an image")
    assert main(["tile", str(tmp_path / "bad.png"), str(tmp_path / "t.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err and not (tmp_path / "t.png").exists()
