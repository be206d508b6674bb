"""Toy Flash distillation pieces (flashsd3/toy/distill.py): the bank of teacher trajectories, paired sampling."""
from dataclasses import replace

import torch

from flashsd3.sampling import cfg_denoiser, flow_match_sigmas, sample_euler
from flashsd3.toy.data import balanced_labels
from flashsd3.toy.distill import TOY_FLASH, flash_samples, make_bank
from flashsd3.toy.model import build_teacher, generate


def _teacher():
    model, text = build_teacher(seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # DiT init predicts 0: perturb every weight so the trajectories move
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval(), text.eval()


def test_bank_rows_are_teacher_cfg_trajectories():
    model, text = _teacher()
    recipe = replace(TOY_FLASH, teacher_steps=6, guidance_min=3.0, guidance_max=3.0)  # one w: bank = generate()
    bank = make_bank(model, text, recipe, 5, torch.Generator().manual_seed(1), chunk=2)
    g = torch.Generator().manual_seed(1)
    torch.randint(3, (5,), generator=g), torch.randint(4, (5,), generator=g), torch.randint(4, (5,), generator=g)
    torch.rand(5, generator=g)
    noise = torch.randn(5, 3, 16, 16, generator=g)  # make_bank's draw order: labels, w, noise
    assert torch.equal(bank.states[:, 0], noise)  # index 0 = sigma 1 = the noise
    want = generate(model, text, bank.labels, noise, steps=6, guidance=3.0, shift=3.0)
    torch.testing.assert_close(bank.final, want, rtol=0, atol=1e-5)  # fp32; batched [neg, cond] vs cfg_denoiser
    # a stored state at index k continues to the stored end over grid[k:] (what a bank start + target mean)
    denoise = cfg_denoiser(model, text(bank.labels), text.empty(5), 3.0)
    with torch.no_grad():
        rest = sample_euler(denoise, bank.states[:, 2], flow_match_sigmas(6, 3.0)[2:])
    torch.testing.assert_close(rest, bank.final, rtol=0, atol=1e-5)


def test_flash_samples_are_paired_across_chunking():
    model, text = _teacher()
    labels, noise = balanced_labels(6), torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    a = flash_samples(model, text, labels, noise, 4, batch=6)
    b = flash_samples(model, text, labels, noise, 4, batch=4)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # same re-noise draws per sample whatever the chunks
