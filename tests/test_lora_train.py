"""Trainable adapters (flashsd3.lora.train / save / convert) vs peft and diffusers on tiny SD3 transformers."""
import json
import math
from pathlib import Path

import pytest
import torch

from flashsd3 import MMDiT, SD3_MEDIUM, TINY
from flashsd3.lora import (LoRAError, add_lora, load_lora, load_lora_state_dict, lora_disabled, lora_info,
                           lora_parameters, lora_scaled, lora_state_dict, make_trainable, merge_lora,
                           named_lora_parameters, save_lora, set_lora_scale)
from flashsd3.lora.train import FLASH_SD3_TARGETS, select_targets

pytest.importorskip("diffusers", reason="diffusers is the parity reference (test extra)")
pytest.importorskip("peft", reason="peft is the parity reference (test extra)")
from helpers_mmdit import ours_from_diffusers, random_diffusers_transformer, random_inputs, rel_err  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

# reference/ beside the main checkout or beside the worktrees (../shared/reference)
PUBLISHED_KEYS_DIR = next((d / "shared" / "reference" for d in Path(__file__).resolve().parents[2:4]
                           if (d / "shared" / "reference").is_dir()), None)
PUBLISHED_KEYS = None if PUBLISHED_KEYS_DIR is None else {
    k: tuple(json.loads(s)) for k, s in (line.split("\t") for line in
                                         (PUBLISHED_KEYS_DIR / "flash_sd3_adapter_keys.tsv").read_text().splitlines())}
FLOAT64_TOL = 1e-10  # float64: fused qkv vs separate q/k/v and the image-/context-first join reorder sums only


def peft_config(r=4, alpha=3, targets=FLASH_SD3_TARGETS) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, init_lora_weights=True)


def twins(targets="flash-sd3", peft_targets=FLASH_SD3_TARGETS, seed=0):
    """(peft model on diffusers, our model): same random base weights, same random non-zero A and B."""
    ref = random_diffusers_transformer(TINY, torch.float64, seed=seed)
    ours = ours_from_diffusers(ref, TINY)
    model = get_peft_model(ref, peft_config(targets=peft_targets) if peft_targets != "all-linear"
                           else LoraConfig(r=4, lora_alpha=3, target_modules="all-linear"))
    add_lora(ours, rank=4, alpha=3, targets=targets, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, m in lora_modules(model).items():
            for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
        for path, (A, B) in peft_ab(model).items():
            update, rows = our_update(ours, path)
            update.A.copy_(A)
            update.B.copy_(swap(B) if rows.swap else B)
    return model, ours


def lora_modules(model) -> dict:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def peft_ab(model) -> dict:
    return {n: (m.lora_A["default"].weight, m.lora_B["default"].weight) for n, m in lora_modules(model).items()}


def swap(B):  # (scale, shift) rows <-> (shift, scale): reference README F3
    return torch.cat(B.chunk(2)[::-1])


def our_update(ours, path: str):
    """The update of adapter 'default' that diffusers module `path` names, and its Target."""
    target = select_targets(ours, [path])[path]
    layer = ours.get_submodule(target.module)
    (update,) = [u for u in layer.lora["default"] if (u.start, u.stop) == (target.start, target.stop)]
    return update, target


def frozen_base() -> MMDiT:
    """twins()'s base model without adapters, frozen as add_lora freezes (at::linear picks its kernel by
    requires_grad, so only equally frozen models agree bitwise)."""
    return ours_from_diffusers(random_diffusers_transformer(TINY, torch.float64, seed=0), TINY).requires_grad_(False)


def loss_of(out: torch.Tensor, seed=3) -> torch.Tensor:
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out * w).sum()


