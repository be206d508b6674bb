"""Pipeline arguments from Python: each bad one is a ValueError naming it, before any model call; the recipe
machinery and the randomness contract (image k from seed + k alone) on the demo pipeline (no diffusers)."""
import pytest
import torch
from PIL import Image

from flashsd3.pipeline import FlashSD3Pipeline, PerImageNoise
from flashsd3.recipes import RECIPES

S = 32  # the demo's factor is 16 (VAE 8 x patch 2)
KW = {"height": S, "width": S, "num_steps": 1, "output_type": "latent"}


@pytest.fixture(scope="module")
def pipe():
    return FlashSD3Pipeline.demo(seed=0)


@pytest.mark.parametrize("kw, match", [
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive int, got int 0"),
    ({"num_images_per_prompt": 1.0}, "num_images_per_prompt must be a positive int"),
    ({"prompt": 3}, "prompt must be a string or a non-empty list of strings, got int 3"),
    ({"prompt": ["a", None]}, "prompt must be a string or a non-empty list"),
    ({"prompt": []}, "prompt must be a string or a non-empty list"),
    ({"seed": 1.5}, "seed must be an int or a list of ints, got float 1.5"),
    ({"seed": "7"}, "seed must be an int or a list of ints, got str '7'"),
    ({"seed": -1}, r"seed must be an int in \[0, 2\*\*64 - 1\] .* got -1"),
    ({"seed": 2**64}, r"got 18446744073709551616"),
    ({"seed": 2**64 - 1, "num_images_per_prompt": 2}, r"image 1 would need 18446744073709551616\), got 184467440737"),
    ({"seed": [1, 2.0]}, r"seed list entries must be ints in \[0, 2\*\*64\), got 2.0"),
    ({"seed": [1, 2]}, "2 seeds for 1 images"),
    ({"seed": 1, "generator": torch.Generator()}, "seed or generator"),
    ({"guidance": float("nan")}, "guidance must be a finite number, got nan"),
    ({"num_steps": 0}, "num_steps must be a positive int"),
    ({"sampler": "ddim"}, "sampler must be one of flash, flash_initial, euler, dpmpp_2m"),
    ({"recipe": "sd4"}, "recipe must be a Recipe or one of"),
    ({"guidance": 7.0, "skip_guidance_layers": [2]}, r"skip_guidance_layers \[2\] beyond the model's 2 joint blocks"),
    ({"skip_layer_guidance_scale": 3.0}, "skip_layer_guidance_scale need skip_guidance_layers"),
    ({"num_steps": 10**12}, "num_steps must be an int from 1 to 10000, got 1000000000000"),  # no allocation
    ({"guidance": 5.0, "skip_guidance_layers": [1], "num_steps": 4},
     r"skip-layer guidance on skip_layer_guidance_start 0.01 .. skip_layer_guidance_stop 0.2 guides no step of 4 "
     r"\(step i is guided when 4 x 0.01 < i < 4 x 0.2\): give num_steps >= 6, a wider window, or "
     r"skip_guidance_layers=\[\] to turn it off"),
    ({"strength": 0.5}, "strength needs an image"),
    ({"mask": Image.new("L", (S, S))}, "mask needs an image"),
    ({"prompt_embeds": (torch.zeros(1, 2, 32), torch.zeros(1, 24))}, "give prompt or prompt_embeds, not both"),
])
def test_bad_arguments(pipe, kw, match):
    kw = {"prompt": "a cat", **KW, **kw}
    with pytest.raises(ValueError, match=match):
        pipe(kw.pop("prompt"), **kw)


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_bad_strength(pipe, strength):
    with pytest.raises(ValueError, match="strength must be"):
        pipe.img2img("a cat", Image.new("RGB", (S, S)), strength=strength, **KW)


