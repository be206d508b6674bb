"""flashsd3/images.py: reading images and masks, the resize-or-refuse policy, diffusers' preprocessing."""
import numpy as np
import pytest
import torch
from PIL import Image

from flashsd3.images import (
    ImageError,
    load_image,
    load_mask,
    mask_to_latents,
    output_size,
    preprocess_image,
    preprocess_mask,
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
    with pytest.raises(ImageError, match=r"image is 100x60 .* not a multiple of 16: pass width and height to "
                                         r"resize it \(e.g. 96x48\)"):
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
