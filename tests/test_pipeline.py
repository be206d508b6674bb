"""FlashSD3Pipeline end to end against diffusers' StableDiffusion3Pipeline (reference only) on the same
tiny random models (tests/helpers_pipeline.py), and the pipeline's input checks.

Both pipelines get the same initial latents (`latents=`). diffusers' stochastic step draws its re-noise
from the global torch RNG (it passes no generator to the scheduler), so the global RNG is seeded before
the diffusers call and ours gets a generator with the same seed: the same draws, in the same order.

Tolerances (measured values in comments): float32 latents relative error < 1e-6 (relative = max |d| /
max |ref|), < 1e-5 with guidance 7 (v_u + 7 (v_c - v_u) scales the velocities' rounding up to 15x);
images in [0, 1] max abs < 1e-5, the fp32 floor of the VAE decoder itself (~2e-6 on these random
weights; tests/test_vae.py).

float64: every model in the chain agrees to ~1e-15, but the sampler step is float32 arithmetic on
both sides: diffusers' scheduler casts the sample to float32 (and keeps the velocity's float64),
flashsd3.sampling casts both to float32 on purpose. Plain float64 runs therefore agree to float32
rounding only (< 1e-6); with diffusers' step arithmetic swapped into our sampler, the rest of the chain
agrees to < 1e-12 in the latents and the images (measured ~4e-15).
"""
from __future__ import annotations

import copy

import pytest
import torch

from flashsd3 import FlashSD3Pipeline
from flashsd3.pipeline import PerImageNoise
from flashsd3.sampling import flash as flash_module
from flashsd3.sampling import flash_sigmas, flow_match_sigmas
from flashsd3.sampling import flow_match as flow_match_module

pytest.importorskip("diffusers", reason="diffusers is the parity reference (pip install .[test])")
from helpers_pipeline import initial_latents, make_twins, run_diffusers, run_ours  # noqa: E402
from metrics import max_abs, rel_max  # noqa: E402

PROMPTS = ["a photo of a cat", "the dog on mars"]
NEGATIVE = ["blurry", "a cat"]
H, W = 64, 96  # non-square: 16 x 24 latents, 8 x 12 tokens


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """twins(dtype, stochastic) -> Twins, built once per module (building is ~1 s)."""
    cache = {}

    def get(dtype: torch.dtype, stochastic: bool):
        if (dtype, stochastic) not in cache:
            cache[dtype, stochastic] = make_twins(tmp_path_factory.mktemp("twins"), dtype, stochastic=stochastic)
        return cache[dtype, stochastic]

    return get


def compare(ours, ref):
    """(images max abs error, latents relative error over all steps)."""
    (img, lat), (ref_img, ref_lat) = ours, ref
    assert img.shape == ref_img.shape and len(lat) == len(ref_lat)
    assert img.dtype == ref_img.dtype  # the VAE's dtype, at least float32, as diffusers
    return max_abs(img, ref_img), max(rel_max(a, b) for a, b in zip(lat, ref_lat, strict=True))


def diffusers_flash_step(x, velocity, sigma, sigma_next, noise):
    """diffusers' stochastic step arithmetic: sample cast to float32, x0 in the velocity's dtype."""
    sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    x0 = x.float() - sigma * velocity
    out = x0 if sigma_next == 0 else (1 - sigma_next) * x0 + sigma_next * noise
    return out.to(velocity.dtype)


def diffusers_euler_step(x, velocity, sigma, sigma_next):
    """diffusers' Euler step arithmetic: sample cast to float32, update in the velocity's dtype."""
    return (x.float() + (torch.as_tensor(sigma_next) - torch.as_tensor(sigma)) * velocity).to(velocity.dtype)


# Flash sampler (stochastic), no guidance: the Flash SD3 recipe --------------------------------

