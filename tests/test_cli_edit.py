"""flashsd3-sample with recipes, img2img, inpainting and skip-layer guidance, on the offline demo model.

The runs call `cli.main(argv)` in-process (a fresh interpreter costs seconds of imports) and compare each
PNG with the pipeline called directly with the settings the flags stand for: same weights (demo seed 0),
same per-image seed, same batch of one, same process, so the pixels must be equal bit for bit. The bad
inputs of these flags are in tests/test_cli.py's table.
"""
import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flashsd3 import cli
from flashsd3.config import DEMO, SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM
from flashsd3.preflight import model_config
from flashsd3.recipes import RECIPES, override
from flashsd3.settings import run_recipe

PROMPT = "a lighthouse at dusk"
KEYS = ("recipe", "sampler", "steps", "guidance", "shift", "strength", "image", "mask", "slg_layers", "slg_scale",
        "slg_start", "slg_stop")


@pytest.fixture(scope="module")
def demo_pipe():
    from flashsd3.pipeline import FlashSD3Pipeline

    return FlashSD3Pipeline.demo(seed=0)  # the CLI's demo weights


@pytest.fixture()
def files(tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    mask = np.zeros((64, 80), np.uint8)
    mask[16:48, 24:64] = 255  # white = repaint
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path


def sample(tmp: Path, *flags) -> tuple[np.ndarray, dict, dict]:
    """Run the CLI with --json; (pixels, PNG text, sidecar) of its one image."""
    argv = ["--demo", "--prompt", PROMPT, "--seed", "3", "--json", "--out", str(tmp / "out"), "--dtype", "fp32",
            *map(str, flags)]  # float32 as demo_pipe: the pixels are compared bit for bit
    assert cli.main(argv) == 0
    [png] = sorted((tmp / "out").glob("*.png"))
    with Image.open(png) as im:
        pixels, text = np.asarray(im.convert("RGB")), dict(im.text)
    return pixels, text, json.loads(png.with_suffix(".json").read_text(encoding="utf-8"))


def test_img2img_with_an_slg_recipe_equals_the_pipeline(files, demo_pipe):
    """--recipe and every override reach the pipeline; the output takes the image's size (80x64)."""
    pixels, text, meta = sample(files, "--image", files / "img.png", "--strength", "0.8", "--recipe",
                                "sd3.5-medium-slg", "--steps", "6", "--slg-layers", "1", "--slg-stop", "0.6",
                                "--slg-scale", "3", "--shift", "2")
    expected = {"recipe": "sd3.5-medium-slg", "sampler": "dpmpp_2m", "steps": 6, "guidance": 4.0, "shift": 2.0,
                "strength": 0.8, "image": str(files / "img.png"), "mask": None, "slg_layers": [1],
                "slg_scale": 3.0, "slg_start": 0.01, "slg_stop": 0.6}
    assert {k: meta[k] for k in KEYS} == expected
    assert {k: text[k] for k in KEYS} == {k: json.dumps(v) if not isinstance(v, str) else v
                                          for k, v in expected.items()}
    assert (meta["width"], meta["height"]) == (80, 64) and pixels.shape == (64, 80, 3)
    recipe = override(RECIPES["sd3.5-medium-slg"], steps=6, shift=2.0, skip_guidance_layers=[1],
                      skip_layer_guidance_stop=0.6, skip_layer_guidance_scale=3.0)
    image = Image.open(files / "img.png")
    ref = demo_pipe.img2img(PROMPT, image, strength=0.8, recipe=recipe, seed=3).images[0]
    assert np.array_equal(pixels, np.asarray(ref))
    # SLG ran (steps 1..3 of 4 run here): without it the image differs
    plain = demo_pipe.img2img(PROMPT, image, strength=0.8, recipe=override(recipe, skip_guidance_layers=[]),
                              seed=3).images[0]
    assert not np.array_equal(pixels, np.asarray(plain))


def test_inpainting_resized_equals_the_pipeline(files, demo_pipe):
    """--mask with --height/--width: image and mask resized (Lanczos) by the pipeline; strength 1 by default."""
    pixels, text, meta = sample(files, "--image", files / "img.png", "--mask", files / "mask.png",
                                "--height", "48", "--width", "48")
    assert {k: meta[k] for k in KEYS} == {
        "recipe": "flash-sd3", "sampler": "flash", "steps": 4, "guidance": 0.0, "shift": 3.0, "strength": 1.0,
        "image": str(files / "img.png"), "mask": str(files / "mask.png"), "slg_layers": None, "slg_scale": None,
        "slg_start": None, "slg_stop": None}
    assert text["mask"] == str(files / "mask.png") and text["slg_layers"] == "null"
    assert pixels.shape == (48, 48, 3)
    ref = demo_pipe.inpaint(PROMPT, Image.open(files / "img.png"), Image.open(files / "mask.png"), height=48,
                            width=48, seed=3).images[0]
    assert np.array_equal(pixels, np.asarray(ref))


def test_txt2img_records_the_recipe(files, demo_pipe):
    pixels, _, meta = sample(files, "--sampler", "euler", "--guidance", "2.5", "--height", "32", "--width", "48")
    assert {k: meta[k] for k in KEYS} == {
        "recipe": "flash-sd3", "sampler": "euler", "steps": 4, "guidance": 2.5, "shift": 3.0, "strength": None,
        "image": None, "mask": None, "slg_layers": None, "slg_scale": None, "slg_start": None, "slg_stop": None}
    ref = demo_pipe(PROMPT, height=32, width=48, sampler="euler", guidance=2.5, seed=3).images[0]
    assert np.array_equal(pixels, np.asarray(ref))


def test_recipe_of_a_hub_model_is_resolved_after_loading(files, monkeypatch, capsys):
    """A hub id other than SD3-medium's has no config before the download: its recipe and skip layers are
    checked once the model is loaded (stood in for by the demo model here)."""
    monkeypatch.setattr(cli, "model_config", lambda model, demo: None)
    assert cli.main(["--demo", "--prompt", "x", "--guidance", "5", "--slg-layers", "2", "--height", "32", "--width",
                     "32", "--out", str(files / "bad")]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("flashsd3-sample: error:")]
    assert errors == ["flashsd3-sample: error: --slg-layers [2] beyond the model's 2 joint blocks (0..1)"]
    assert not list((files / "bad").iterdir())  # the folder was created before loading; no file in it
    _, _, meta = sample(files, "--guidance", "5", "--slg-layers", "1", "--slg-stop", "0.6", "--height", "32",
                        "--width", "32")  # the default 0.01..0.2 window holds none of 4 steps: refused
    assert (meta["recipe"], meta["guidance"], meta["slg_layers"]) == ("flash-sd3", 5.0, [1])


def flags(*argv) -> Namespace:
    return cli.build_parser().parse_args(["--prompt", "x", *argv])


def test_default_recipe_follows_the_model():
    """The recipe the pipeline picks (recipes.default_recipe); flags override only what they set."""
    assert run_recipe(flags(), SD3_MEDIUM, adapters=True).name == "flash-sd3"
    assert run_recipe(flags("--lora", "none"), SD3_MEDIUM, adapters=False) == RECIPES["sd3"]  # euler 28, CFG 7
    assert run_recipe(flags(), SD35_MEDIUM, adapters=False) == RECIPES["sd3.5-medium"]
    assert run_recipe(flags(), SD35_LARGE, adapters=True) == RECIPES["sd3.5-large"]  # no Flash LoRA for SD3.5
    assert run_recipe(flags("--demo"), DEMO, adapters=False) == RECIPES["flash-sd3"]  # as Pipeline.demo
    rec = run_recipe(flags("--steps", "30", "--slg-layers", "7,8,9"), SD35_MEDIUM, adapters=False)
    assert (rec.name, rec.sampler, rec.steps, rec.guidance, rec.slg.layers, rec.slg.scale) == \
        ("sd3.5-medium", "dpmpp_2m", 30, 5.0, (7, 8, 9), 2.8)  # diffusers' scale when the recipe has none
    off = run_recipe(flags("--recipe", "sd3.5-medium-slg", "--slg-layers", "none"), SD35_MEDIUM, adapters=False)
    assert off.slg is None and off.guidance == 4.0
    assert model_config("stabilityai/stable-diffusion-3-medium-diffusers", demo=False) == SD3_MEDIUM
    assert model_config("someone/another-model", demo=False) is None  # known once downloaded
