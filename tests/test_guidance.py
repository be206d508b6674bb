"""Denoiser stages (flashsd3/sampling/guidance.py): the skip-layer guidance window and formula, the
inpainting blend, and their step counting. Parity with diffusers end to end is in tests/test_pipeline_sd35.py
(skip-layer guidance) and tests/test_pipeline_edit.py (inpainting)."""
import pytest
import torch

from flashsd3.sampling import (
    InpaintConstraint,
    SkipLayerGuidance,
    flow_match_sigmas,
    forward_process,
    sample_euler,
    skip_layer_denoiser,
)


def test_window_is_diffusers_rule():
    """diffusers: i > steps * start and i < steps * stop (pipeline_stable_diffusion_3.py)."""
    slg = SkipLayerGuidance(layers=(7, 8, 9), scale=2.5, start=0.01, stop=0.2)
    assert [i for i in range(50) if slg.active(i, 50)] == list(range(1, 10))  # Stability's SD3.5-medium run
    assert [i for i in range(28) if slg.active(i, 28)] == [1, 2, 3, 4, 5]
    assert not any(slg.active(i, 4) for i in range(4))  # 4 steps: 0.04 < i < 0.8 holds for no step


@pytest.mark.parametrize("kw, match", [
    ({"layers": ()}, "non-empty list"),
    ({"layers": (1, -1)}, "non-empty list"),
    ({"layers": "7"}, "non-empty list"),
    ({"layers": (1,), "scale": float("nan")}, "skip_layer_guidance_scale must be a finite number"),
    ({"layers": (1,), "start": 0.3, "stop": 0.2}, "start < skip_layer_guidance_stop"),
    ({"layers": (1,), "stop": 1.5}, "<= 1"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        SkipLayerGuidance(**kw)


def test_skip_layer_denoiser_calls_and_formula():
    calls = []

    def model(x, t, ctx, skip_blocks=()):
        calls.append((x.shape[0], tuple(skip_blocks)))
        return x * (1 + ctx.view(-1, 1, 1, 1)) + 0.1 * len(skip_blocks)

    slg = SkipLayerGuidance(layers=(1,), scale=2.0, start=0.2, stop=0.6)  # 5 steps: on at i = 2 only
    cond, uncond = (torch.tensor([1.0]),), (torch.tensor([0.0]),)
    denoise = skip_layer_denoiser(model, cond, uncond, 3.0, slg, num_steps=5)
    x, t = torch.ones(1, 1, 1, 1), torch.zeros(1)
    outs = [denoise(x, t) for _ in range(5)]
    assert calls == [(2, ()), (2, ()), (2, ()), (1, (1,)), (2, ()), (2, ())]  # [uncond, cond] batch, then cond alone
    v_u, v_c, v_skip = 1.0, 2.0, 2.1
    cfg = v_u + 3.0 * (v_c - v_u)
    assert outs[0].item() == cfg and outs[2].item() == pytest.approx(cfg + (v_c - v_skip) * 2.0, abs=1e-6)
    with pytest.raises(RuntimeError, match="called 6 times for 5 steps"):
        denoise(x, t)


def test_inpaint_constraint_blends_inputs_and_results():
    g = torch.Generator().manual_seed(0)
    image, noise, x = (torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask[..., :2, :] = 1  # repaint the top half
    sigmas = flow_match_sigmas(3, 3.0)
    c = InpaintConstraint(image, noise, mask, sigmas)
    seen = []
    denoise = c.wrap(lambda x_in, t: seen.append(x_in) or torch.zeros_like(x_in))
    denoise(x, torch.zeros(1))
    known = forward_process(image, noise, sigmas[0])
    assert torch.equal(seen[0][..., 2:, :], known[..., 2:, :]) and torch.equal(seen[0][..., :2, :], x[..., :2, :])
    assert torch.equal(c.finish(2, x)[..., 2:, :], image[..., 2:, :])  # after the last step: the clean image
    # through a sampler: the kept half ends as the image exactly, the repainted half as the plain run
    c = InpaintConstraint(image, noise, mask, sigmas)
    plain = sample_euler(lambda y, t: 0.5 * y, x, sigmas)
    out = c.finish(2, sample_euler(c.wrap(lambda y, t: 0.5 * y), x, sigmas))
    assert torch.equal(out[..., 2:, :], image[..., 2:, :]) and torch.equal(out[..., :2, :], plain[..., :2, :])