@pytest.mark.parametrize("steps", [1, 2, 4])
def test_flash_matches_diffusers_float32(twins, steps):
    tw = twins(torch.float32, True)
    lat = initial_latents(2, H, W, torch.float32, seed=steps)
    kw = dict(height=H, width=W, latents=lat)
    ref = run_diffusers(tw.ref, PROMPTS, seed=7, num_inference_steps=steps, guidance_scale=0, **kw)
    # the stochastic diffusers scheduler runs the published Flash table (tests/fixtures; initml/diffusers fork
    # FlashFlowMatchEulerDiscreteScheduler.set_timesteps)
    assert torch.equal(tw.ref.scheduler.sigmas, flash_sigmas(steps, 3.0))
    ours = run_ours(tw.ours, PROMPTS, seed=7, num_steps=steps, guidance=0, sampler="flash", **kw)
    img_err, lat_err = compare(ours, ref)
    # measured: images <= 2.7e-6 (VAE fp32 floor), latents <= 1.8e-7 relative
    assert img_err < 1e-5 and lat_err < 1e-6, (img_err, lat_err)
    assert max_abs(ours[0][0], ours[0][1]) > 0.1  # two prompts, two different images


def test_flash_renoise_matters(twins):
    """Guards the test above against a sampler that ignored its re-noise: another seed, another image."""
    tw = twins(torch.float32, True)
    kw = dict(height=H, width=W, num_steps=4, guidance=0, output_type="latent",
              latents=initial_latents(2, H, W, torch.float32, seed=0))
    a = tw.ours(PROMPTS, generator=torch.Generator().manual_seed(1), **kw).latents
    b = tw.ours(PROMPTS, generator=torch.Generator().manual_seed(2), **kw).latents
    assert rel_max(a, b) > 1e-2


def test_flash_matches_diffusers_float64(twins, monkeypatch):
    tw = twins(torch.float64, True)
    h, w = 32, 48  # float64 convolutions are slow on CPU
    for steps in (1, 2, 4):
        lat = initial_latents(2, h, w, torch.float64, seed=steps)
        kw = dict(height=h, width=w, latents=lat)
        ref = run_diffusers(tw.ref, PROMPTS, seed=7, num_inference_steps=steps, guidance_scale=0, **kw)
        ours = run_ours(tw.ours, PROMPTS, seed=7, num_steps=steps, guidance=0, **kw)
        img_err, lat_err = compare(ours, ref)
        # both steps are float32 arithmetic, in different orders (module docstring);
        # measured: images <= 2.4e-7, latents <= 1.3e-7 relative
        assert img_err < 1e-6 and lat_err < 1e-6, (steps, img_err, lat_err)
        with monkeypatch.context() as m:
            m.setattr(flash_module, "flash_step", diffusers_flash_step)
            img_err, lat_err = compare(run_ours(tw.ours, PROMPTS, seed=7, num_steps=steps, guidance=0, **kw), ref)
        # the rest of the chain: text encoders, MMDiT, VAE, schedule, noise order;
        # measured: latents <= 2.4e-16 relative, images <= 4.1e-15
        assert img_err < 1e-12 and lat_err < 1e-12, (steps, img_err, lat_err)


# Euler sampler with classifier-free guidance: SD3's own recipe ---------------------------------

def test_cfg_euler_matches_diffusers(twins, monkeypatch):
    steps, g = 4, 7.0
    for dtype in (torch.float32, torch.float64):
        tw = twins(dtype, False)
        h, w = (H, W) if dtype == torch.float32 else (32, 48)
        kw = dict(height=h, width=w, negative_prompt=NEGATIVE, latents=initial_latents(2, h, w, dtype, seed=3))
        ref = run_diffusers(tw.ref, PROMPTS, seed=0, num_inference_steps=steps, guidance_scale=g, **kw)
        assert torch.equal(tw.ref.scheduler.sigmas, flow_match_sigmas(steps, 3.0))
        if dtype == torch.float32:
            img_err, lat_err = compare(run_ours(tw.ours, PROMPTS, seed=0, num_steps=steps, guidance=g,
                                                sampler="euler", **kw), ref)
            assert img_err < 1e-5 and lat_err < 1e-5, (img_err, lat_err)  # measured: 3.9e-6, 8.4e-7
        else:  # with diffusers' step arithmetic, as in the float64 Flash test
            with monkeypatch.context() as m:
                m.setattr(flow_match_module, "euler_step", diffusers_euler_step)
                img_err, lat_err = compare(run_ours(tw.ours, PROMPTS, seed=0, num_steps=steps, guidance=g,
                                                    sampler="euler", **kw), ref)
            assert img_err < 1e-12 and lat_err < 1e-12, (img_err, lat_err)  # measured: 4.7e-15, 1.6e-15