def test_edit_errors_name_the_argument_passed(pipe):
    """The argument the caller got wrong is the one named: a missing mask is not a silent whole-image repaint,
    a missing image is not a complaint about strength, a strength too small for one step is not about sigmas."""
    im = Image.new("RGB", (S, S))
    with pytest.raises(ValueError, match=r"inpaint needs a mask \(white = repaint, black = keep\), got mask=None"):
        pipe.inpaint("a cat", im, None, **KW)
    with pytest.raises(ValueError, match=r"inpaint needs an image .*got image=None"):
        pipe.inpaint("a cat", None, Image.new("L", (S, S)), **KW)
    with pytest.raises(ValueError, match=r"img2img needs an image .*got image=None"):
        pipe.img2img("a cat", image=None, **KW)
    with pytest.raises(ValueError, match=r"strength 1e-20 leaves no step of the 4-step schedule: an edit starts at "
                                         r"step int\(n - n x strength\) .*, here 4 of 4 num_steps; give a larger "
                                         r"strength"):
        pipe.img2img("a cat", im, strength=1e-20, **{**KW, "num_steps": 4})
    with pytest.raises(ValueError, match=r"strength 1e-17 leaves no step of the 2-step schedule.* 2 of 2 sigmas steps"):
        pipe.img2img("a cat", im, strength=1e-17, sigmas=[1.0, 0.5, 0.0], **KW)
    with pytest.raises(ValueError, match=r"mask must be a PIL image or a tensor, got str \(read a file with "
                                         r"flashsd3.images.load_mask\)"):
        pipe.inpaint("a cat", im, "mask.png", **KW)
    with pytest.raises(ValueError, match=r"guides no step of 2 \(the steps strength 0.5 runs of 4\)"):
        pipe.img2img("a cat", im, strength=0.5, guidance=5.0, skip_guidance_layers=[1], **{**KW, "num_steps": 4})


def test_bad_edit_inputs(pipe):
    im = Image.new("RGB", (S, S))
    with pytest.raises(ValueError, match=r"mask is 48x32 but the image is 32x32 \(width x height\)"):
        pipe.inpaint("a cat", im, Image.new("L", (48, 32)), **KW)
    with pytest.raises(ValueError, match="is not a single-channel image"):
        pipe.inpaint("a cat", im, Image.new("RGB", (S, S), (255, 0, 0)), **KW)
    with pytest.raises(ValueError, match="image is 40x32 .* not a multiple of 16"):
        pipe.img2img("a cat", Image.new("RGB", (40, S)), num_steps=1, output_type="latent")  # no size: refused
    out = pipe.img2img("a cat", Image.new("RGB", (40, S)), **KW)  # a size: resized to it
    assert out.latents.shape == (1, 4, S // 8, S // 8)
    with pytest.raises(ValueError, match="3 images for 2 outputs"):
        pipe.img2img(["a", "b"], [im, im, im], **KW)


def test_image_k_is_seed_plus_k_alone_in_every_task(pipe):
    """One source of randomness: image k's noise, posterior draw and re-noise come from seed + k only."""
    im, mask = Image.new("RGB", (S, S), (200, 30, 60)), Image.new("L", (S, S), 255)
    tasks = {"txt2img": lambda **kw: pipe(**kw), "img2img": lambda **kw: pipe.img2img(image=im, **kw),
             "inpaint": lambda **kw: pipe.inpaint(image=im, mask=mask, **kw)}
    for name, task in tasks.items():
        both = task(prompt=["a cat", "a dog"], seed=5, height=S, width=S, num_steps=3, output_type="latent")
        second = task(prompt="a dog", seed=6, height=S, width=S, num_steps=3, output_type="latent")
        assert both.seeds == [5, 6]
        assert torch.allclose(both.latents[1:], second.latents, rtol=0, atol=1e-5), name  # batch 2 vs 1 kernels


def test_recipes_drive_the_call(pipe):
    calls = []
    pipe(prompt="a cat", recipe="sd3.5-large", num_steps=3, height=S, width=S, output_type="latent",
         callback=lambda i, x: calls.append(i))
    assert calls == [0, 1, 2]
    assert pipe.recipe == RECIPES["flash-sd3"] and pipe.shift == 3.0
    assert FlashSD3Pipeline(pipe.transformer, pipe.vae, None, recipe="sd3", shift=2.0).recipe.shift == 2.0
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    a = pipe("a cat", latents=latents, **{**KW, "num_steps": 2}, sampler="dpmpp_2m").latents
    b = pipe("a cat", latents=latents, **{**KW, "num_steps": 2}, sampler="euler").latents
    assert not torch.equal(a, b)


def test_per_image_noise_order():
    """Draws come in calls: image k's first draw, then its second, from generator seed + k."""
    noise = PerImageNoise([3, 4])
    first, second = noise.draw((2, 5)), noise.draw((2, 5))
    g = torch.Generator().manual_seed(4)
    assert torch.equal(first[1], torch.randn(5, generator=g)) and torch.equal(second[1], torch.randn(5, generator=g))
