"""DPM-Solver++(2M) (flashsd3/sampling/dpm.py) against a float64 derivation written out here.

The derivation follows Lu et al. 2022 ("DPM-Solver++", Algorithm 2, multistep second order) in the form
Stability's SD3.5 reference uses (sd3_impls.py `sample_dpmpp_2m`: x0 = x - sigma * v, lambda = -log sigma,
alpha = 1), written with plain ratios instead of exponentials: with h_i = log(s_i / s_{i+1}),
    D_i' = D_i + (D_i - D_{i-1}) * h_i / (2 h_{i-1})   (D_0' = D_0; and first order into s = 0)
    x_{i+1} = (s_{i+1} / s_i) x_i + (1 - s_{i+1} / s_i) D_i'.
"""
import math

import torch

from flashsd3.sampling import SAMPLERS, flow_match_sigmas, sample_dpmpp_2m, sample_euler


def toy_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s = (t / 1000).view(-1, 1, 1, 1).to(x.dtype)
    return 0.7 * x - 0.4 * s * x + 0.25 * s - 0.1


def derivation(velocity, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """float64 DPM-Solver++(2M), independent of the code under test (see the module docstring)."""
    x = x.double()
    prev = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        t = torch.full((x.shape[0],), s * 1000, dtype=torch.float32)  # the model's float32 timestep
        d = x - s * velocity(x, t)
        if s_next == 0:
            x = d
        else:
            d2 = d if prev is None else d + (d - prev) * math.log(s / s_next) / (2 * math.log(sigmas[i - 1] / s))
            x = (s_next / s) * x + (1 - s_next / s) * d2
        prev = d
    return x


def latents(seed, dtype=torch.float64):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_dpmpp_2m_matches_float64_derivation():
    for steps in (1, 2, 3, 10, 50):
        sigmas = flow_match_sigmas(steps, 3.0)
        ref = derivation(toy_velocity, latents(steps), sigmas.double().tolist())
        ours64 = sample_dpmpp_2m(toy_velocity, latents(steps), sigmas)
        assert ours64.dtype == torch.float64
        assert rel(ours64, ref) < 1e-13, (steps, rel(ours64, ref))  # exp(-log) vs ratios; measured <= 3.1e-15
        ours32 = sample_dpmpp_2m(toy_velocity, latents(steps, torch.float32), sigmas)
        assert ours32.dtype == torch.float32
        assert rel(ours32, ref) < 1e-5, (steps, rel(ours32, ref))  # float32 steps; measured <= 2.3e-6


def test_second_order_term_is_used():
    """Against first-order steps (DPM-Solver++(1) = DDIM in x0 form): different after step 1."""
    sigmas = flow_match_sigmas(6, 3.0)
    x = latents(0)
    first_order = x.clone()
    s = sigmas.double().tolist()
    for i in range(len(s) - 1):
        t = torch.full((2,), s[i] * 1000, dtype=torch.float32)
        d = first_order - s[i] * toy_velocity(first_order, t)
        first_order = d if s[i + 1] == 0 else (s[i + 1] / s[i]) * first_order + (1 - s[i + 1] / s[i]) * d
    assert rel(sample_dpmpp_2m(toy_velocity, x, sigmas), first_order) > 1e-3
    # and first order in x0 form is exactly Euler on the velocity: (s'/s) x + (1 - s'/s)(x - s v) = x + (s' - s) v
    assert rel(first_order, sample_euler(toy_velocity, x, sigmas)) < 1e-6  # Euler steps in float32


def test_straight_path_is_solved_exactly():
    """If every path is straight towards one x0 (v = (x - x0) / sigma), both orders land on x0."""
    target = latents(5)

    def velocity(x, t):
        return (x - target) / (t / 1000).view(-1, 1, 1, 1).double()

    out = sample_dpmpp_2m(velocity, latents(6), flow_match_sigmas(8, 3.0))
    assert rel(out, target) < 1e-12


def test_in_the_sampler_table_with_callbacks():
    seen = []
    x = latents(1, torch.float32)
    sigmas = flow_match_sigmas(4, 3.0)
    out = SAMPLERS["dpmpp_2m"].run(toy_velocity, x, sigmas, None, lambda i, y: seen.append(i))
    assert seen == [0, 1, 2, 3] and torch.equal(out, sample_dpmpp_2m(toy_velocity, x, sigmas))
    assert not SAMPLERS["dpmpp_2m"].stochastic and SAMPLERS["flash"].stochastic
