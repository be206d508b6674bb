"""The rectified-flow training objective (flashsd3/training/objectives.py) against hand derivations."""
import math

import pytest
import torch

from flashsd3.config import TINY
from flashsd3.mmdit import MMDiT
from flashsd3.sampling import forward_process, shift_sigmas
from flashsd3.training.objectives import (
    discrete_sigmas,
    drop_conditioning,
    flow_matching_loss,
    logit_normal_sigmas,
    training_sigma_table,
    uniform_sigmas,
)


def test_forward_process_per_sample_and_scalar():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    e = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    s = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x = forward_process(x0, e, s)
    assert torch.equal(x[0], x0[0]) and torch.equal(x[2], e[2])  # sigma 0 = data, 1 = noise, exactly
    torch.testing.assert_close(x[1], 0.3 * e[1] + 0.7 * x0[1], rtol=0, atol=1e-15)  # fp64 rounding
    assert forward_process(x0.half(), e.half(), 0.5).dtype == torch.float16


def test_logit_normal_matches_its_density():
    # sigmoid(N(0,1)): median 0.5, P(sigma < sigmoid(1)) = Phi(1) = 0.8413; 200k draws -> std. error ~0.001
    s = logit_normal_sigmas(200_000, generator=torch.Generator().manual_seed(0))
    assert abs(s.median().item() - 0.5) < 0.005
    assert abs((s < 1 / (1 + math.exp(-1))).double().mean().item() - 0.8413) < 0.005
    # the shift map is applied to the draw
    s3 = logit_normal_sigmas(10, shift=3.0, generator=torch.Generator().manual_seed(1))
    s1 = logit_normal_sigmas(10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s3, shift_sigmas(s1, 3.0))


def test_uniform_and_discrete_samplers():
    u = uniform_sigmas(100_000, generator=torch.Generator().manual_seed(0))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    table = training_sigma_table(3.0)
    assert table[0] == 1 and len(table) == 1000
    assert table[-1] == shift_sigmas(torch.tensor(1 / 1000), 3.0)
    sig, idx = discrete_sigmas(50, table, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sig, table[idx])


def test_flow_matching_loss_is_the_velocity_mse():
    torch.manual_seed(0)
    model = MMDiT(TINY).double()
    x0, e = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    ctx, pooled = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 24, dtype=torch.float64)
    sigma = torch.tensor([0.25, 0.8])
    loss = flow_matching_loss(model, x0, (ctx, pooled), sigma, e)
    x = (sigma.double().view(-1, 1, 1, 1) * e + (1 - sigma.double().view(-1, 1, 1, 1)) * x0)
    v = model(x, sigma * 1000, ctx, pooled)
    torch.testing.assert_close(loss, ((v - (e - x0)) ** 2).mean().float(), rtol=1e-6, atol=0)  # loss is fp32


def test_init_weights_starts_every_block_as_identity():
    torch.manual_seed(0)
    model = MMDiT(TINY).init_weights()
    x, ctx, vec = torch.randn(2, 16, 16), torch.randn(2, 5, 16), torch.randn(2, 16)
    for block in model.joint_blocks:
        out_ctx, out_x = block(ctx, x, vec)
        assert torch.equal(out_x, x) and (out_ctx is None or torch.equal(out_ctx, ctx))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300.0])
    assert model(x, t, torch.randn(1, 5, 32), torch.randn(1, 24)).abs().max() == 0


def test_drop_conditioning():
    g = torch.Generator().manual_seed(0)
    cond = (torch.ones(8, 3, 2), torch.ones(8, 4))
    empty = (torch.zeros(1, 3, 2), torch.zeros(1, 4))
    assert all(torch.equal(a, b) for a, b in zip(drop_conditioning(cond, empty, 0.0, g), cond, strict=True))
    dropped = drop_conditioning(cond, empty, 1.0, g)
    assert all(d.abs().sum() == 0 for d in dropped)
    half = drop_conditioning(cond, empty, 0.5, torch.Generator().manual_seed(3))
    rows = half[1].sum(1)
    assert torch.equal(half[0].sum((1, 2)) == 0, rows == 0)  # the same samples dropped in every tensor
    with pytest.raises(ValueError, match="dropout"):
        drop_conditioning(cond, empty, 1.5)


def test_teacher_partial_solve_from_sigma_k():
    """A distillation teacher's solve: from x at sigma_k of a K-step grid down to 0, with CFG, in exactly K - k
    model calls at the grid's timesteps (check_sigmas accepts a schedule that does not start at 1)."""
    from flashsd3.sampling import cfg_denoiser, flow_match_sigmas, sample_euler

    K, k, w = 8, 3, 4.0
    sigmas = flow_match_sigmas(K, 3.0)
    g = torch.Generator().manual_seed(0)
    x0, x1, noise = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(3))
    calls = []

    def model(x, t, target):
        # the exact flow towards one point `target`: v = (x - target) / sigma, so Euler is exact at any step
        calls.append(t.clone())
        return (x - target) / (t / 1000).view(-1, 1, 1, 1)

    x_k = forward_process(x0, noise, sigmas[k])
    out = sample_euler(cfg_denoiser(model, (x0,), (x1,), w), x_k, sigmas[k:])
    assert len(calls) == K - k  # one batched [uncond, cond] call per step
    torch.testing.assert_close(torch.stack([c[0] for c in calls]), sigmas[k:-1] * 1000, rtol=0, atol=0)
    # CFG of two such flows is the flow towards x1 + w (x0 - x1); fp32 Euler updates: a few ulp per step
    torch.testing.assert_close(out, x1 + w * (x0 - x1), rtol=1e-5, atol=1e-5)