def test_images_per_prompt_order_matches_diffusers(twins):
    """2 prompts x 2 images with guidance: diffusers orders the batch [p0, p0, p1, p1] (negatives alike)."""
    tw = twins(torch.float32, True)
    kw = dict(height=H, width=W, negative_prompt=NEGATIVE, num_images_per_prompt=2,
              latents=initial_latents(4, H, W, torch.float32, seed=4))
    ref = run_diffusers(tw.ref, PROMPTS, seed=5, num_inference_steps=2, guidance_scale=7.0, **kw)
    ours = run_ours(tw.ours, PROMPTS, seed=5, num_steps=2, guidance=7.0, **kw)
    img_err, lat_err = compare(ours, ref)
    assert img_err < 1e-5 and lat_err < 1e-5, (img_err, lat_err)  # guidance 7; measured: 3.6e-6, 1.3e-6
    # image 1 is prompt 0 again: one step (no re-noise) from its latents alone gives the same result
    one = dict(height=H, width=W, num_steps=1, output_type="latent")
    both = tw.ours(PROMPTS, num_images_per_prompt=2, latents=kw["latents"], **one).latents
    alone = tw.ours(PROMPTS[0], latents=kw["latents"][1:2], **one).latents
    assert rel_max(both[1:2], alone) < 1e-6  # same computation at batch 4 vs 1: fp32 kernel differences only


# Conditioning path ---------------------------------------------------------------------------

def test_prompt_embeds_equal_prompt(twins):
    tw = twins(torch.float32, True)
    cond, uncond = tw.ours.encode_prompt(PROMPTS), tw.ours.encode_prompt(NEGATIVE)
    ref_ctx, _, ref_pooled, _ = tw.ref.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=77)
    assert torch.equal(cond[0], ref_ctx) and torch.equal(cond[1], ref_pooled)  # same CLIPs, same recipe
    kw = dict(height=H, width=W, num_steps=2, guidance=7.0, output_type="latent",
              latents=initial_latents(2, H, W, torch.float32, seed=6))
    by_text = tw.ours(PROMPTS, NEGATIVE, generator=torch.Generator().manual_seed(0), **kw).latents
    by_embeds = tw.ours(prompt_embeds=cond, negative_prompt_embeds=uncond,
                        generator=torch.Generator().manual_seed(0), **kw).latents
    assert torch.equal(by_text, by_embeds)
    no_text = FlashSD3Pipeline(tw.ours.transformer, tw.ours.vae, None)
    without_encoders = no_text(prompt_embeds=cond, negative_prompt_embeds=uncond,
                               generator=torch.Generator().manual_seed(0), **kw).latents
    assert torch.equal(by_text, without_encoders)
    with pytest.raises(ValueError, match="no text encoders"):
        no_text("a cat", height=H, width=W, output_type="latent")


