"""ControlNet loaders: the published key lists map strictly (tests/fixtures/README.md says where each comes from),
configs are inferred from keys, files written by diffusers load, and every bad key is named."""
import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from flashsd3 import TINY
from flashsd3.controlnet import (
    CONTROLNET_PRESETS,
    ControlNet,
    ControlNetConfig,
    controlnet_config,
    controlnet_from_state_dict,
    load_controlnet,
    to_diffusers_state_dict,
)
from flashsd3.controlnet.loading import infer_config
from flashsd3.keymaps import controlnet as km
from flashsd3.keymaps.rules import plan_keys
from flashsd3.mmdit import MMDiT
from flashsd3.weights import CheckpointError
from helpers_controlnet import one_thread  # noqa: F401 (autouse fixture: single-threaded)
from helpers_reference import FIXTURES, KeyListReader, read_json, read_tsv

PUBLISHED = {  # key list, preset, layout, values, published bytes (size listed on the hub), bytes per value
    "instantx": ("controlnet_instantx_sd3_keys.tsv", "instantx-sd3", "diffusers", 595_428_864, 1.19e9, 2),
    "alimama": ("controlnet_alimama_sd3_inpaint_keys.tsv", "alimama-sd3-inpaint", "diffusers", 2_080_241_664, 4.16e9,
                2),
    "sd35_diffusers": ("controlnet_sd35_large_diffusers_keys.tsv", None, "diffusers", 2_153_518_976, 8.61e9, 4),
    "sd35_stability": ("controlnet_sd35_large_stability_keys.tsv", "sd3.5-large-stability", "stability",
                       2_163_638_529, 8.65e9, 4),
}
SD35_DIFFUSERS = dataclasses.replace(CONTROLNET_PRESETS["sd3.5-large-stability"], residual_rule="diffusers")


class StabilityKeys(KeyListReader):
    """A key list whose `control_type` reads as canny (1), as Stability's canny file."""

    def get(self, key, dtype=None):
        return torch.tensor([1], dtype=torch.int32) if key == km.CONTROL_TYPE_KEY else super().get(key, dtype)


def preset(name):
    return SD35_DIFFUSERS if name == "sd35_diffusers" else CONTROLNET_PRESETS[PUBLISHED[name][1]]


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_keys_map_strictly(name):
    tsv, _, layout, values, size, width = PUBLISHED[name]
    shapes = read_tsv(tsv)
    with torch.device("meta"):
        expected = ControlNet(preset(name)).state_dict()
    table, ignore = (km.STABILITY, km.STABILITY_IGNORE) if layout == "stability" else (km.DIFFUSERS, ())
    consumed = set()
    for key, step in plan_keys(expected.keys(), table).items():
        assert all(s in shapes for s in step.sources), (key, step.sources)
        assert step.transform.shape(*(shapes[s] for s in step.sources)) == tuple(expected[key].shape), key
        consumed.update(step.sources)
    left = [k for k in shapes if k not in consumed and not any(re.search(p, k) for p in ignore)]
    assert not left, left
    assert sum(torch.Size(s).numel() for s in shapes.values()) == values
    assert round(values * width / 1e9, 2) == size / 1e9  # the listed file size (header: kilobytes)


@pytest.mark.parametrize("name", PUBLISHED)
def test_config_inferred_from_published_keys(name):
    tsv, _, layout, *_ = PUBLISHED[name]
    reader = StabilityKeys(read_tsv(tsv), tsv)
    want = preset(name)
    if layout == "stability":
        want = dataclasses.replace(want, control_type="canny")
    elif name == "sd35_diffusers":
        want = dataclasses.replace(want, sample_size=128)
    assert infer_config(reader, layout) == dataclasses.replace(want, sample_size=want.sample_size)