def grad_close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Relative error < FLOAT64_TOL; zero gradients (the last block's context query) must be zero in both."""
    return bool((ours - ref).norm() <= FLOAT64_TOL * ref.norm())


def call_ref(model, lat, t, ctx, pooled):
    return model(hidden_states=lat, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample


# add_lora --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets, peft_targets", [("flash-sd3", FLASH_SD3_TARGETS), ("all-linear", "all-linear")])
def test_gradients_equal_peft(targets, peft_targets):
    model, ours = twins(targets, peft_targets)
    assert len(named_lora_parameters(ours)) == 2 * len(lora_modules(model))
    inputs = random_inputs(TINY)
    expected = call_ref(model, *inputs)
    out = ours(*inputs)
    assert rel_err(out.detach(), expected.detach()) < FLOAT64_TOL
    loss_of(expected).backward()
    loss_of(out).backward()
    for path, (A, B) in peft_ab(model).items():
        update, target = our_update(ours, path)
        assert grad_close(update.A.grad, A.grad), path
        assert grad_close(swap(update.B.grad) if target.swap else update.B.grad, B.grad), path
    assert all(p.grad is None for n, p in ours.named_parameters() if ".lora." not in n)


def test_add_lora_starts_as_the_base_model_and_freezes_it():
    base = MMDiT(TINY).double().requires_grad_(False)  # at::linear picks its kernel by requires_grad: freeze both
    ours = MMDiT(TINY).double()
    ours.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(0)
    name = add_lora(ours, rank=3, alpha=2.0, targets="all-linear", generator=g)
    inputs = random_inputs(TINY)
    assert torch.equal(ours(*inputs), base(*inputs))  # B = 0
    params = named_lora_parameters(ours, name)
    assert all(p.dtype == torch.float32 and p.requires_grad for _, p in params)  # fp32 adapters on a float64 model
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [n for n, _ in params]
    for n, p in params:
        if n.endswith(".A"):  # peft's kaiming_uniform(a=sqrt(5)): bound 1 / sqrt(fan_in)
            bound = 1 / math.sqrt(p[0].numel())
            assert 0.5 * bound < p.abs().max() <= bound, n
        else:
            assert not p.any(), n
    info = lora_info(ours)[name]
    assert info.updates == len(params) // 2 and info.scale == 1.0


def test_flash_preset_at_sd3_medium_size():
    with torch.device("meta"):
        model = MMDiT(SD3_MEDIUM)
    add_lora(model, rank=64, alpha=8)
    params = lora_parameters(model)
    assert len(params) == 444 and sum(p.numel() for p in params) == 87_646_208  # reference README F2
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora." not in n)


def test_target_lists_in_both_namings():
    model = MMDiT(TINY)
    add_lora(model, rank=2, alpha=2, targets=["attn.qkv", "transformer_blocks.1.ff.net.2"], name="a")
    layers = {n for n, m in model.named_modules() if hasattr(m, "lora") and "a" in m.lora}
    assert layers == {"joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.qkv",
                      "joint_blocks.1.x_block.attn.qkv", "joint_blocks.1.context_block.attn.qkv",
                      "joint_blocks.1.x_block.mlp.fc2"}
    assert model.joint_blocks[0].x_block.attn.qkv.lora["a"][0].stop == 3 * TINY.hidden_size  # one fused update
    for targets, match in [(["nothing_here"], "selects no Linear"), (["linear"], "ambiguous"),
                           (["x_block.attn.qkv", "transformer_blocks.0.attn.to_k"], "same rows"),
                           ("some-preset", "targets must be")]:
        with pytest.raises(LoRAError, match=match):
            add_lora(model, rank=2, alpha=2, targets=targets, name="b")
    with pytest.raises(LoRAError, match="already loaded"):
        add_lora(model, rank=2, alpha=2, name="a")
    with pytest.raises(LoRAError, match="rank must be"):
        add_lora(model, rank=0, alpha=2, name="c")
    assert set(lora_info(model)) == {"a"}


def test_bf16_base_trains_fp32_adapters():
    model = MMDiT(TINY).to(torch.bfloat16)
    add_lora(model, rank=4, alpha=4, targets="flash-sd3")
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.1)
    out = model(*random_inputs(TINY, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    loss_of(out.float()).backward()
    grads = [p.grad for p in lora_parameters(model)]
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_lora_state_dict_round_trip_and_make_trainable(tmp_path):
    model, ours = twins()
    state = lora_state_dict(ours)
    other = ours_from_diffusers(random_diffusers_transformer(TINY, torch.float64, seed=0), TINY)
    add_lora(other, rank=4, alpha=3, dtype=torch.float64)
    load_lora_state_dict(other, state)
    inputs = random_inputs(TINY)
    assert torch.equal(other(*inputs), ours(*inputs))
    with pytest.raises(LoRAError, match="missing"):
        load_lora_state_dict(other, {k: v for k, v in list(state.items())[1:]})
    model.save_pretrained(tmp_path)
    loaded = ours_from_diffusers(random_diffusers_transformer(TINY, torch.float64, seed=0), TINY)
    name = load_lora(loaded, tmp_path)
    assert lora_parameters(loaded) == []  # loaded adapters are buffers until make_trainable
    make_trainable(loaded, name, dtype=torch.float64)
    assert len(lora_parameters(loaded, name)) == 2 * len(lora_modules(model))
    assert rel_err(loaded(*inputs).detach(), ours(*inputs).detach()) < FLOAT64_TOL
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if ".lora." not in n)


# Adapters off / rescaled for one call -----------------------------------------------------------------

def test_lora_disabled_and_scaled_restore_even_on_exception():
    _, ours = twins()
    base = frozen_base()
    inputs = random_inputs(TINY)
    with torch.no_grad():
        full, plain = ours(*inputs), base(*inputs)
        with lora_disabled(ours):
            assert torch.equal(ours(*inputs), plain)
        with pytest.raises(RuntimeError, match="boom"):
            with lora_scaled(ours, 0.5):
                half = ours(*inputs)
                raise RuntimeError("boom")
        assert torch.equal(ours(*inputs), full)
        set_lora_scale(ours, "default", 0.5)
        assert torch.equal(ours(*inputs), half)
        set_lora_scale(ours, "default", 1.0)
        with lora_scaled(ours, 0.5, ["default"]), lora_disabled(ours):  # nested: the inner one wins, both undone
            assert torch.equal(ours(*inputs), plain)
        assert torch.equal(ours(*inputs), full)
    with lora_disabled(base):  # no adapters: nothing to switch off
        pass
    with pytest.raises(LoRAError, match="no adapters named"):
        with lora_disabled(ours, ["other"]):
            pass
    merge_lora(ours)
    with pytest.raises(LoRAError, match="merged"):
        with lora_disabled(ours):
            pass


def test_teacher_call_inside_the_training_step():
    """Distillation: loss(student(x), teacher(x)) with the teacher = the same module, adapters off, no grad."""
    _, ours = twins()
    base = frozen_base()
    inputs = random_inputs(TINY)
    for checkpointing in (False, True):
        ours.activation_checkpointing = checkpointing
        ours.zero_grad()
        student = ours(*inputs)
        with torch.no_grad(), lora_disabled(ours):
            teacher = ours(*inputs)
        (student - teacher).square().sum().backward()
        assert torch.equal(teacher, base(*inputs).detach())
        grads = [p.grad.clone() for p in lora_parameters(ours)]
        ours.zero_grad()
        (ours(*inputs) - teacher).square().sum().backward()
        assert all(torch.equal(a, p.grad) for a, p in zip(grads, lora_parameters(ours)))


# Activation checkpointing ------------------------------------------------------------------------------

def test_checkpointing_gives_the_same_outputs_and_gradients():
    _, ours = twins()
    inputs = random_inputs(TINY)
    results = []
    for checkpointing in (False, True):
        ours.activation_checkpointing = checkpointing
        ours.zero_grad()
        out = ours(*inputs)
        loss_of(out).backward()
        results.append((out.detach(), [p.grad.clone() for p in lora_parameters(ours)]))
    (out0, g0), (out1, g1) = results
    assert torch.equal(out0, out1)  # same kernels, same order: bitwise
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_checkpointing_recomputes_under_the_forward_scales():
    """The recomputation in backward runs after lora_scaled has ended; it must use the forward's scale."""
    _, ours = twins()
    inputs = random_inputs(TINY)
    grads = []
    for checkpointing in (False, True):
        ours.activation_checkpointing = checkpointing
        ours.zero_grad()
        with lora_scaled(ours, 0.3):
            out = ours(*inputs)
        loss_of(out).backward()
        grads.append([p.grad.clone() for p in lora_parameters(ours)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert lora_info(ours)["default"].scale == 1.0


def test_checkpointing_is_off_without_grad():
    _, ours = twins()
    ours.activation_checkpointing = True
    inputs = random_inputs(TINY)
    with torch.no_grad():
        out = ours(*inputs)
    ours.activation_checkpointing = False
    with torch.no_grad():
        assert torch.equal(out, ours(*inputs))


# save_lora and the convert command -----------------------------------------------------------------------

def peft_out(folder, inputs):
    """Outputs of diffusers' transformer (twins' base weights) with the peft adapter saved at `folder`."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(random_diffusers_transformer(TINY, torch.float64, seed=0), folder)
    with torch.no_grad():
        return call_ref(model, *inputs)


def flashsd3_out(source, inputs, **kw):
    ours = frozen_base()
    load_lora(ours, source, **kw)
    with torch.no_grad():
        return ours(*inputs)


def saved(path):
    from safetensors.torch import load_file

    return load_file(str(path))


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
    assert rel_err(peft_out(tmp_path / "ours", inputs), expected) < FLOAT64_TOL
    assert rel_err(flashsd3_out(tmp_path / "ours", inputs), expected) < FLOAT64_TOL


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
    assert rel_err(peft_out(tmp_path / "p", inputs), expected) < FLOAT64_TOL
    assert rel_err(flashsd3_out(tmp_path / "p", inputs), expected) < FLOAT64_TOL
    save_lora(ours, tmp_path / "k.safetensors", format="kohya")
    assert rel_err(flashsd3_out(tmp_path / "k.safetensors", inputs), expected) < FLOAT64_TOL


def randomize(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)


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
        assert rel_err(call_ref(ref, *inputs), expected) < FLOAT64_TOL
    assert rel_err(flashsd3_out(written, inputs), expected) < FLOAT64_TOL


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
    assert rel_err(flashsd3_out(tmp_path / "flash.safetensors", inputs), expected) < FLOAT64_TOL


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
    if PUBLISHED_KEYS is not None:  # reference/flash_sd3_adapter_keys.tsv (README F2)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == PUBLISHED_KEYS
        published = json.loads((PUBLISHED_KEYS_DIR / "flash_sd3_adapter_config.json").read_text())
        assert {k: config[k] for k in ("r", "lora_alpha", "target_modules")} == \
            {k: published[k] for k in ("r", "lora_alpha", "target_modules")}
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
        assert rel_err(flashsd3_out(source, inputs), expected) < FLOAT64_TOL, source
    assert rel_err(peft_out(tmp_path / "p", inputs), expected) < FLOAT64_TOL
    assert main([str(tmp_path / "p"), str(tmp_path / "x"), "--format", "peft", "--model-config", "sd3-medium"]) == 1


def test_save_refusals(tmp_path):
    _, ours = twins()
    with pytest.raises(LoRAError, match="format must be"):
        save_lora(ours, tmp_path, format="comfy")
    with pytest.raises(LoRAError, match="peft layout is a folder"):
        save_lora(ours, tmp_path / "a.safetensors")
    with pytest.raises(LoRAError, match="no adapter"):
        save_lora(ours, tmp_path, name="nope")
    assert list(tmp_path.iterdir()) == []
