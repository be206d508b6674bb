"""flashsd3.lora vs peft / diffusers on random tiny SD3 transformers (float64, CPU), plus refusals."""
import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from flashsd3 import SD3_MEDIUM, TINY, MMDiT
from flashsd3.keymaps.rules import swap_halves
from flashsd3.lora import LoRAError, load_lora, lora_info, merge_lora, remove_lora, set_lora_scale, unmerge_lora
from flashsd3.lora.formats import LoRASource, peft_selects, plan_lora
from flashsd3.lora.keys import diffusers_targets
from flashsd3.lora.layers import LoRALayer
from flashsd3.mmdit import from_diffusers_state_dict

pytest.importorskip("diffusers", reason="diffusers is the parity reference (test extra)")
pytest.importorskip("peft", reason="peft is the parity reference (test extra)")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from helpers_lora import PUBLISHED, lora_config  # noqa: E402
from helpers_mmdit import random_diffusers_transformer, random_inputs, run_reference  # noqa: E402
from helpers_reference import KeyListReader, read_json, read_tsv  # noqa: E402
from metrics import rel_l2  # noqa: E402

FLOAT64_TOL = 1e-10  # float64: LoRA on fused qkv vs separate q/k/v changes summation order only


def peft_reference(config: LoraConfig, seed: int):
    """(peft model, our base model with the same weights): random tiny SD3, random non-zero A and B."""
    ref = random_diffusers_transformer(TINY, torch.float64, seed=seed)
    ours = from_diffusers_state_dict(ref.state_dict(), TINY)  # before peft moves weights to base_layer.weight
    model = get_peft_model(ref, config)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
    return model, ours


def peft_scale(model, scale: float) -> None:
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("default", scale)  # scaling = scale * alpha / r