@pytest.mark.parametrize("name", ["instantx_sd3", "alimama_sd3_inpaint", "sd35_large_diffusers"])
def test_published_configs_parse(name):
    config = ControlNetConfig.from_diffusers(read_json(f"controlnet_{name}_config.json"))
    want = {"instantx_sd3": CONTROLNET_PRESETS["instantx-sd3"],
            "alimama_sd3_inpaint": CONTROLNET_PRESETS["alimama-sd3-inpaint"], "sd35_large_diffusers": SD35_DIFFUSERS}
    assert config == want[name]


# Files on disk, tiny --------------------------------------------------------------------------------------

CN = ControlNetConfig(depth=2, num_heads=2, head_dim=8, in_channels=4, extra_channels=1, context_dim=32,
                      pooled_dim=24, pos_embed_max_size=16, sample_size=8)


def random_diffusers(cfg=CN):
    pytest.importorskip("diffusers", reason="diffusers writes the reference folder")
    from helpers_controlnet import random_diffusers_controlnet

    return random_diffusers_controlnet(cfg, dtype=torch.float32)


def test_diffusers_folder_written_by_diffusers_loads(tmp_path):
    ref = random_diffusers()
    ref.save_pretrained(tmp_path / "cn")  # the real tool writes config.json + diffusion_pytorch_model.safetensors
    ours = load_controlnet(tmp_path / "cn")
    assert ours.config == CN and controlnet_config(tmp_path / "cn") == CN
    state = ours.state_dict()
    assert torch.equal(state["joint_blocks.1.x_block.attn.qkv.weight"][:16], ref.transformer_blocks[1].attn.to_q.weight)
    back = to_diffusers_state_dict(ours)  # and back: diffusers loads it strictly
    ref.load_state_dict(back, strict=True)


def test_stability_file_loads_with_its_transformer(tmp_path):
    from helpers_controlnet import random_stability_state_dict

    tr = MMDiT(TINY)
    cfg = dataclasses.replace(CN, extra_channels=0, context_dim=None, pos_embed_max_size=None, zero_pooled=False,
                              residual_rule="stability", sample_size=128)
    save_file({k: v.float().contiguous() for k, v in random_stability_state_dict(cfg, control_type=2).items()},
              tmp_path / "sd3.5_large_controlnet_depth.safetensors")
    path = tmp_path / "sd3.5_large_controlnet_depth.safetensors"
    with pytest.warns(UserWarning, match="matches no preset"):
        cn = load_controlnet(path, transformer=tr)
    assert cn.config == dataclasses.replace(cfg, control_type="depth") and cn.transformer is tr
    assert "transformer" not in dict(cn.named_children())  # a reference, not a submodule
    with pytest.raises(ValueError, match="pass transformer="):
        load_controlnet(path)
    wide = MMDiT(dataclasses.replace(TINY, num_heads=4))
    with pytest.raises(CheckpointError, match="width 16 does not match the transformer.s 32"):
        load_controlnet(path, transformer=wide)


def test_unknown_missing_and_misshapen_keys_are_named(tmp_path):
    state = {k: v.clone() for k, v in random_diffusers().state_dict().items()}
    state["controlnet_blocks.7.weight"] = torch.zeros(16, 16)
    del state["transformer_blocks.0.attn.to_k.weight"]
    state["controlnet_blocks.0.bias"] = torch.zeros(15)
    with pytest.raises(CheckpointError) as e:
        controlnet_from_state_dict(state, CN)
    msg = str(e.value)
    assert "controlnet_blocks.7.weight" in msg and "transformer_blocks.0.attn.to_k.weight" in msg
    assert "controlnet_blocks.0.bias: expected [16]" in msg
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text(json.dumps({"num_layers": 2}))
    save_file({"controlnet_blocks.0.weight": torch.zeros(1)}, tmp_path / "cn" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="config.json: not a usable SD3ControlNetModel config"):
        load_controlnet(tmp_path / "cn")


def test_fixture_readme_lists_every_controlnet_fixture():
    readme = (FIXTURES / "README.md").read_text()
    for f in FIXTURES.glob("controlnet_*"):
        assert f.name in readme, f.name
