"""Training images through flashsd3/images.py's checked decode (training/data.py `load_image`): a
decompression bomb in the data is named and refused before decoding (or skipped and counted with
--skip-bad); 16-bit images train as their 8-bit levels, not almost white."""
import json

import numpy as np
import torch
from PIL import Image

from flashsd3.training import cli
from flashsd3.training.data import DataError, load_image
from helpers_files import bomb_png, tree_state

ERR = "flashsd3-train: error:"
PX = 32


def test_sixteen_bit_images_are_their_8_bit_levels(tmp_path):
    levels = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)[..., 0]
    Image.fromarray(levels).save(tmp_path / "l.png")
    Image.fromarray(levels.astype(np.uint16) * 257).save(tmp_path / "i16.png")
    assert torch.equal(load_image(tmp_path / "i16.png", PX), load_image(tmp_path / "l.png", PX))


def test_bomb_in_the_data_is_named_then_skipped(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(f"picture {name}", encoding="utf-8")
    bomb_png(data / "c.png")
    (data / "c.txt").write_text("a bomb", encoding="utf-8")
    try:
        load_image(data / "c.png", PX)
        raise AssertionError("not refused")
    except DataError as e:
        assert str(e).startswith(f"{data / 'c.png'}: refused before decoding")
    before = tree_state(data)
    out = tmp_path / "cache"
    argv = ["prepare", "--demo", "--data", str(data), "--resolution", str(PX), "--out", str(out)]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{ERR} {data / 'c.png'}: refused before decoding"), lines
    assert not list(out.glob("shard-*"))
    assert cli.main([*argv, "--skip-bad"]) == 0
    assert "cached 2 examples in 1 shards" in capsys.readouterr().out
    skipped = json.loads((out / "cache.json").read_text())["skipped"]
    assert len(skipped) == 1 and skipped[0].startswith(f"{data / 'c.png'}: refused before decoding")
    assert tree_state(data) == before
