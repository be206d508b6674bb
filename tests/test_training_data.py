"""Training data and the prepare cache (flashsd3/training/data.py, cache.py, cli.py `prepare`), on the demo model.

`flashsd3-train` is called in-process (`cli.main(argv)` returns the exit status), as tests/test_cli.py does for
its bad-input table; the runs themselves (torchrun, kill and resume) are in tests/test_training_runs.py.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flashsd3.training import cli
from flashsd3.training.cache import CachedData, posterior_samples
from flashsd3.training.data import (
    DataError,
    centre_crop_resize,
    find_examples,
    load_image,
)

ERR = "flashsd3-train: error:"
PX = 32  # demo VAE downscale 8 x patch 2 -> 2x2 tokens; small enough for seconds


def make_images(folder, n, captions=True, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (36 + 3 * i, 40, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
        if captions:
            (folder / f"img{i:02d}.txt").write_text(f"picture {i}, a red square\n", encoding="utf-8")
    return folder


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERR), lines
    return lines[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    data = make_images(root / "data", 6)
    code = cli.main(["prepare", "--demo", "--data", str(data), "--resolution", str(PX), "--out", str(root / "cache"),
                     "--shard-size", "4", "--batch-size", "3", "--negative-prompt", "blurry, deformed"])
    assert code == 0
    return root


def test_folder_manifest_and_crop(tmp_path):
    data = make_images(tmp_path / "d", 3)
    (data / "img01.txt").unlink()
    examples, problems = find_examples(data)
    assert [e.image.name for e in examples] == ["img00.png", "img02.png"]
    assert examples[0].caption == "picture 0, a red square"
    assert len(problems) == 1 and "img01.png" in str(problems[0]) and "no caption" in str(problems[0])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "d/img00.png", "caption": "x"}\n\n{"image": "d/img01.png"}\n', encoding="utf-8")
    examples, problems = find_examples(manifest)
    assert [e.caption for e in examples] == ["x"] and "manifest line 3" in str(problems[0])
    # centre crop: a 6x2 image whose middle 2x2 is white becomes all white at 2x2 and at 4x4
    im = np.zeros((2, 6, 3), np.uint8)
    im[:, 2:4] = 255
    assert (np.asarray(centre_crop_resize(Image.fromarray(im), 2)) == 255).all()
    x = load_image(data / "img00.png", 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="bad.png: unreadable image"):
        load_image(bad, 16)


def test_cache_round_trip(cache):
    """Each cached row equals the encoders applied to that example alone (latents: the seeded posterior sample)."""
    from flashsd3.pipeline import FlashSD3Pipeline

    data = CachedData(cache / "cache")
    assert len(data) == 6 and data.record["rows"] == [4, 2] and data.spec.resolution == PX
    pipe = FlashSD3Pipeline.demo(seed=0)
    latents, context, pooled = data.batch([4, 1])
    examples, _ = find_examples(cache / "data")
    with torch.no_grad():
        for row, i in enumerate([4, 1]):
            posterior = pipe.vae.encode(load_image(examples[i].image, PX)[None])
            expect = pipe.vae.vae_to_latents(posterior_samples(posterior, [i], seed=0))
            # batched (3 images) vs single-image VAE encoder: fp32 conv rounding, ~1e-6 here
            torch.testing.assert_close(latents[row:row + 1], expect, rtol=1e-5, atol=1e-5)
            ctx, pool = pipe.text_encoders.encode([examples[i].caption])  # 77 CLIP + 77 zero T5 tokens
            torch.testing.assert_close(context[row:row + 1], ctx, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pooled[row:row + 1], pool, rtol=1e-5, atol=1e-5)
    assert context.shape[1] == 154 and context[:, 77:].abs().max() == 0  # the Flash recipe's zero T5 slot
    empty_ctx, empty_pool, _ = data.prompt_file("empty.safetensors")
    ref_ctx, ref_pool = pipe.text_encoders.encode([""])
    torch.testing.assert_close(empty_ctx, ref_ctx, rtol=0, atol=0)  # same call, same batch of one: exact
    torch.testing.assert_close(empty_pool, ref_pool, rtol=0, atol=0)
    assert data.prompt_file("prompts.safetensors")[2] == [e.caption for e in examples[:4]]
    neg_ctx, neg_pool, neg = data.prompt_file("negative.safetensors")
    ref_ctx, ref_pool = pipe.text_encoders.encode(["blurry, deformed"])
    assert neg == ["blurry, deformed"] and torch.equal(neg_ctx, ref_ctx) and torch.equal(neg_pool, ref_pool)


def test_prepare_resumes_and_refuses_mismatch(cache, tmp_path, capsys):
    out = tmp_path / "c"
    args = ["prepare", "--demo", "--data", str(cache / "data"), "--resolution", str(PX), "--out", str(out),
            "--shard-size", "4"]
    assert cli.main(args) == 0
    first = load_file(str(out / "shard-00000.safetensors"))
    # an interrupted prepare: cache.json not yet complete, the second shard never written
    record = json.loads((out / "cache.json").read_text())
    (out / "cache.json").write_text(json.dumps({**record, "complete": False}))
    (out / "shard-00001.safetensors").unlink()
    os.utime(out / "shard-00000.safetensors", (1, 1))
    assert cli.main(args) == 0
    assert os.stat(out / "shard-00000.safetensors").st_mtime == 1  # kept, not re-encoded
    assert json.loads((out / "cache.json").read_text()) == record
    second = load_file(str(out / "shard-00001.safetensors"))
    ref = load_file(str(cache / "cache" / "shard-00001.safetensors"))
    assert all(torch.equal(second[k], ref[k]) for k in ref)  # same images in the same encoder batch: exact
    assert torch.equal(load_file(str(out / "shard-00000.safetensors"))["latents"], first["latents"])
    capsys.readouterr()
    # the same folder asked for another resolution: refused, nothing touched
    assert cli.main([*args[:-5], "48", *args[-4:]]) == 2
    line = error_line(capsys)
    assert "resolution 32 (wanted 48)" in line and str(out) in line and "--overwrite" in line
    assert os.stat(out / "shard-00000.safetensors").st_mtime == 1
    # a run on this cache with another model is refused before anything is written
    assert cli.main(["flow", "--cache", str(out), "--out", str(tmp_path / "run"), "--model", "other/model"]) == 2
    assert "made for model 'demo' (this run: 'other/model')" in error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["empty", "no caption", "resolution", "corrupt", "not a cache", "unfinished cache"])
def test_prepare_bad_input_one_line(case, tmp_path, capsys):
    data = make_images(tmp_path / "data", 3)
    out, res = tmp_path / "out", str(PX)
    expect = {"empty": "no images in", "no caption": "img01.png: no caption file img01.txt",
              "resolution": "resolution must be a positive multiple of 16", "corrupt": "img02.png: unreadable image",
              "not a cache": "is not empty and holds no cache", "unfinished cache": "is unfinished"}[case]
    if case == "empty":
        data = tmp_path / "none"
        data.mkdir()
    elif case == "no caption":
        (data / "img01.txt").unlink()
    elif case == "resolution":
        res = "40"
    elif case == "corrupt":
        (data / "img02.png").write_bytes(b"GIF89a broken")
    elif case == "not a cache":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    if case == "unfinished cache":
        out.mkdir()
        (out / "cache.json").write_text(json.dumps({"complete": False}))
        code = cli.main(["flow", "--cache", str(out), "--out", str(tmp_path / "run")])
    else:
        code = cli.main(["prepare", "--demo", "--data", str(data), "--resolution", res, "--out", str(out)])
    assert code == 2
    assert expect in error_line(capsys)
    if case == "not a cache":
        assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    if case == "corrupt":  # the shard of the bad image was not written; --skip-bad counts and lists it
        assert not list(out.glob("shard-*"))
        assert cli.main(["prepare", "--demo", "--data", str(data), "--resolution", res, "--out", str(out),
                         "--skip-bad"]) == 0
        assert "cached 2 examples in 1 shards" in capsys.readouterr().out
        assert "img02.png: unreadable image" in json.loads((out / "cache.json").read_text())["skipped"][0]


def test_training_demo_models_are_the_sampling_demo():
    """flow --model demo builds the transformer and VAE without the text encoders; they must be the
    weights FlashSD3Pipeline.demo() (and so `flashsd3-sample --demo`) has, or an adapter would not fit them."""
    from flashsd3.pipeline import FlashSD3Pipeline
    from flashsd3.training import models

    pipe = FlashSD3Pipeline.demo(seed=0)
    for ours, ref in ((models.training_transformer("demo", torch.float32, torch.device("cpu")), pipe.transformer),
                      (models.training_vae("demo", torch.float32, torch.device("cpu")), pipe.vae)):
        theirs = ref.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items()) and len(theirs) > 0
