"""flashsd3/images.py: reading images and masks, the resize-or-refuse policy, diffusers' preprocessing."""
import numpy as np
import pytest
import torch
from PIL import Image

from flashsd3.images import (
    ImageError,
    as_mask,
    load_image,
    load_mask,
    mask_to_latents,
    output_size,
    preprocess_image,
    preprocess_mask,
    to_rgb,
)


def save(tmp_path, name, array, mode=None):
    path = tmp_path / name
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_load_image_and_its_errors(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    im = load_image(save(tmp_path, "a.png", rgb))
    assert im.mode == "RGB" and im.size == (32, 16) and np.array_equal(np.array(im), rgb)
    assert load_image(save(tmp_path, "g.png", rgb[..., 0])).mode == "RGB"  # grayscale -> RGB
    with pytest.raises(ImageError, match="image '.*missing.png' does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="cannot read image '.*bad.png'"):
        load_image(tmp_path / "bad.png")


def test_load_mask_one_channel_only(tmp_path):
    gray = np.zeros((16, 16), dtype=np.uint8)
    gray[4:8] = 255
    assert np.array_equal(np.array(load_mask(save(tmp_path, "m.png", gray))), gray)
    as_rgb = np.repeat(gray[..., None], 3, axis=2)  # a grayscale mask saved as RGB is fine
    assert np.array_equal(np.array(load_mask(save(tmp_path, "rgb.png", as_rgb))), gray)
    colour = as_rgb.copy()
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(ImageError, match="mask '.*c.png' is not a single-channel image"):
        load_mask(save(tmp_path, "c.png", colour))
    rgba = np.concatenate([as_rgb, np.full((16, 16, 1), 128, np.uint8)], axis=2)
    with pytest.raises(ImageError, match="has transparency"):
        load_mask(save(tmp_path, "t.png", rgba))
    with pytest.raises(ImageError, match="mask '.*nope.png' does not exist"):
        load_mask(tmp_path / "nope.png")


def test_size_policy():
    im = Image.new("RGB", (96, 64))
    assert output_size(im, None, None, 16) == (64, 96)  # the image's own size
    assert output_size(im, 128, 128, 16) == (128, 128)  # asked: resized
    with pytest.raises(ValueError, match=r"image is 100x60 .* not a multiple of 16 for this model: pass width and "
                                         r"height to resize it \(nearest: width 96 or 112, height 48 or 64\)"):
        output_size(Image.new("RGB", (100, 60)), None, None, 16)
    with pytest.raises(ValueError, match="give both height and width"):
        output_size(im, 64, None, 16)


def test_preprocessing_as_diffusers():
    pytest.importorskip("diffusers", reason="diffusers is the reference (pip install .[test])")
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    mask = Image.fromarray(rng.integers(0, 256, (64, 96), dtype=np.uint8))
    images = VaeImageProcessor(vae_scale_factor=8)
    masks = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    for h, w in ((64, 96), (32, 48)):  # same size, and resized (Lanczos)
        assert torch.equal(preprocess_image(im, h, w), images.preprocess(im, height=h, width=w))
        assert torch.equal(preprocess_mask(mask, h, w), masks.preprocess(mask, height=h, width=w))
    m = preprocess_mask(torch.tensor([[0.2, 0.5], [0.7, 0.49]]), 2, 2)
    assert m.shape == (1, 1, 2, 2) and m.flatten().tolist() == [0, 1, 1, 0]
    assert mask_to_latents(torch.ones(1, 1, 8, 8), (2, 2)).shape == (1, 1, 2, 2)
    with pytest.raises(ImageError, match="image tensor is 8x8 .* the output 16x16"):
        preprocess_image(torch.rand(3, 8, 8), 16, 16)
    with pytest.raises(ImageError, match=r"values in \[0, 1\]"):
        preprocess_image(torch.rand(3, 8, 8) * 2 - 1, 8, 8)


# Hostile and high-bit-depth files ------------------------------------------------------------------------

def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    from helpers_files import bomb_png

    bomb = bomb_png(tmp_path / "bomb.png")  # header: 100000 x 100000
    for load, what in ((load_image, "image"), (load_mask, "mask")):
        with pytest.raises(ImageError, match=rf"{what} '.*bomb.png': refused before decoding.*10000000000 pixels"):
            load(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a program that switched Pillow's guard off
    with pytest.raises(ImageError, match=r"header claims 100000x100000 = 10,000,000,000 pixels, over the limit"):
        load_image(bomb)
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageError, match=r"image '.*folder.png' is not a file \(a folder\)"):
        load_image(tmp_path / "folder.png")


def test_high_bit_depth_images_by_their_range(tmp_path):
    """16-bit (I;16), 32-bit integer (I) and float (F) grayscale: scaled by their range, not clipped at 255
    (Pillow's convert would make v / 257 = 200 into 255: almost white)."""
    levels = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    eight = np.array(load_image(save(tmp_path, "l.png", levels)))
    sixteen = levels.astype(np.uint16) * 257  # the same levels in 16 bits
    png16 = save(tmp_path, "i16.png", sixteen)
    assert Image.open(png16).mode == "I;16"
    assert np.array_equal(np.array(load_image(png16)), eight)
    assert np.array_equal(np.array(load_mask(png16)), levels)
    for im in (Image.fromarray(sixteen.astype(np.int32)), Image.fromarray(levels.astype(np.float32) / 255)):
        assert im.mode in ("I", "F")
        assert np.array_equal(np.array(to_rgb(im)), eight), im.mode
    off = sixteen.astype(np.uint16) + 100  # not a multiple of 257: rounds to the nearest level
    assert np.array_equal(np.array(to_rgb(Image.fromarray(off)))[..., 0], np.rint(off / 257).astype(np.uint8))
    tensor = preprocess_image(Image.fromarray(sixteen), 16, 16)  # the Python API: PIL images as given
    assert torch.equal(tensor, preprocess_image(Image.fromarray(levels), 16, 16))


def test_high_bit_depth_values_of_unknown_scale_are_refused():
    with pytest.raises(ImageError, match=r"image: F image with values 0\.\.2, outside 0\.\.1 for a float image"):
        to_rgb(Image.fromarray(np.array([[0, 2]], np.float32)))
    with pytest.raises(ImageError, match=r"I image with values -5\.\.70000, outside 0\.\.65535"):
        to_rgb(Image.fromarray(np.array([[-5, 70000]], np.int32)))
    with pytest.raises(ImageError, match="values nan..nan"):
        as_mask(Image.fromarray(np.array([[np.nan]], np.float32)), "mask")
    with pytest.raises(ImageError, match="mode La cannot be converted to RGB"):
        to_rgb(Image.new("La", (2, 2)))