def run_ours(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    """The published adapter config on a tiny model: peft model, its saved folder, our base state."""
    model, ours = peft_reference(lora_config(), seed=0)
    folder = tmp_path_factory.mktemp("peft")
    model.save_pretrained(folder)
    inputs = random_inputs(TINY)
    with model.disable_adapter():
        base_out = run_reference(model.base_model.model, *inputs)
    return dict(peft=model, folder=folder, state=ours.state_dict(), inputs=inputs, base_out=base_out)


def fresh(state) -> MMDiT:
    with torch.device("meta"):
        model = MMDiT(TINY)
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def peft_state(flash) -> dict[str, torch.Tensor]:
    with safe_open(str(flash["folder"] / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def reference_out(flash, scale=1.0):
    peft_scale(flash["peft"], scale)
    try:
        return run_reference(flash["peft"].base_model.model, *flash["inputs"])
    finally:
        peft_scale(flash["peft"], 1.0)


# Parity with peft ---------------------------------------------------------------------------------

def test_peft_save_writes_the_published_key_form(flash):
    keys = list(peft_state(flash))
    assert len(keys) == 48 and all(k.startswith("base_model.model.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    saved = json.loads((flash["folder"] / "adapter_config.json").read_text())
    shape = (saved["r"], saved["lora_alpha"], sorted(saved["target_modules"]))
    assert shape == (64, 8, sorted(PUBLISHED["target_modules"]))


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_parity_with_peft_unmerged_and_merged(flash, scale):
    ours = fresh(flash["state"])
    name = load_lora(ours, flash["folder"], scale=scale)
    expected = reference_out(flash, scale)
    assert rel_l2(expected, flash["base_out"]) > 0.05  # the adapter really changes the output
    assert rel_l2(run_ours(ours, flash["inputs"]), expected) < FLOAT64_TOL
    merge_lora(ours)
    assert lora_info(ours)[name].merged
    assert rel_l2(run_ours(ours, flash["inputs"]), expected) < FLOAT64_TOL
    with pytest.raises(LoRAError, match="merged into the weights"):
        set_lora_scale(ours, name, 1.0)


def test_set_lora_scale_matches_peft_set_scale(flash):
    ours = fresh(flash["state"])
    name = load_lora(ours, flash["folder"], name="flash")
    set_lora_scale(ours, name, 2.5)
    assert rel_l2(run_ours(ours, flash["inputs"]), reference_out(flash, 2.5)) < FLOAT64_TOL
    info = lora_info(ours)["flash"]
    assert (info.scale, info.layers, info.updates) == (2.5, 20, 24)  # q, k, v share each block's qkv


def test_scale_zero_is_exactly_the_base_model(flash):
    ours, base = fresh(flash["state"]), fresh(flash["state"])
    load_lora(ours, flash["folder"], scale=0.0)
    assert torch.equal(run_ours(ours, flash["inputs"]), run_ours(base, flash["inputs"]))
    assert rel_l2(run_ours(base, flash["inputs"]), flash["base_out"]) < FLOAT64_TOL


def test_state_dict_and_parameters_unchanged(flash):
    ours = fresh(flash["state"])
    params = dict(ours.named_parameters())
    load_lora(ours, flash["folder"])
    assert dict(ours.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in ours.named_parameters())  # shared, not copied
    assert ours.state_dict().keys() == flash["state"].keys()
    ours.load_state_dict(flash["state"], strict=True)
    assert isinstance(ours.joint_blocks[0].x_block.attn.qkv, LoRALayer)


def test_merged_forward_is_the_plain_forward(flash):
    ours = fresh(flash["state"])
    load_lora(ours, flash["folder"])
    merge_lora(ours)
    plain = fresh(ours.state_dict())  # plain layers holding the merged weights
    assert torch.equal(run_ours(ours, flash["inputs"]), run_ours(plain, flash["inputs"]))


def test_merge_with_discard_keeps_weights_and_frees_adapters(flash):
    ours = fresh(flash["state"])
    load_lora(ours, flash["folder"], name="a")
    load_lora(ours, flash["folder"], name="b", scale=0.5)
    merged = fresh(flash["state"])
    load_lora(merged, flash["folder"], name="a")
    load_lora(merged, flash["folder"], name="b", scale=0.5)
    merge_lora(merged, ["a"])
    merge_lora(ours, ["a"], discard=True)
    assert list(lora_info(ours)) == ["b"]  # only "a" was forgotten
    assert torch.equal(run_ours(ours, flash["inputs"]), run_ours(merged, flash["inputs"]))
    merge_lora(ours, discard=True)
    assert lora_info(ours) == {} and not any(isinstance(m, LoRALayer) for m in ours.modules())
    merge_lora(merged)
    for k, v in merged.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_rank_alpha_patterns_and_rslora_match_peft(tmp_path):
    config = lora_config(r=4, lora_alpha=3, use_rslora=True, rank_pattern={"to_k": 2, "^norm_out.linear": 6},
                         alpha_pattern={"transformer_blocks.1.ff.net.2": 5, "proj": 7})
    model, ours = peft_reference(config, seed=1)
    model.save_pretrained(tmp_path)
    inputs = random_inputs(TINY, seed=5)
    load_lora(ours, tmp_path)
    assert rel_l2(run_ours(ours, inputs), run_reference(model.base_model.model, *inputs)) < FLOAT64_TOL


# Other file layouts ---------------------------------------------------------------------------------

def peft_tensors(flash) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers module path -> (A, B) of the Flash-config test adapter."""
    sd = {k.removeprefix("base_model.model."): v for k, v in peft_state(flash).items()}
    return {k.removesuffix(".lora_A.weight"): (v, sd[k.replace("lora_A", "lora_B")])
            for k, v in sd.items() if "lora_A" in k}


def test_diffusers_file_with_metadata_matches_peft(flash, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict

    meta = flash["peft"].peft_config["default"].to_dict()
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(
        flash["peft"].base_model.model), transformer_lora_adapter_metadata=meta)
    ours = fresh(flash["state"])
    load_lora(ours, tmp_path / "pytorch_lora_weights.safetensors")
    assert rel_l2(run_ours(ours, flash["inputs"]), reference_out(flash)) < FLOAT64_TOL


def test_diffusers_file_without_metadata_matches_diffusers_loader(flash, tmp_path):
    """No alpha anywhere: diffusers 0.42.1 applies B @ A at scale 1.0, and so do we."""
    sd = {f"transformer.{p}.lora_{ab}.weight": t
          for p, (A, B) in peft_tensors(flash).items() for ab, t in (("A", A), ("B", B))}
    save_file(sd, tmp_path / "pytorch_lora_weights.safetensors")
    ref = random_diffusers_transformer(TINY, torch.float64, seed=0)  # the same base weights as `flash`
    ref.load_lora_adapter(str(tmp_path / "pytorch_lora_weights.safetensors"), prefix="transformer")
    ours = fresh(flash["state"])
    load_lora(ours, tmp_path)
    expected = run_reference(ref, *flash["inputs"])
    assert rel_l2(expected, reference_out(flash)) > 0.05  # scale 1.0 is not the config's 0.125
    assert rel_l2(run_ours(ours, flash["inputs"]), expected) < FLOAT64_TOL


@pytest.mark.parametrize("prefix, sep, down, up", [
    ("lora_transformer_", "_", "lora_down", "lora_up"),  # OneTrainer
    ("transformer.", ".", "lora_A", "lora_B"),  # diffusers layout with kohya-style .alpha scalars
])
def test_files_with_alpha_keys_match_peft(flash, tmp_path, prefix, sep, down, up):
    sd = {}
    for path, (A, B) in peft_tensors(flash).items():
        key = prefix + path.replace(".", sep)
        sd.update({f"{key}.{down}.weight": A, f"{key}.{up}.weight": B, f"{key}.alpha": torch.tensor(8.0)})
    save_file(sd, tmp_path / "lora.safetensors")
    ours = fresh(flash["state"])
    load_lora(ours, tmp_path / "lora.safetensors")
    assert rel_l2(run_ours(ours, flash["inputs"]), reference_out(flash)) < FLOAT64_TOL


def kohya_from_peft(tensors, alpha: float) -> dict[str, torch.Tensor]:
    """Written out by hand for TINY (depth 2), independent of flashsd3's key derivation. q, k, v become
    one qkv LoRA as sd-scripts saves split_qkv: A stacked, B block-diagonal, rank 3r, alpha 3x."""
    names = {"pos_embed.proj": "x_embedder.proj", "proj_out": "final_layer.linear",
             "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}
    swapped = {"norm_out.linear": "final_layer.adaLN_modulation.1",
               "transformer_blocks.1.norm1_context.linear": "joint_blocks.1.context_block.adaLN_modulation.1"}
    for i in range(2):
        names.update({f"transformer_blocks.{i}.{d}": f"joint_blocks.{i}.{o}" for d, o in [
            ("attn.to_out.0", "x_block.attn.proj"), ("ff.net.0.proj", "x_block.mlp.fc1"),
            ("ff.net.2", "x_block.mlp.fc2"),
            ("ff_context.net.0.proj", "context_block.mlp.fc1"), ("norm1.linear", "x_block.adaLN_modulation.1")]})
    names["transformer_blocks.0.norm1_context.linear"] = "joint_blocks.0.context_block.adaLN_modulation.1"
    out = {}

    def put(orig, A, B, a):
        key = "lora_unet_" + orig.replace(".", "_")
        out.update({f"{key}.lora_down.weight": A, f"{key}.lora_up.weight": B, f"{key}.alpha": torch.tensor(a)})

    for path, (A, B) in tensors.items():
        if path in names:
            put(names[path], A, B, alpha)
        elif path in swapped:  # diffusers (scale, shift) rows -> official (shift, scale)
            put(swapped[path], A, torch.cat(B.chunk(2)[::-1]), alpha)
    for i in range(2):
        qkv = [tensors[f"transformer_blocks.{i}.attn.to_{c}"] for c in "qkv"]
        put(f"joint_blocks.{i}.x_block.attn.qkv", torch.cat([a for a, _ in qkv]),
            torch.block_diag(*[b for _, b in qkv]), 3 * alpha)
    return out


def test_kohya_file_matches_peft(flash, tmp_path):
    tensors = peft_tensors(flash)
    sd = kohya_from_peft(tensors, alpha=8.0)
    assert len(sd) == 3 * (len(tensors) - 4)  # 6 q/k/v LoRAs became 2 qkv LoRAs
    save_file(sd, tmp_path / "kohya.safetensors")
    ours = fresh(flash["state"])
    load_lora(ours, tmp_path / "kohya.safetensors", name="k")
    assert rel_l2(run_ours(ours, flash["inputs"]), reference_out(flash)) < FLOAT64_TOL
    merge_lora(ours)
    assert rel_l2(run_ours(ours, flash["inputs"]), reference_out(flash)) < FLOAT64_TOL


# Several adapters, merge / unmerge / remove ---------------------------------------------------------

def small_kohya(tmp_path, seed: int) -> Path:
    """A second adapter: random rank-4 kohya LoRAs on block 0's fused qkv and the final adaLN."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, out in (("joint_blocks_0_x_block_attn_qkv", 48), ("final_layer_adaLN_modulation_1", 32)):
        sd.update({f"lora_unet_{name}.lora_down.weight": torch.randn(4, 16, generator=g, dtype=torch.float64),
                   f"lora_unet_{name}.lora_up.weight": torch.randn(out, 4, generator=g, dtype=torch.float64),
                   f"lora_unet_{name}.alpha": torch.tensor(2.0)})
    save_file(sd, tmp_path / "extra.safetensors")
    return tmp_path / "extra.safetensors"


def test_two_adapters_add_their_deltas(flash, tmp_path):
    extra = small_kohya(tmp_path, seed=7)
    deltas = []
    for src in (flash["folder"], extra):
        one = fresh(flash["state"])
        load_lora(one, src, scale=0.7)
        merge_lora(one)
        deltas.append({k: v - flash["state"][k] for k, v in one.state_dict().items()})
    both = fresh(flash["state"])
    first, second = load_lora(both, flash["folder"], scale=0.7), load_lora(both, extra, scale=0.7)
    assert set(lora_info(both)) == {first, second}
    summed = fresh({k: v + deltas[0][k] + deltas[1][k] for k, v in flash["state"].items()})
    assert rel_l2(run_ours(both, flash["inputs"]), run_ours(summed, flash["inputs"])) < FLOAT64_TOL
    merge_lora(both, [second])  # one merged, one not
    assert rel_l2(run_ours(both, flash["inputs"]), run_ours(summed, flash["inputs"])) < FLOAT64_TOL
    merge_lora(both)
    for k, v in both.state_dict().items():  # float64: merged = base + d1 + d2 up to rounding
        torch.testing.assert_close(v, summed.state_dict()[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_unmerge_restores_weights_within_one_rounding(flash, dtype):
    ours = fresh(flash["state"]).to(dtype)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    load_lora(ours, flash["folder"], scale=1.3)
    merge_lora(ours)
    merged = {k: v.clone() for k, v in ours.state_dict().items()}
    unmerge_lora(ours)
    eps = torch.finfo(dtype).eps
    changed = 0
    for k, w in ours.state_dict().items():
        bound = eps * torch.maximum(base[k].abs(), merged[k].abs()).double()  # lora.py docstring bound
        assert ((w.double() - base[k].double()).abs() <= bound).all(), k
        changed += int(not torch.equal(merged[k], base[k]))
    assert changed == 20  # one weight per adapted layer; biases are never touched
    assert not any(info.merged for info in lora_info(ours).values())


def test_remove_lora_restores_plain_layers(flash):
    ours = fresh(flash["state"])
    name = load_lora(ours, flash["folder"])
    merge_lora(ours)
    remove_lora(ours, name)
    assert lora_info(ours) == {} and not any(isinstance(m, LoRALayer) for m in ours.modules())
    assert type(ours.joint_blocks[0].x_block.attn.qkv) is nn.Linear and type(ours.x_embedder.proj) is nn.Conv2d
    assert rel_l2(run_ours(ours, flash["inputs"]), flash["base_out"]) < FLOAT64_TOL
    with pytest.raises(LoRAError, match="no adapter named"):
        remove_lora(ours, name)


# The published adapter at SD3-medium size, on the meta device ----------------------------------------

def test_inline_config_is_the_published_one():
    published = read_json("flash_sd3_adapter_config.json")
    assert {k: published[k] for k in PUBLISHED} == PUBLISHED


def test_published_adapter_maps_onto_sd3_medium():
    from diffusers import SD3Transformer2DModel
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    with torch.device("meta"):
        ref = SD3Transformer2DModel(**SD3_MEDIUM.to_diffusers())
        ours = MMDiT(SD3_MEDIUM)
    layers = {n for n, m in ref.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(diffusers_targets(ours)) == layers  # every diffusers layer has a place in ours
    ref = inject_adapter_in_model(lora_config(), ref, low_cpu_mem_usage=True)
    wrapped = {n for n, m in ref.named_modules() if isinstance(m, LoraLayer)}
    assert len(wrapped) == 222 and {n for n in layers if peft_selects(PUBLISHED, n)} == wrapped
    expected = {f"base_model.model.{k}": tuple(v.shape) for k, v in get_peft_model_state_dict(ref).items()}
    reader = KeyListReader(read_tsv("flash_sd3_adapter_keys.tsv"))  # planning reads shapes, no data
    assert reader.shapes == expected  # 444 keys
    pieces = plan_lora(ours, LoRASource(reader, PUBLISHED, "adapter_config.json", "flash"))
    assert len(pieces) == 222 and {p.scale for p in pieces} == {8 / 64}
    assert sum(math.prod(reader.shape(p.a_key)) + math.prod(reader.shape(p.b_key)) for p in pieces) == 87_646_208
    assert len({p.target.module for p in pieces}) == 222 - 2 * 24  # to_q, to_k, to_v -> one qkv per block
    swapped = {p.source for p in pieces if p.target.rows is swap_halves}
    assert swapped == {"norm_out.linear", "transformer_blocks.23.norm1_context.linear"}
    qkv = sorted((p.target.start, p.target.stop) for p in pieces
                 if p.target.module == "joint_blocks.5.x_block.attn.qkv")
    assert qkv == [(0, 1536), (1536, 3072), (3072, 4608)]


# Refusals: nothing is changed, the message names what is wrong ----------------------------------------

def write_peft(folder: Path, sd: dict, config: dict | None = PUBLISHED) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, folder / "adapter_model.safetensors")
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def refuses(flash, source, match):
    ours = fresh(flash["state"])
    with pytest.raises(LoRAError, match=match):
        load_lora(ours, source)
    assert lora_info(ours) == {} and not any(isinstance(m, LoRALayer) for m in ours.modules())


def test_refuses_keys_that_target_nothing(flash, tmp_path):
    stray = {f"base_model.model.transformer_blocks.0.attn.to_zz.lora_{ab}.weight": torch.zeros(4, 4) for ab in "AB"}
    refuses(flash, write_peft(tmp_path / "a", {**peft_state(flash), **stray}), r"target nothing.*attn\.to_zz")
    # a real layer the config does not select (add_k_proj ends in "_proj", not ".proj": peft
    # tuners_utils.check_target_module_exists matches a name equal to a target or ending in "." + target)
    add_k = {"base_model.model.transformer_blocks.0.attn.add_k_proj.lora_A.weight": torch.zeros(64, 16),
             "base_model.model.transformer_blocks.0.attn.add_k_proj.lora_B.weight": torch.zeros(16, 64)}
    refuses(flash, write_peft(tmp_path / "b", {**peft_state(flash), **add_k}), r"does not select 1 modules.*add_k_proj")


def test_refuses_shape_mismatch(flash, tmp_path):
    sd = peft_state(flash)
    sd["base_model.model.transformer_blocks.0.attn.to_k.lora_B.weight"] = torch.zeros(24, 64)
    refuses(flash, write_peft(tmp_path, sd), r"to_k\.lora_B\.weight: shape \[24, 64\], expected \[16, 64\] "
                                             r"\(our joint_blocks\.0\.x_block\.attn\.qkv rows 16:32")


def test_refuses_missing_or_inconsistent_adapter_config(flash, tmp_path):
    sd = peft_state(flash)
    refuses(flash, write_peft(tmp_path / "none", sd, config=None), "without adapter_config.json")
    refuses(flash, write_peft(tmp_path / "r", sd, config={**PUBLISHED, "r": 32}), "rank 32 for .*has shape")
    refuses(flash, write_peft(tmp_path / "dora", sd, config={**PUBLISHED, "use_dora": True}),
            "use_dora=True is not supported")
    refuses(flash, write_peft(tmp_path / "t", sd, config={**PUBLISHED, "target_modules": ["to_q"]}), "does not select")
    (tmp_path / "bad").mkdir()
    shutil.copy(flash["folder"] / "adapter_model.safetensors", tmp_path / "bad")
    (tmp_path / "bad" / "adapter_config.json").write_text("{r: 64")
    refuses(flash, tmp_path / "bad", "not valid JSON")


@pytest.mark.parametrize("key, match", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "for a UNet model .*not SD3"),
    ("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "for a UNet model .*not SD3"),
    ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "for Flux, not SD3"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "adapt a text encoder"),
    ("lora_unet_joint_blocks_0_x_block_attn_qkv.hada_w1_a", r"LoHa \(LyCORIS\) is not supported"),
    ("base_model.model.proj_out.lora_magnitude_vector", "DoRA is not supported"),
    ("model.layers.0.q_proj.weight", "no known SD3 LoRA layout"),
])
def test_refuses_other_models_and_kinds(flash, tmp_path, key, match):
    save_file({key: torch.zeros(4, 4)}, tmp_path / "x.safetensors")
    refuses(flash, tmp_path / "x.safetensors", match)


def test_refuses_pickle_files(flash, tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    refuses(flash, tmp_path, "pickle files")


def test_hub_repo_id_through_snapshot_download(flash, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: str(flash["folder"]))
    ours = fresh(flash["state"])
    assert load_lora(ours, "jasperai/flash-sd3") == "flash_sd3"  # named after the repo, not the snapshot

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    refuses(flash, "jasperai/flash-sd3", "could not get the LoRA .* from the Hugging Face hub.*no network")


def test_refuses_nan_or_inf_values_naming_file_and_key(flash, tmp_path):
    sd = peft_state(flash)
    key = "base_model.model.transformer_blocks.1.ff.net.2.lora_B.weight"
    sd[key] = sd[key].clone()
    sd[key][2, 1] = float("nan")
    folder = write_peft(tmp_path, sd)
    refuses(flash, folder, rf"{folder / 'adapter_model.safetensors'}: LoRA tensor '{key}' holds NaN or inf")


def test_adapter_for_another_width_is_summarised(flash, tmp_path):
    wide = dataclasses.replace(TINY, head_dim=16)  # width 32, TINY is 16
    model = get_peft_model(random_diffusers_transformer(wide, torch.float64, seed=2), lora_config(r=4))
    model.save_pretrained(tmp_path)
    ours = fresh(flash["state"])
    with pytest.raises(LoRAError, match="adapter is for width 32, model has 16; for example") as e:
        load_lora(ours, tmp_path)
    lines = str(e.value).splitlines()
    assert len(lines) == 1 + 5 + 1 and re.fullmatch(r"  \.\.\. and \d+ more", lines[-1])  # not one per tensor


def test_same_name_twice_says_how_to_load_both(flash):
    ours = fresh(flash["state"])
    load_lora(ours, flash["folder"])
    with pytest.raises(LoRAError, match=r"already loaded: either the same LoRA is given twice.*name='other'"):
        load_lora(ours, flash["folder"])
    load_lora(ours, flash["folder"], name="other")
    assert len(lora_info(ours)) == 2
