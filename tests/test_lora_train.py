"""Trainable adapters (flashsd3.lora.train) and activation checkpointing vs peft on tiny SD3 transformers."""
import json
import math
from pathlib import Path

import pytest
import torch

from flashsd3 import SD3_MEDIUM, TINY, MMDiT
from flashsd3.lora import (
    LoRAError,
    add_lora,
    load_lora,
    load_lora_state_dict,
    lora_disabled,
    lora_info,
    lora_parameters,
    lora_scaled,
    lora_state_dict,
    make_trainable,
    merge_lora,
    named_lora_parameters,
    remove_lora,
    set_lora_scale,
)
from flashsd3.lora.checkpointing import checkpoint_blocks
from flashsd3.lora.train import FLASH_SD3_TARGETS, our_rows

pytest.importorskip("diffusers", reason="diffusers is the parity reference (test extra)")
pytest.importorskip("peft", reason="peft is the parity reference (test extra)")
from helpers_lora_train import (  # noqa: E402
    FLOAT64_TOL,
    call_ref,
    frozen_base,
    grad_close,
    lora_modules,
    loss_of,
    our_update,
    ours_from_diffusers,
    peft_ab,
    twins,
)
from helpers_mmdit import random_diffusers_transformer, random_inputs  # noqa: E402
from metrics import rel_l2  # noqa: E402

# add_lora --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets, peft_targets", [("flash-sd3", FLASH_SD3_TARGETS), ("all-linear", "all-linear")])
def test_gradients_equal_peft(targets, peft_targets):
    model, ours = twins(targets, peft_targets)
    assert len(named_lora_parameters(ours)) == 2 * len(lora_modules(model))
    inputs = random_inputs(TINY)
    expected = call_ref(model, *inputs)
    out = ours(*inputs)
    assert rel_l2(out.detach(), expected.detach()) < FLOAT64_TOL
    loss_of(expected).backward()
    loss_of(out).backward()
    for path, (A, B) in peft_ab(model).items():
        update, target = our_update(ours, path)
        assert grad_close(update.A.grad, A.grad), path
        assert grad_close(our_rows(target, update.B.grad), B.grad), path
    assert all(p.grad is None for n, p in ours.named_parameters() if ".lora." not in n)


def test_one_sgd_step_on_a_float64_model_equals_peft():
    """add_lora without dtype= on a float64 model makes float64 adapters, as peft does, so a training step
    agrees with peft's to float64 rounding (float32 adapters drifted by ~4e-8)."""
    model, ours = twins(dtype=None)
    inputs = random_inputs(TINY)
    opt_ref, opt_ours = (torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (model, ours))
    loss_of(call_ref(model, *inputs)).backward()
    loss_of(ours(*inputs)).backward()
    opt_ref.step()
    opt_ours.step()
    for path, (A, B) in peft_ab(model).items():
        update, target = our_update(ours, path)
        assert update.A.dtype == torch.float64 and grad_close(update.A.grad, A.grad), path
        assert (update.A - A).norm() <= FLOAT64_TOL * A.norm(), path
        assert (our_rows(target, update.B.detach()) - B).norm() <= FLOAT64_TOL * B.norm(), path


def test_add_lora_starts_as_the_base_model_and_freezes_it():
    base = MMDiT(TINY).double().requires_grad_(False)  # at::linear picks its kernel by requires_grad: freeze both
    ours = MMDiT(TINY).double()
    ours.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(0)
    name = add_lora(ours, rank=3, alpha=2.0, targets="all-linear", generator=g)
    inputs = random_inputs(TINY)
    assert torch.equal(ours(*inputs), base(*inputs))  # B = 0
    params = named_lora_parameters(ours, name)
    assert all(p.dtype == torch.float64 and p.requires_grad for _, p in params)  # as peft: the base's float64
    add_lora(ours, rank=2, alpha=2.0, targets=["attn.qkv"], name="f32", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for _, p in named_lora_parameters(ours, "f32"))  # unless asked otherwise
    remove_lora(ours, "f32")
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
    # peft's key set for the published config (tests/fixtures/flash_sd3_adapter_keys.tsv)
    assert len(params) == 444 and sum(p.numel() for p in params) == 87_646_208
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
    assert rel_l2(loaded(*inputs).detach(), ours(*inputs).detach()) < FLOAT64_TOL
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
        checkpoint_blocks(ours, checkpointing)
        ours.zero_grad()
        student = ours(*inputs)
        with torch.no_grad(), lora_disabled(ours):
            teacher = ours(*inputs)
        (student - teacher).square().sum().backward()
        assert torch.equal(teacher, base(*inputs).detach())
        grads = [p.grad.clone() for p in lora_parameters(ours)]
        ours.zero_grad()
        (ours(*inputs) - teacher).square().sum().backward()
        assert all(torch.equal(a, p.grad) for a, p in zip(grads, lora_parameters(ours), strict=True))


# Activation checkpointing ------------------------------------------------------------------------------

