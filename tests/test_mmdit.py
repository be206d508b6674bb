"""MMDiT parity with diffusers' SD3Transformer2DModel on random weights (tiny configs, CPU)."""
import dataclasses

import pytest
import torch

from flashsd3 import TINY, Capture, MMDiT
from flashsd3.mmdit import from_diffusers_state_dict

pytest.importorskip("diffusers", reason="diffusers is the parity reference (test extra)")
from helpers_mmdit import (  # noqa: E402
    random_diffusers_transformer,
    random_inputs,
    rmsnorm_in_input_dtype,
    run_reference,
)
from metrics import rel_l2  # noqa: E402

CONFIGS = {
    "tiny": TINY,
    "patch1_3heads": dataclasses.replace(TINY, depth=3, num_heads=3, patch_size=1, pos_embed_max_size=24,
                                         sample_size=16),
    "wide_ctx": dataclasses.replace(TINY, depth=1, context_dim=48, pooled_dim=40, in_channels=16, out_channels=16),
}
# SD3.5 features. diffusers' RMSNorm computes the variance in float32 even for float64 inputs, so the
# reference as shipped carries float32 rounding there (float64 agreement ~1e-9); with its RMSNorm in float64
# (helpers_mmdit.rmsnorm_in_input_dtype) agreement is to rounding: measured 2.4e-16 / 4.8e-16, asserted at 1e-13.
CONFIGS_SD35 = {
    "qk_rms": dataclasses.replace(TINY, qk_norm="rms_norm"),
    "dual_attn": dataclasses.replace(TINY, depth=3, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}
TIMESTEPS = [[0.0, 1000.0], [0.5, 999.25], [123.456, 871.0]]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("timesteps", TIMESTEPS)
def test_parity_float64(name, timesteps):
    cfg = CONFIGS[name]
    ref = random_diffusers_transformer(cfg, torch.float64)
    ours = from_diffusers_state_dict(ref.state_dict(), cfg)
    inputs = random_inputs(cfg, batch=2, hw=(12, 8), timesteps=timesteps)  # non-square, smaller than the table
    with torch.no_grad():
        err = rel_l2(ours(*inputs), run_reference(ref, *inputs))
    assert err < 1e-10  # float64: agreement to rounding (observed ~1e-15)


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_float32(name):
    cfg = CONFIGS[name]
    ref = random_diffusers_transformer(cfg, torch.float32)
    ours = from_diffusers_state_dict(ref.state_dict(), cfg)
    inputs = random_inputs(cfg, batch=3, hw=(8, 16), timesteps=[0.0, 1000.0, 417.5], dtype=torch.float32)
    with torch.no_grad():
        err = rel_l2(ours(*inputs), run_reference(ref, *inputs))
    assert err < 1e-5  # float32: context-first vs image-first token order changes summation order only


@pytest.mark.parametrize("name", CONFIGS_SD35)
def test_parity_sd35_blocks(name):
    cfg = CONFIGS_SD35[name]
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-8)):  # see CONFIGS_SD35 comment
        ref = random_diffusers_transformer(cfg, dtype)
        ours = from_diffusers_state_dict(ref.state_dict(), cfg)
        inputs = random_inputs(cfg, batch=2, hw=(8, 12), timesteps=[3.0, 640.0], dtype=dtype)
        with torch.no_grad():
            assert rel_l2(ours(*inputs), run_reference(ref, *inputs)) < tol
            if dtype == torch.float64:  # the reference's RMSNorm in float64 too: agreement to rounding
                with rmsnorm_in_input_dtype():
                    assert rel_l2(ours(*inputs), run_reference(ref, *inputs)) < 1e-13  # measured <= 4.8e-16


def test_skip_blocks_matches_diffusers_skip_layers():
    cfg = dataclasses.replace(TINY, depth=4)
    ref = random_diffusers_transformer(cfg)
    ours = from_diffusers_state_dict(ref.state_dict(), cfg)
    inputs = random_inputs(cfg)
    with torch.no_grad():
        for skip in ([1], [0, 2]):
            assert rel_l2(ours(*inputs, skip_blocks=skip), run_reference(ref, *inputs, skip_layers=skip)) < 1e-10
        assert rel_l2(ours(*inputs, skip_blocks=[1]), ours(*inputs)) > 1e-3  # skipping changes the output


def test_capture_block_outputs_and_attention_probs():
    cfg = TINY
    model = from_diffusers_state_dict(random_diffusers_transformer(cfg).state_dict(), cfg)
    lat, t, ctx, pooled = random_inputs(cfg, batch=2, hw=(8, 8), tokens=5)
    cap = Capture(blocks=True, attn_probs_of=1)
    with torch.no_grad():
        out = model(lat, t, ctx, pooled, capture=cap)
        plain = model(lat, t, ctx, pooled)
    assert torch.equal(out, plain)  # capturing does not change the result
    assert len(cap.block_outputs) == cfg.depth
    assert cap.block_outputs[-1][0] is None and cap.block_outputs[0][0].shape == (2, 5, cfg.hidden_size)
    n = 5 + 16  # context tokens first, then 4x4 image tokens
    assert cap.attn_probs.shape == (2, cfg.num_heads, n, n)
    # probabilities are an analysis tensor computed in float32: rows sum to 1 within float32 rounding
    torch.testing.assert_close(cap.attn_probs.sum(-1), torch.ones(2, cfg.num_heads, n), rtol=0, atol=1e-6)



def test_attention_matches_explicit_softmax():
    from flashsd3.mmdit.attention import attention, attention_probs

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g, dtype=torch.float64) for _ in range(3))
    probs = attention_probs(q, k).double()  # computed in float32 (analysis tensor)
    explicit = (probs @ v).transpose(1, 2).reshape(2, 11, 24)
    # explicit softmax in float64 for the tight check
    p64 = ((q @ k.transpose(-2, -1)) / 8**0.5).softmax(-1)
    torch.testing.assert_close(attention(q, k, v), (p64 @ v).transpose(1, 2).reshape(2, 11, 24), rtol=0, atol=1e-12)
    torch.testing.assert_close(explicit, attention(q, k, v), rtol=0, atol=1e-5)  # float32 probabilities


def test_latent_larger_than_position_table_is_refused():
    model = MMDiT(TINY)
    lat, t, ctx, pooled = random_inputs(TINY, dtype=torch.float32, hw=(2 * (TINY.pos_embed_max_size + 1), 8))
    with pytest.raises(ValueError, match="larger than the 16x16 position table"):
        model(lat, t, ctx, pooled)


def test_odd_latent_size_is_refused():
    model = MMDiT(TINY)
    lat, t, ctx, pooled = random_inputs(TINY, dtype=torch.float32, hw=(9, 8))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(lat, t, ctx, pooled)


def test_fresh_position_table_equals_diffusers():
    ref = random_diffusers_transformer(TINY)
    ours = MMDiT(TINY)
    # ours is computed in float64 then rounded, diffusers' in float32: equal up to float32 rounding of
    # values in [-1, 1] (observed: bitwise equal on this CPU)
    torch.testing.assert_close(ours.pos_embed, ref.pos_embed.pos_embed.float(), rtol=0, atol=1e-6)
