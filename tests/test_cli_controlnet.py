"""flashsd3-sample --controlnet / --control-image on the offline demo model: the run equals the pipeline called
directly (same weights, seed, batch of one: bit for bit), composes with editing, records its metadata, and every
bad input is refused before a model is loaded or a folder created."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flashsd3 import cli
from flashsd3.controlnet import DEMO_CONTROLNET, ControlNet
from helpers_controlnet import one_thread, save_diffusers_folder  # noqa: F401 (autouse fixture: single-threaded)

PROMPT = "a lighthouse at dusk"
ERR = "flashsd3-sample: error: "


@pytest.fixture()
def files(tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    edges = np.zeros((64, 80), np.uint8)
    edges[20:44, 30] = edges[20, 30:60] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    mask = np.zeros((64, 80), np.uint8)
    mask[16:48, 24:64] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    (tmp_path / "bad.png").write_text("not an image")
    for name, cfg in (("wide_cn", replace(DEMO_CONTROLNET, num_heads=4)),
                      ("inpaint_cn", replace(DEMO_CONTROLNET, extra_channels=1))):
        save_diffusers_folder(ControlNet(cfg), tmp_path / name)
    return tmp_path


def sample(tmp: Path, *flags):
    argv = ["--demo", "--dtype", "fp32", "--prompt", PROMPT, "--seed", "3", "--json", "--out", str(tmp / "out"),
            *map(str, flags)]  # fp32: compared exactly with the pipeline's float32 default
    assert cli.main(argv) == 0
    [png] = sorted((tmp / "out").glob("*.png"))
    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB"))
    return pixels, json.loads(png.with_suffix(".json").read_text(encoding="utf-8"))


def test_controlnet_run_equals_the_pipeline(files):
    from flashsd3.demo import demo_controlnet
    from flashsd3.pipeline import FlashSD3Pipeline

    pixels, meta = sample(files, "--controlnet", "demo:0.7", "--control-image", files / "edges.png")
    assert pixels.shape == (64, 80, 3)  # the control image's size
    assert meta["controlnet"] == [{"source": "demo", "scale": 0.7, "control_image": str(files / "edges.png")}]
    pipe = FlashSD3Pipeline.demo(seed=0)  # the CLI's weights, called as the CLI calls it
    pipe.controlnets = [demo_controlnet(pipe.transformer)]
    edges = Image.open(files / "edges.png").convert("RGB")
    out = pipe([PROMPT], seed=[3], height=64, width=80, control_image=edges, controlnet_conditioning_scale=0.7)
    assert np.array_equal(pixels, np.asarray(out.images[0]))
    plain = pipe([PROMPT], seed=[3], height=64, width=80, output_type="latent").latents
    assert (out.latents - plain).abs().mean() > 1e-2  # the ControlNet changes the result


def test_controlnet_composes_with_inpainting_and_two_controlnets(files):
    pixels, meta = sample(files, "--image", files / "img.png", "--mask", files / "mask.png",
                          "--controlnet", "demo", "--control-image", files / "edges.png",
                          "--controlnet", "demo:0.5", "--control-image", files / "img.png")
    assert pixels.shape == (64, 80, 3) and [c["scale"] for c in meta["controlnet"]] == [1.0, 0.5]
    assert meta["mask"] == str(files / "mask.png")


BAD = {  # flags -> a fragment of the one error line
    "unpaired": (["--controlnet", "demo"], "1 --controlnet and 0 --control-image: give them in pairs"),
    "not an image": (["--controlnet", "demo", "--control-image", "{tmp}/bad.png"], "--control-image: cannot read"),
    "size mismatch": (["--image", "{tmp}/img.png", "--controlnet", "demo", "--control-image", "{tmp}/wide.png"],
                      "is 96x64, the output 80x64"),
    "not a multiple": (["--controlnet", "demo", "--control-image", "{tmp}/odd.png"], "80x60"),
    "another width": (["--controlnet", "{tmp}/wide_cn", "--control-image", "{tmp}/edges.png"],
                      "width (heads x head_dim) 32 does not match the transformer's 16"),
    "inpainting without mask": (["--controlnet", "{tmp}/inpaint_cn", "--control-image", "{tmp}/edges.png"],
                                "needs --image and --mask"),
    "bad scale": (["--controlnet", "demo:strong", "--control-image", "{tmp}/edges.png"],
                  "--controlnet demo:strong: the scale 'strong' is not a number"),
    "missing": (["--controlnet", "{tmp}/nowhere", "--control-image", "{tmp}/edges.png"], "no such file or folder"),
    "window counts": (["--controlnet", "demo", "--control-image", "{tmp}/edges.png", "--controlnet", "demo",
                       "--control-image", "{tmp}/img.png", "--control-end", "0.5", "--control-end", "1",
                       "--control-end", "1"], "--control-end given 3 times for 2 --controlnet"),
    "window outside": (["--controlnet", "demo", "--control-image", "{tmp}/edges.png", "--control-start", "1.5"],
                       "--control-start must be in [0, 1], got 1.5"),
    "window reversed": (["--controlnet", "demo", "--control-image", "{tmp}/edges.png", "--control-start", "0.6",
                         "--control-end", "0.4"], "--control-start 0.6 must be below --control-end 0.4"),
    "window without a step": (["--controlnet", "demo", "--control-image", "{tmp}/edges.png", "--control-start", "0.3",
                               "--control-end", "0.45"], "leaves it on for no step of 4"),
    "window without controlnet": (["--control-end", "0.5"], "--control-end given 1 times for 0 --controlnet"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_controlnet_input_exit_2_before_loading(case, files, capsys):
    flags, fragment = BAD[case]
    argv = ["--demo", "--prompt", PROMPT, "--out", str(files / "out")] + [f.format(tmp=files) for f in flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(ERR) and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (files / "out").exists()


def test_control_window_reaches_the_pipeline(files):
    """--control-start/--control-end are the pipeline's control_guidance_start/end, recorded in the metadata;
    once given, they apply to every ControlNet."""
    from flashsd3.demo import demo_controlnet
    from flashsd3.pipeline import FlashSD3Pipeline

    pixels, meta = sample(files, "--controlnet", "demo", "--control-image", files / "edges.png", "--control-end", "0.5")
    assert meta["controlnet"][0]["start"] == 0.0 and meta["controlnet"][0]["stop"] == 0.5
    pipe = FlashSD3Pipeline.demo(seed=0)
    pipe.controlnets = [demo_controlnet(pipe.transformer)]
    edges = Image.open(files / "edges.png").convert("RGB")
    out = pipe([PROMPT], seed=[3], height=64, width=80, control_image=edges, control_guidance_end=0.5)
    assert np.array_equal(pixels, np.asarray(out.images[0]))
    whole = pipe([PROMPT], seed=[3], height=64, width=80, control_image=edges)
    assert not np.array_equal(pixels, np.asarray(whole.images[0]))  # the window turned it off for steps 2, 3


def test_controlnet_demo_needs_demo(files, capsys):
    argv = ["--prompt", PROMPT, "--out", str(files / "out"), "--controlnet", "demo", "--control-image",
            str(files / "edges.png")]
    assert cli.main(argv) == 2 and "needs --demo" in capsys.readouterr().err


def test_demo_controlnet_leaves_the_global_rng_alone():
    from flashsd3.config import DEMO
    from flashsd3.demo import demo_controlnet
    from flashsd3.mmdit import MMDiT

    transformer = MMDiT(DEMO)
    state = torch.random.get_rng_state()
    a, b = demo_controlnet(transformer), demo_controlnet(transformer)
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(a.controlnet_blocks[0].weight, b.controlnet_blocks[0].weight)  # fixed weights
