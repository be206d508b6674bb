"""save_lora (peft / diffusers / kohya layouts) and the convert command vs peft and diffusers loaders."""
import json

import pytest
import torch

from flashsd3 import SD3_MEDIUM, TINY, MMDiT
from flashsd3.lora import LoRAError, add_lora, save_lora
from flashsd3.lora.train import FLASH_SD3_TARGETS

pytest.importorskip("diffusers", reason="diffusers is the parity reference (test extra)")
pytest.importorskip("peft", reason="peft is the parity reference (test extra)")
from peft import LoraConfig, get_peft_model  # noqa: E402

from helpers_lora_train import (  # noqa: E402
    FLOAT64_TOL,
    PUBLISHED_CONFIG,
    PUBLISHED_KEYS,
    call_ref,
    flashsd3_out,
    frozen_base,
    peft_out,
    randomize,
    saved,
    twins,
)
from helpers_mmdit import random_diffusers_transformer, random_inputs  # noqa: E402
from metrics import rel_l2  # noqa: E402


@pytest.mark.parametrize("targets, peft_targets", [("flash-sd3", FLASH_SD3_TARGETS), ("all-linear", "all-linear")])
def test_save_peft_is_what_peft_saves_and_loads_back(tmp_path, targets, peft_targets):
    model, ours = twins(targets, peft_targets)
    inputs = random_inputs(TINY)
    with torch.no_grad():
        expected = ours(*inputs)
    written = save_lora(ours, tmp_path / "ours")
    model.save_pretrained(tmp_path / "peft")
    assert written == tmp_path / "ours" / "adapter_model.safetensors"
    mine, theirs = saved(written), saved(tmp_path / "peft" / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 3)
    if targets == "flash-sd3":
        assert config["target_modules"] == list(FLASH_SD3_TARGETS)
    assert rel_l2(peft_out(tmp_path / "ours", inputs), expected) < FLOAT64_TOL
    assert rel_l2(flashsd3_out(tmp_path / "ours", inputs), expected) < FLOAT64_TOL


