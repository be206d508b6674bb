"""Sampling: sigma tables, Flash and Euler loops, classifier-free guidance.

References: the checked-in fixture (the Flash scheduler's sigmas: initml/diffusers fork,
`FlashFlowMatchEulerDiscreteScheduler.set_timesteps`) and diffusers 0.42.1
`FlowMatchEulerDiscreteScheduler` (plain and `stochastic_sampling=True`). Our steps compute in float32
exactly the same operations as those references, so in float32 the agreement is bitwise (tolerance 0).
"""
import json
from pathlib import Path

import pytest
import torch

from flashsd3.sampling import (
    cfg_combine,
    cfg_denoiser,
    check_sigmas,
    draw_noise,
    euler_step,
    flash_sigmas,
    flash_step,
    flow_match_sigmas,
    get_sampler,
    sample_euler,
    sample_flash,
    shift_sigmas,
    to_timesteps,
)

FIXTURE = Path(__file__).parent / "fixtures" / "flash_sigmas_shift3.json"


def diffusers_scheduler(**kw):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the parity reference (test extra)")
    return diffusers.FlowMatchEulerDiscreteScheduler(**kw)


def toy_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A velocity that depends on x and t (the model's (B,) timestep in [0, 1000])."""
    assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
    s = (t / 1000).view(-1, 1, 1, 1).to(x.dtype)
    return 0.7 * x - 0.4 * s * x + 0.25 * s - 0.1


def latents(seed: int, shape=(2, 4, 8, 8), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- sigma tables -----------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", ["1", "2", "4", "8"])
def test_flash_sigmas_match_fixture_bitwise(steps):
    ref = json.loads(FIXTURE.read_text())[steps]
    sigmas = flash_sigmas(int(steps))
    # Fixture decimals are exact float32 values: compare bitwise.
    assert sigmas.dtype == torch.float32
    assert torch.equal(sigmas, torch.tensor(ref["sigmas"], dtype=torch.float32))
    assert torch.equal(to_timesteps(sigmas[:-1]), torch.tensor(ref["timesteps"], dtype=torch.float32))


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_sigmas_match_diffusers_bitwise(shift):
    for steps in range(1, 31):
        ref = diffusers_scheduler(shift=shift)
        ref.set_timesteps(steps)
        ours = flow_match_sigmas(steps, shift)
        # Exact: same float32/float64 operations in the same order as diffusers (tolerance 0).
        assert torch.equal(ours, ref.sigmas), (shift, steps)
        assert torch.equal(to_timesteps(ours[:-1]), ref.timesteps), (shift, steps)
        # The Flash schedule is the stock flow-matching table.
        assert torch.equal(flash_sigmas(steps, shift), ours)


def test_linspace_follows_numpy_bitwise():
    import numpy as np  # a runtime dependency of flashsd3

    from flashsd3.sampling.flow_match import _linspace_like_numpy

    for num in range(1, 101):
        # float64, bitwise (tolerance 0): torch.linspace differs from numpy in the last bit for most num.
        expected = np.linspace(1000.0, 2.994011878967285, num)
        assert np.array_equal(_linspace_like_numpy(1000.0, 2.994011878967285, num).numpy(), expected), num


def test_shift_sigmas_fixes_ends_and_is_identity_at_one():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_sigmas(s, 1.0), s)
    shifted = shift_sigmas(s, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > s[1:-1]).all()
    # s*x/(1+(s-1)x) at x=0.5, s=3 is 0.75 exactly.
    assert shift_sigmas(torch.tensor([0.5], dtype=torch.float64), 3.0).item() == 0.75


# --- Flash sampler --------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_flash_loop_matches_diffusers_stochastic_sampling(steps):
    # diffusers' stochastic_sampling step: x0 = x - sigma*v; (1 - s')*x0 + s'*randn(generator, float32);
    # it also draws (and multiplies by 0) noise on the last step, which does not change the result.
    ref = diffusers_scheduler(shift=3.0, stochastic_sampling=True)
    ref.set_timesteps(steps)
    x_ref = latents(0)
    gen_ref = torch.Generator().manual_seed(1234)
    for t in ref.timesteps:
        v = toy_velocity(x_ref, t.expand(x_ref.shape[0]))
        x_ref = ref.step(v, t, x_ref, generator=gen_ref, return_dict=False)[0]

    ours = sample_flash(toy_velocity, latents(0), flash_sigmas(steps),
                        generator=torch.Generator().manual_seed(1234))
    # Same float32 ops and the same generator draws: bitwise (tolerance 0).
    assert torch.equal(ours, x_ref)


def fork_flash_loop(x, sigmas, timesteps, velocity_fn):
    """initml/diffusers fork `FlashFlowMatchEulerDiscreteScheduler.step` written out: global-RNG re-noise in the
    latent dtype, last step returns x0."""
    n = len(timesteps)
    for i in range(n):
        v = velocity_fn(x, timesteps[i].expand(x.shape[0]))
        x0 = x - v * sigmas[i]
        if i < n - 1:
            e = torch.randn(v.shape, device=v.device, dtype=x.dtype)
            x = sigmas[i + 1] * e + (1 - sigmas[i + 1]) * x0
        else:
            x = x0
    return x


def test_flash_loop_matches_written_out_fork_algorithm():
    ref = json.loads(FIXTURE.read_text())["4"]
    sigmas = torch.tensor(ref["sigmas"], dtype=torch.float32)
    timesteps = torch.tensor(ref["timesteps"], dtype=torch.float32)
    torch.manual_seed(7)
    expected = fork_flash_loop(latents(3), sigmas, timesteps, toy_velocity)
    # generator=None draws float32 from the global CPU RNG: on CPU in float32 the same draws as the fork.
    torch.manual_seed(7)
    got = sample_flash(toy_velocity, latents(3), flash_sigmas(4))
    assert torch.equal(got, expected)  # float32, identical ops: bitwise


def test_flash_step_last_step_returns_x0_and_renoise_formula():
    x, v, e = latents(1), latents(2), latents(3)
    assert torch.equal(flash_step(x, v, 0.25, 0.0, None), x - 0.25 * v)
    got = flash_step(x, v, torch.tensor(0.5), torch.tensor(0.2), e)
    # Independent float64 evaluation; the float32 result is within a few ulps (rel 1e-6 of |x| ~ 4).
    x0 = x.double() - 0.5 * v.double()
    torch.testing.assert_close(got.double(), 0.2 * e.double() + 0.8 * x0, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs noise of shape"):
        flash_step(x, v, 0.5, 0.2, e[:1])


def test_flash_seeded_runs_reproduce_and_noise_sources_agree():
    sig = flash_sigmas(4)

    def run(seed):
        return sample_flash(toy_velocity, latents(0), sig, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # A noise list / callable with the generator's draws gives the same result.
    g = torch.Generator().manual_seed(5)
    noise = [draw_noise(latents(0), g) for _ in range(3)]
    assert torch.equal(sample_flash(toy_velocity, latents(0), sig, noise=noise), a)
    assert torch.equal(sample_flash(toy_velocity, latents(0), sig, noise=lambda i, x: noise[i]), a)
    with pytest.raises(ValueError, match="noise list has 2 tensors"):
        sample_flash(toy_velocity, latents(0), sig, noise=noise[:2])
    with pytest.raises(ValueError, match="either `generator` or `noise`"):
        sample_flash(toy_velocity, latents(0), sig, noise=noise, generator=g)


def test_flash_initial_re_noises_with_the_initial_noise():
    """The flash_initial sampler (a student trained with --renoise initial): x0 = x - s v, then the forward
    process at the next sigma with the run's initial noise z, the x0 itself at the last step; written out."""
    z, sig = latents(0), flash_sigmas(4)
    got = get_sampler("flash_initial").run(toy_velocity, z, sig, z, None)
    x = z
    for i in range(4):
        x0 = x - sig[i] * toy_velocity(x, (1000 * sig[i]).expand(len(x)))
        x = x0 if i == 3 else sig[i + 1] * z + (1 - sig[i + 1]) * x0
    torch.testing.assert_close(got, x, rtol=0, atol=0)  # the same float32 operations in the same order
    assert torch.equal(got, sample_flash(toy_velocity, z, sig, noise=[z, z, z]))
    assert get_sampler("flash_initial").same_noise and not get_sampler("flash").same_noise
    with pytest.raises(ValueError, match="re-noises with the initial noise: pass it as one tensor"):
        get_sampler("flash_initial").run(toy_velocity, z, sig, [z, z, z], None)


def test_flash_keeps_latent_dtype_and_calls_back():
    seen = []
    out = sample_flash(toy_velocity, latents(0, dtype=torch.bfloat16), flash_sigmas(4),
                       generator=torch.Generator().manual_seed(0), callback=lambda i, x: seen.append((i, x.dtype)))
    assert out.dtype == torch.bfloat16
    assert seen == [(i, torch.bfloat16) for i in range(4)]


@pytest.mark.gpu
def test_flash_seed_reproduces_across_devices():
    # Noise is drawn on the CPU generator and moved: bitwise the same draws on CUDA.
    x = latents(0)
    assert torch.equal(draw_noise(x.cuda(), torch.Generator().manual_seed(3)).cpu(),
                       draw_noise(x, torch.Generator().manual_seed(3)))
    cpu = sample_flash(toy_velocity, x, flash_sigmas(4), generator=torch.Generator().manual_seed(3))
    gpu = sample_flash(toy_velocity, x.cuda(), flash_sigmas(4), generator=torch.Generator().manual_seed(3))
    # Only the toy velocity's float32 kernels may round differently on CUDA (fp32: 1e-5).
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


# --- Euler sampler --------------------------------------------------------------------------------

@pytest.mark.parametrize("shift,steps", [(3.0, 4), (3.0, 28), (1.0, 10), (6.0, 7)])
def test_euler_loop_matches_diffusers(shift, steps):
    ref = diffusers_scheduler(shift=shift)
    ref.set_timesteps(steps)
    x_ref = latents(0)
    for t in ref.timesteps:
        x_ref = ref.step(toy_velocity(x_ref, t.expand(x_ref.shape[0])), t, x_ref, return_dict=False)[0]
    ours = sample_euler(toy_velocity, latents(0), flow_match_sigmas(steps, shift))
    # diffusers computes sample + dt * v in float32 with dt a float32 0-dim tensor; so do we: bitwise.
    assert torch.equal(ours, x_ref)


def test_euler_step_float32_update_in_low_precision():
    x, v = latents(1, dtype=torch.float16), latents(2, dtype=torch.float16)
    out = euler_step(x, v, torch.tensor(0.75), torch.tensor(0.5))
    assert out.dtype == torch.float16
    # One rounding to fp16 of the float32 update: within half an fp16 ulp (2^-11 relative) of float64.
    exact = x.double() - 0.25 * v.double()
    torch.testing.assert_close(out.double(), exact, rtol=2**-11, atol=2**-24)


def test_custom_sigmas_accepted_by_both_samplers():
    custom = [1.0, 0.75, 0.5, 0.25]  # 0 appended
    assert torch.equal(check_sigmas(custom), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert torch.equal(check_sigmas(torch.tensor([0.8, 0.0], dtype=torch.float64)), torch.tensor([0.8, 0.0]))
    calls = []
    sample_euler(lambda x, t: calls.append(t[0].item()) or toy_velocity(x, t), latents(0), custom)
    sample_flash(lambda x, t: calls.append(t[0].item()) or toy_velocity(x, t), latents(0), custom,
                 generator=torch.Generator().manual_seed(0))
    assert calls == [1000.0, 750.0, 500.0, 250.0] * 2


@pytest.mark.parametrize("bad,msg", [
    ([[1.0, 0.5]], "1-D"),
    ([], "non-empty"),
    ([1.0, 0.5, 0.7, 0.0], "strictly decreasing"),
    ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
    ([0.0], "at least one step"),
    ([1.5, 0.5, 0.0], r"within \[0, 1\]"),
    ([1.0, -0.1], r"within \[0, 1\]"),
    ([1.0, float("nan"), 0.0], "finite"),
])
def test_custom_sigma_validation_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        check_sigmas(bad)
    with pytest.raises(ValueError, match=msg):
        sample_euler(toy_velocity, latents(0), bad)


def test_num_steps_validation():
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="num_steps"):
            flow_match_sigmas(bad)


# --- classifier-free guidance ---------------------------------------------------------------------

def make_model(log):
    def model_fn(x, t, ctx, pooled):  # per-sample elementwise: batching cannot change a sample's result
        log.append((x.shape[0], ctx.clone(), pooled.clone(), t.clone()))
        return x * ctx[:, :1, :1].unsqueeze(-1) + pooled[:, :1, None, None] + t.view(-1, 1, 1, 1) / 1000
    return model_fn


def test_cfg_batches_uncond_then_cond_and_combines():
    x, t = latents(0), torch.full((2,), 857.5)
    g = torch.Generator().manual_seed(0)
    pos = (torch.randn(2, 3, 5, generator=g), torch.randn(2, 4, generator=g))
    neg = (torch.randn(2, 3, 5, generator=g), torch.randn(2, 4, generator=g))
    log = []
    v = cfg_denoiser(make_model(log), cond=pos, uncond=neg, guidance=7.0)(x, t)
    (batch, ctx, pooled, t_in), = log  # one model call on the doubled batch
    assert batch == 4 and torch.equal(ctx, torch.cat([neg[0], pos[0]])) and torch.equal(pooled[:2], neg[1])
    assert torch.equal(t_in, torch.cat([t, t]))
    v_u, v_c = make_model([])(x, t, *neg), make_model([])(x, t, *pos)
    assert torch.equal(v, v_u + 7.0 * (v_c - v_u))  # same float32 ops: bitwise
    assert torch.equal(cfg_combine(v_u, v_c, 7.0), v)


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_cfg_skipped_when_guidance_at_most_one(guidance):
    x, t = latents(0), torch.full((2,), 1000.0)
    pos = (torch.randn(2, 3, 5), torch.randn(2, 4))
    log = []
    v = cfg_denoiser(make_model(log), cond=pos, uncond=None, guidance=guidance)(x, t)
    assert len(log) == 1 and log[0][0] == 2  # only the conditional batch, uncond not needed
    assert torch.equal(v, make_model([])(x, t, *pos))


def test_cfg_needs_uncond():
    with pytest.raises(ValueError, match="needs `uncond`"):
        cfg_denoiser(make_model([]), cond=(torch.zeros(1, 2, 3), torch.zeros(1, 4)), guidance=3.0)


def test_flash_loop_draws_noise_and_timesteps_before_the_first_model_call(monkeypatch):
    """Host-to-device copies happen before the loop: none is left between model calls (on a GPU a
    blocking copy there makes the host wait for every step)."""
    from flashsd3.sampling import flash as flash_module

    events = []
    real_draw = flash_module.draw_noise
    monkeypatch.setattr(flash_module, "draw_noise", lambda x, g=None: events.append("draw") or real_draw(x, g))
    timesteps = []

    def denoise(x, t):
        events.append("model")
        timesteps.append(t)
        return torch.zeros_like(x)

    generator = torch.Generator().manual_seed(0)
    flash_module.sample_flash(denoise, torch.zeros(2, 4, 8, 8), flash_sigmas(4), generator=generator)
    assert events == ["draw"] * 3 + ["model"] * 4
    assert len({t.untyped_storage().data_ptr() for t in timesteps}) == 1  # one table, indexed per step
    assert [t.tolist() for t in timesteps][1] == [to_timesteps(flash_sigmas(4))[1].item()] * 2