def test_checkpointing_gives_the_same_outputs_and_gradients():
    _, ours = twins()
    inputs = random_inputs(TINY)
    results = []
    for checkpointing in (False, True):
        checkpoint_blocks(ours, checkpointing)
        ours.zero_grad()
        out = ours(*inputs)
        loss_of(out).backward()
        results.append((out.detach(), [p.grad.clone() for p in lora_parameters(ours)]))
    (out0, g0), (out1, g1) = results
    assert torch.equal(out0, out1)  # same kernels, same order: bitwise
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


def test_checkpointing_recomputes_under_the_forward_scales():
    """The recomputation in backward runs after lora_scaled has ended; it must use the forward's scale."""
    _, ours = twins()
    inputs = random_inputs(TINY)
    grads = []
    for checkpointing in (False, True):
        checkpoint_blocks(ours, checkpointing)
        ours.zero_grad()
        with lora_scaled(ours, 0.3):
            out = ours(*inputs)
        loss_of(out).backward()
        grads.append([p.grad.clone() for p in lora_parameters(ours)])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert lora_info(ours)["default"].scale == 1.0


def test_checkpointing_is_off_without_grad():
    _, ours = twins()
    checkpoint_blocks(ours)
    inputs = random_inputs(TINY)
    with torch.no_grad():
        out = ours(*inputs)
    checkpoint_blocks(ours, False)
    with torch.no_grad():
        assert torch.equal(out, ours(*inputs))


# One training step at SD3-medium size ---------------------------------------------------------------------

def one_sd3_medium_step(dtype=torch.bfloat16, checkpointing=True) -> dict:
    """One flash-sd3 LoRA step (AdamW) on a random SD3-medium MMDiT at 256x256 (latent 32x32, 154 text
    tokens as the Flash recipe), per-block checkpointing on; times, RSS before the step and peak RSS."""
    import resource
    import time

    import torch.nn.functional as F

    from flashsd3.mmdit.embeddings import sincos_2d_table

    def rss_gib():  # peak so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB

    def current_rss_gib():
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**30

    torch.manual_seed(0)
    with torch.device("meta"):
        model = MMDiT(SD3_MEDIUM)
    model = model.to(dtype).to_empty(device="cpu")
    c = SD3_MEDIUM
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        model.pos_embed.copy_(sincos_2d_table(c.hidden_size, c.pos_embed_max_size, c.sample_size // c.patch_size)[None])
    add_lora(model, rank=64, alpha=8)
    checkpoint_blocks(model, checkpointing)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    x0, noise = torch.randn(1, 16, 32, 32), torch.randn(1, 16, 32, 32)
    context = torch.cat([torch.randn(1, 77, 4096), torch.zeros(1, 77, 4096)], dim=1)  # CLIP + zero T5 slot
    sigma = torch.tensor([0.7])
    x = sigma * noise + (1 - sigma) * x0  # forward process, velocity target noise - x0
    probe = model.joint_blocks[3].x_block.mlp.fc1.weight.clone()
    before = current_rss_gib()  # weights, adapters, inputs
    t0 = time.perf_counter()
    velocity = model(x.to(dtype), 1000 * sigma.to(dtype), context.to(dtype), torch.randn(1, 2048).to(dtype))
    t1 = time.perf_counter()
    loss = F.mse_loss(velocity.float(), noise - x0)
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    return dict(dtype=str(dtype), checkpointing=checkpointing, loss=loss.item(), forward_s=t1 - t0,
                backward_s=t2 - t1, step_s=t3 - t2,
                rss_before_step_gib=before, peak_rss_gib=rss_gib(), lora_params=sum(p.numel() for p in params),
                grads_finite=all(bool(p.grad.isfinite().all()) for p in params),
                b_moved=sum(int(p.any()) for n, p in named_lora_parameters(model) if n.endswith(".B")),
                base_unchanged=bool(torch.equal(probe, model.joint_blocks[3].x_block.mlp.fc1.weight)))


@pytest.mark.slow
def test_one_lora_step_at_sd3_medium_size_on_cpu():
    """Run in a fresh process so that its peak RSS is the step's own."""
    import os
    import subprocess
    import sys

    code = ("import json, sys; sys.path.insert(0, 'tests'); from test_lora_train import one_sd3_medium_step; "
            "print('RESULT', json.dumps(one_sd3_medium_step()))")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    result = json.loads(run.stdout.split("RESULT", 1)[1])
    print(result)
    assert result["lora_params"] == 87_646_208 and result["grads_finite"] and result["base_unchanged"]
    assert result["b_moved"] == 222 and math.isfinite(result["loss"])  # every B left zero after one AdamW step
    weights_gib = 2_084_951_104 * 2 / 2**30  # bf16 SD3-medium: its 2,084,951,104 values (tests/fixtures key list)
    assert result["peak_rss_gib"] < weights_gib + 6  # adapters + AdamW state ~1.4 GiB, checkpointed activations