def test_save_fused_qkv_adapter_splits_for_peft(tmp_path):
    ours = frozen_base()
    add_lora(ours, rank=3, alpha=6, targets=["attn.qkv", "final_layer.adaLN_modulation.1"], dtype=torch.float64)
    randomize(ours)
    inputs = random_inputs(TINY)
    with torch.no_grad():
        expected = ours(*inputs)
    save_lora(ours, tmp_path / "p")
    keys = saved(tmp_path / "p" / "adapter_model.safetensors")
    assert {k.split(".lora_")[0].removeprefix("base_model.model.") for k in keys} == {
        f"transformer_blocks.{i}.attn.{n}" for i in range(2)
        for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")} | {"norm_out.linear"}
    assert rel_l2(peft_out(tmp_path / "p", inputs), expected) < FLOAT64_TOL
    assert rel_l2(flashsd3_out(tmp_path / "p", inputs), expected) < FLOAT64_TOL
    save_lora(ours, tmp_path / "k.safetensors", format="kohya")
    assert rel_l2(flashsd3_out(tmp_path / "k.safetensors", inputs), expected) < FLOAT64_TOL


def test_save_diffusers_layout_loads_in_diffusers_and_flashsd3(tmp_path):
    _, ours = twins()
    inputs = random_inputs(TINY)
    with torch.no_grad():
        expected = ours(*inputs)
    written = save_lora(ours, tmp_path / "d", format="diffusers")
    assert written.name == "pytorch_lora_weights.safetensors"
    assert all(k.startswith("transformer.") for k in saved(written))
    ref = random_diffusers_transformer(TINY, torch.float64, seed=0)
    # diffusers reads r / lora_alpha from the lora_adapter_metadata header only on its safetensors path
    ref.load_lora_adapter(str(written.parent), weight_name=written.name, prefix="transformer")
    with torch.no_grad():
        assert rel_l2(call_ref(ref, *inputs), expected) < FLOAT64_TOL
    assert rel_l2(flashsd3_out(written, inputs), expected) < FLOAT64_TOL


def test_save_kohya_writes_alpha_for_every_module(tmp_path):
    _, ours = twins()
    inputs = random_inputs(TINY)
    with torch.no_grad():
        expected = ours(*inputs)
    tensors = saved(save_lora(ours, tmp_path / "flash.safetensors", format="kohya"))
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert len(downs) == 20 and all(k.startswith("lora_unet_") for k in tensors)  # q, k, v -> one qkv
    for down in downs:
        module = down.removesuffix(".lora_down.weight")
        rank = tensors[down].shape[0]
        assert tensors[f"{module}.alpha"].item() == 0.75 * rank  # alpha / r = 3 / 4, as in the config
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape == (12, 16)  # rank 3 x 4
    assert rel_l2(flashsd3_out(tmp_path / "flash.safetensors", inputs), expected) < FLOAT64_TOL


def test_flash_preset_saves_the_published_layout_on_meta_sd3_medium():
    from diffusers import SD3Transformer2DModel
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    from flashsd3.lora.save import peft_layout

    with torch.device("meta"):
        ours = MMDiT(SD3_MEDIUM)
        ref = SD3Transformer2DModel(**SD3_MEDIUM.to_diffusers())
    add_lora(ours, rank=64, alpha=8)
    tensors, config = peft_layout(ours)
    ref = inject_adapter_in_model(LoraConfig(r=64, lora_alpha=8, target_modules=list(FLASH_SD3_TARGETS)), ref,
                                  low_cpu_mem_usage=True)
    expected = {f"base_model.model.{k}": tuple(v.shape) for k, v in get_peft_model_state_dict(ref).items()}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected and len(expected) == 444
    assert {k: tuple(v.shape) for k, v in tensors.items()} == PUBLISHED_KEYS  # tests/fixtures, as peft writes it
    assert {k: config[k] for k in ("r", "lora_alpha", "target_modules")} == \
        {k: PUBLISHED_CONFIG[k] for k in ("r", "lora_alpha", "target_modules")}
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (64, 8, list(FLASH_SD3_TARGETS))
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    with pytest.raises(LoRAError, match="meta device"):
        save_lora(ours, "/nonexistent/never-written")


def test_convert_round_trips(tmp_path):
    """peft (with rank / alpha patterns) -> kohya -> diffusers -> peft, by the command; outputs kept."""
    from flashsd3.lora.convert import main

    config = LoraConfig(r=4, lora_alpha=3, target_modules=list(FLASH_SD3_TARGETS),
                        rank_pattern={"to_k": 2, "^norm_out.linear": 6}, alpha_pattern={"proj": 7})
    model = get_peft_model(random_diffusers_transformer(TINY, torch.float64, seed=0), config)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
    model.save_pretrained(tmp_path / "src")
    inputs = random_inputs(TINY)
    with torch.no_grad():
        expected = call_ref(model, *inputs)
    assert main([str(tmp_path / "src"), str(tmp_path / "k.safetensors"), "--format", "kohya"]) == 0
    assert main([str(tmp_path / "k.safetensors"), str(tmp_path / "d"), "--format", "diffusers",
                 "--model-config", "tiny"]) == 0
    assert main([str(tmp_path / "d"), str(tmp_path / "p"), "--format", "peft"]) == 0
    for source in (tmp_path / "k.safetensors", tmp_path / "d", tmp_path / "p"):
        assert rel_l2(flashsd3_out(source, inputs), expected) < FLOAT64_TOL, source
    assert rel_l2(peft_out(tmp_path / "p", inputs), expected) < FLOAT64_TOL
    assert main([str(tmp_path / "p"), str(tmp_path / "x"), "--format", "peft", "--model-config", "sd3-medium"]) == 2


def test_save_refusals(tmp_path):
    _, ours = twins()
    with pytest.raises(LoRAError, match="format must be"):
        save_lora(ours, tmp_path, format="comfy")
    with pytest.raises(LoRAError, match="peft layout is a folder"):
        save_lora(ours, tmp_path / "a.safetensors")
    with pytest.raises(LoRAError, match="no adapter"):
        save_lora(ours, tmp_path, name="nope")
    assert list(tmp_path.iterdir()) == []