def test_seed_with_own_noise(twins):
    """seed= gives the initial latents (per-image seeds), noise= the re-noise draws."""
    pipe = twins(torch.float32, True).ours
    kw = dict(height=H, width=W, num_steps=2, output_type="latent")
    e = [torch.randn(1, 4, H // 4, W // 4, generator=torch.Generator().manual_seed(1))]
    start = PerImageNoise([3]).draw((1, 4, H // 4, W // 4))
    seeded = pipe("a cat", seed=3, noise=e, **kw).latents
    assert torch.equal(seeded, pipe("a cat", latents=start, noise=e, **kw).latents)


def test_flash_initial_re_noises_with_the_start_noise(twins):
    """sampler="flash_initial" (a student distilled with --renoise initial): the pipeline hands the sampler the
    run's initial noise as its re-noise, whatever the seed or generator; = the Flash sampler given that noise."""
    pipe = twins(torch.float32, True).ours
    kw = dict(height=H, width=W, num_steps=4, output_type="latent")
    start = PerImageNoise([3, 4]).draw((2, 4, H // 4, W // 4))
    got = pipe(PROMPTS, seed=[3, 4], sampler="flash_initial", **kw).latents
    assert torch.equal(got, pipe(PROMPTS, latents=start, sampler="flash", noise=[start] * 3, **kw).latents)
    other = pipe(PROMPTS, latents=start, generator=torch.Generator().manual_seed(9), sampler="flash_initial", **kw)
    assert torch.equal(got, other.latents)  # no re-noise is drawn
    assert rel_max(got, pipe(PROMPTS, seed=[3, 4], sampler="flash", **kw).latents) > 1e-2


# Input checks --------------------------------------------------------------------------------

@pytest.mark.parametrize("size, match", [
    ((60, 96), "height must be a positive multiple of 8"),  # VAE 4x times patch 2
    ((64, 100), "width must be a positive multiple of 8"),
    ((0, 96), "height must be a positive multiple"),
    ((64.0, 96), "height must be a positive multiple"),
    ((136, 96), "height 136 exceeds the position table: at most 128 pixels"),  # 17 tokens > 16
])
def test_bad_sizes(twins, size, match):
    pipe = twins(torch.float32, True).ours
    with pytest.raises(ValueError, match=match):
        pipe("a cat", height=size[0], width=size[1], output_type="latent")


@pytest.mark.parametrize("kw, match", [
    (dict(output_type="np"), "output_type must be"),
    (dict(sampler="dpm"), "sampler must be"),
    (dict(seed=1, generator=torch.Generator()), "seed or generator"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), r"latents must have shape \(1, 4, 16, 24\)"),
    (dict(guidance=7.0, negative_prompt=["a", "b"]), "2 negative prompts for 1 prompts"),
])
def test_bad_arguments(twins, kw, match):
    pipe = twins(torch.float32, True).ours
    with pytest.raises(ValueError, match=match):
        pipe("a cat", height=H, width=W, num_steps=1, **{"output_type": "latent", **kw})


def test_negative_prompt_without_guidance_warns(twins):
    pipe = twins(torch.float32, True).ours
    for guidance in (0.0, 1.0):  # diffusers: guidance only when guidance_scale > 1
        with pytest.warns(UserWarning, match="negative prompt is ignored"):
            pipe("a cat", "blurry", height=H, width=W, num_steps=1, guidance=guidance, output_type="latent")


def test_nan_raises_saying_what_is_known(twins):
    """A float32 run is not told to try float32: the message names the dtype and the adapters instead."""
    ours = twins(torch.float32, True).ours
    transformer = copy.deepcopy(ours.transformer)
    with torch.no_grad():
        next(transformer.parameters()).view(-1)[0] = float("nan")
    pipe = FlashSD3Pipeline(transformer, ours.vae, ours.text_encoders)
    with pytest.raises(FloatingPointError, match=r"NaN or inf in the latents \(torch.float32, no LoRA\)\. "
                                                 r"torch.float32 does not overflow") as e:
        pipe("a cat", height=H, width=W, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert "bfloat16" not in str(e.value) and "try" not in str(e.value)
    pipe.loras = [("jasperai/flash-sd3", 1.0)]  # as from_pretrained(discard_lora=True) records them
    with pytest.raises(FloatingPointError, match="LoRA merged and discarded at load: jasperai/flash-sd3 at scale 1"):
        pipe("a cat", height=H, width=W, num_steps=2, seed=0)


def test_half_precision_nan_hint():
    from flashsd3.pipeline.checks import precision_hint

    assert "try dtype bfloat16 or float32" in precision_hint(torch.float16)
    assert "float16" in precision_hint(torch.bfloat16) and "try" not in precision_hint(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_demo_runs_with_generator_seed_or_neither(dtype):
    """Initial noise is drawn in float32 and cast to the model dtype on every path."""
    pipe = FlashSD3Pipeline.demo(seed=0, dtype=dtype)
    for kw in ({"generator": torch.Generator().manual_seed(0)}, {"seed": 0}, {}):
        out = pipe("a cat", height=32, width=32, num_steps=2, output_type="latent", **kw)
        assert out.latents.dtype == dtype and torch.isfinite(out.latents).all()
