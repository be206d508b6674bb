"""FlashSD3Pipeline with ControlNets against diffusers' StableDiffusion3ControlNetPipeline on the tiny random
models of tests/helpers_pipeline.py (+ random diffusers ControlNets), with the Flash recipe and Euler + CFG.

Randomness: both pipelines get the same initial latents. diffusers draws each control image's VAE posterior
sample from the global RNG (and, with CFG, separate draws for the doubled batch); ours draws one per output
image from the call's source, shared by the CFG halves, as Stability's sd3_impls.py repeats its one control
latent. The test gives diffusers our draws (its `DiagonalGaussianDistribution.sample` patched to use them) and
gives ours diffusers' re-noise draws (`noise=`), so both see the same numbers.

Tolerances as tests/test_pipeline.py (measured values in comments): float32 latents relative error
(max |d| / max |ref|) < 1e-6 without guidance, < 1e-5 with guidance 7; images max abs < 1e-5 (VAE fp32 floor).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from flashsd3.controlnet import ControlNetConfig, controlnet_from_state_dict

pytest.importorskip("diffusers", reason="diffusers is the parity reference (pip install .[test])")
from helpers_controlnet import one_thread, random_diffusers_controlnet  # noqa: E402, F401 (autouse fixture)
from helpers_pipeline import box_mask, initial_latents, make_twins, random_image  # noqa: E402
from metrics import max_abs, rel_max  # noqa: E402

PROMPTS = ["a photo of a cat", "the dog on mars"]
NEGATIVE = ["blurry", "a cat"]
H, W = 32, 48  # non-square; small: the VAE dominates the cost
CN_SD3 = ControlNetConfig(depth=2, num_heads=2, head_dim=8, in_channels=4, context_dim=32, pooled_dim=24,
                          pos_embed_max_size=16, sample_size=8)  # InstantX-style: zero pooled text, no VAE shift
CN_SD35 = dataclasses.replace(CN_SD3, context_dim=None, pos_embed_max_size=None, zero_pooled=False, depth=3)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    cache = {}

    def get(stochastic: bool):
        if stochastic not in cache:
            cache[stochastic] = make_twins(tmp_path_factory.mktemp("twins"), torch.float32, stochastic=stochastic)
        return cache[stochastic]

    return get


def controlnet_twins(tw, cfg, seed):
    """(diffusers ControlNet, ours) with the same random weights (halved, as make_twins halves the transformer's)."""
    ref = random_diffusers_controlnet(cfg, transformer=tw.ref.transformer, dtype=torch.float64, seed=seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if not name.startswith("pos_embed."):  # the transformer's, when lent
                p.mul_(0.5)
    state = {k: v for k, v in ref.state_dict().items() if cfg.own_embedding or not k.startswith("pos_embed.")}
    ours = controlnet_from_state_dict(state, cfg, dtype=torch.float32, transformer=tw.ours.transformer)
    if not cfg.own_embedding:
        del ref.pos_embed  # StableDiffusion3ControlNetPipeline gives it a copy of the transformer's
        ref.pos_embed = None
    return ref.float(), ours


def run_both(tw, refs, ours, images, *, steps, guidance, sampler, monkeypatch, inpainting=False, **kw):
    from diffusers import StableDiffusion3ControlNetInpaintingPipeline, StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders import vae as diffusers_vae

    cls = StableDiffusion3ControlNetInpaintingPipeline if inpainting else StableDiffusion3ControlNetPipeline
    pipe = cls(**tw.ref.components, controlnet=refs if len(refs) > 1 else refs[0])
    pipe.set_progress_bar_config(disable=True)
    lat = initial_latents(2, H, W, torch.float32, seed=3)
    shape = (2, 4, H // 4, W // 4)
    g = torch.Generator().manual_seed(21)  # ours draws the control posteriors from it, after the initial noise
    draws = [torch.randn(shape, generator=g) for _ in images]
    with torch.random.fork_rng():
        torch.manual_seed(7)
        renoise = [torch.randn(shape) for _ in range(steps - 1)]

    def sample(self, generator=None):  # diffusers' posterior draw, with our numbers (doubled batch: both halves)
        d = draws[len(used)].to(self.mean)
        used.append(d)
        return self.mean + self.std * d.repeat(self.mean.shape[0] // d.shape[0], 1, 1, 1)

    used, steps_ref = [], []
    with monkeypatch.context() as m, torch.random.fork_rng():
        m.setattr(diffusers_vae.DiagonalGaussianDistribution, "sample", sample)
        torch.manual_seed(7)
        ref_img = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE if guidance > 1 else None, height=H, width=W,
                       control_image=images if len(refs) > 1 else images[0], latents=lat, num_inference_steps=steps,
                       guidance_scale=guidance, max_sequence_length=77, output_type="pt",
                       callback_on_step_end=lambda _p, _i, _t, d: steps_ref.append(d["latents"].clone()) or {},
                       callback_on_step_end_tensor_inputs=["latents"], **kw).images
    assert len(used) == len(images)
    tw.ours.controlnets = ours
    steps_ours = []
    out = tw.ours(PROMPTS, negative_prompt=NEGATIVE if guidance > 1 else None, height=H, width=W,
                  control_image=images if len(ours) > 1 else images[0], latents=lat, num_steps=steps,
                  guidance=guidance, sampler=sampler, generator=torch.Generator().manual_seed(21), noise=renoise,
                  output_type="pt", callback=lambda i, x: steps_ours.append(x.clone()), **kw)
    tw.ours.controlnets = []
    lat_err = max(rel_max(a, b) for a, b in zip(steps_ours, steps_ref, strict=True))
    return max_abs(out.images, ref_img), lat_err, out.latents


@pytest.mark.parametrize("cfg", [CN_SD3, CN_SD35], ids=["sd3_instantx_style", "sd35_image_only"])
def test_flash_matches_diffusers(twins, cfg, monkeypatch):
    tw = twins(True)
    ref_cn, ours_cn = controlnet_twins(tw, cfg, seed=30)
    img_err, lat_err, latents = run_both(tw, [ref_cn], [ours_cn], [random_image(5, H, W)], steps=4, guidance=0,
                                         sampler="flash", monkeypatch=monkeypatch, controlnet_conditioning_scale=0.8)
    assert img_err < 1e-5 and lat_err < 1e-6, (img_err, lat_err)  # measured 2.1e-6 / 4.2e-7 (sd3.5: 1.9e-6 / 6.1e-7)
    plain = tw.ours(PROMPTS, height=H, width=W, latents=initial_latents(2, H, W, torch.float32, seed=3), num_steps=4,
                    guidance=0, generator=torch.Generator().manual_seed(21), output_type="latent").latents
    assert rel_max(latents, plain) > 1e-2  # the ControlNet changes the result


def test_two_controlnets_cfg_euler_with_start_stop_match_diffusers(twins, monkeypatch):
    tw = twins(False)
    (ref_a, ours_a), (ref_b, ours_b) = controlnet_twins(tw, CN_SD3, seed=31), controlnet_twins(tw, CN_SD3, seed=32)
    img_err, lat_err, _ = run_both(tw, [ref_a, ref_b], [ours_a, ours_b], [random_image(6, H, W), random_image(7, H, W)],
                                   steps=4, guidance=7.0, sampler="euler", monkeypatch=monkeypatch,
                                   controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.25],
                                   control_guidance_end=[1.0, 0.75])
    assert img_err < 1e-5 and lat_err < 1e-5, (img_err, lat_err)  # measured 2.6e-6 / 9.1e-7


def test_inpainting_controlnet_matches_diffusers(twins, monkeypatch):
    """alimama's layout: the masked image's latents (with the VAE shift) + 1 - mask as a fifth channel, zero pooled
    text; diffusers' StableDiffusion3ControlNetInpaintingPipeline repaints the whole canvas from noise."""
    tw = twins(True)
    ref_cn, ours_cn = controlnet_twins(tw, dataclasses.replace(CN_SD3, extra_channels=1), seed=33)
    mask = box_mask(H, W, (8, 12, 24, 36))
    img_err, lat_err, _ = run_both(tw, [ref_cn], [ours_cn], [random_image(8, H, W)], steps=4, guidance=0,
                                   sampler="flash", monkeypatch=monkeypatch, inpainting=True, control_mask=mask)
    assert img_err < 1e-5 and lat_err < 1e-6, (img_err, lat_err)  # measured 2.4e-6 / 3.3e-7


def test_controlnet_composes_with_recipes_img2img_inpainting_and_lora(twins):
    """Runs through every other stage: DPM++ with CFG and skip-layer guidance (two model calls per step; 6 steps,
    the fewest the recipe's 1%-20% window guides a step of), img2img
    (the steps after the start index), inpainting, and a LoRA on the transformer's patch embedding, which an
    image-only ControlNet embeds with. Each changes with the ControlNet and stays finite."""
    from flashsd3.lora import add_lora, lora_disabled, remove_lora

    tw = twins(False)
    pipe = tw.ours
    _, cn = controlnet_twins(tw, CN_SD35, seed=34)
    control, image = random_image(9, H, W), random_image(10, H, W)
    runs = {
        "dpm_cfg_slg": dict(recipe="sd3.5-medium-slg", num_steps=6, skip_guidance_layers=[1], height=H, width=W),
        "img2img": dict(image=image, strength=0.5, num_steps=4),
        "inpaint": dict(image=image, mask=box_mask(H, W, (8, 12, 24, 36)), num_steps=3),
    }
    adapter = add_lora(pipe.transformer, rank=2, alpha=2, targets=["x_embedder.proj"])
    try:
        for n, p in pipe.transformer.named_parameters():
            if n.endswith(".B"):
                torch.nn.init.normal_(p)  # a live adapter (B starts at 0)
        for name, kw in runs.items():
            pipe.controlnets = [cn]
            a = pipe(PROMPTS[0], seed=1, output_type="latent", control_image=control, **kw).latents
            pipe.controlnets = []
            b = pipe(PROMPTS[0], seed=1, output_type="latent", **kw).latents
            assert torch.isfinite(a).all() and rel_max(a, b) > 1e-3, name
        lat, t = initial_latents(1, H, W, torch.float32, seed=4), torch.tensor([500.0])
        ctx, pooled = torch.randn(1, 7, 32), torch.randn(1, 24)
        control_lat = torch.randn(1, 4, H // 4, W // 4)
        with torch.no_grad():
            (on, _), = cn(lat, t, ctx, pooled, control_lat).parts
            with lora_disabled(pipe.transformer):
                (off, _), = cn(lat, t, ctx, pooled, control_lat).parts
        assert rel_max(on[0], off[0]) > 1e-4  # the ControlNet embeds with the adapted transformer
    finally:
        pipe.controlnets = []
        remove_lora(pipe.transformer, adapter)


@pytest.mark.parametrize("control_type, rule, zero_pooled, to_pixels, shifted", [
    ("canny", "stability", False, lambda x: x * 255 * 0.5 + 0.5, True),  # sd3_infer.py vae_encode, controlnet_type 1
    ("depth", "stability", False, lambda x: 2 * x - 1, True),
    (None, "diffusers", False, lambda x: 2 * x - 1, True),  # SD3.5 in diffusers' layout: pooled text, VAE shift
    (None, "diffusers", True, lambda x: 2 * x - 1, False),  # InstantX: zero pooled text, no VAE shift
])
def test_control_image_conventions(twins, monkeypatch, control_type, rule, zero_pooled, to_pixels, shifted):
    from flashsd3.controlnet import ControlNet
    from flashsd3.pipeline import PerImageNoise
    from flashsd3.pipeline.control import encode_control

    pipe = twins(False).ours
    cfg = dataclasses.replace(CN_SD35, depth=1, residual_rule=rule, control_type=control_type, zero_pooled=zero_pooled)
    cn = ControlNet(cfg, pipe.transformer)
    image, seen, encode = random_image(11, H, W), [], pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda p: seen.append(p) or encode(p))
    latents = encode_control(pipe, cn, image, None, 1, H, W, PerImageNoise([4]))
    x01 = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    torch.testing.assert_close(seen[0], to_pixels(x01), rtol=0, atol=1e-5)
    q = encode(seen[0])
    z = q.mean + q.std * torch.randn(q.mean.shape[1:], generator=torch.Generator().manual_seed(4))
    shift = pipe.vae.config.shift_factor if shifted else 0.0
    torch.testing.assert_close(latents, (z - shift) * pipe.vae.config.scaling_factor, rtol=0, atol=1e-6)
