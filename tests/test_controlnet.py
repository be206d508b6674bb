"""ControlNet + MMDiT parity with diffusers' SD3ControlNetModel + SD3Transformer2DModel and with Stability's
SD3.5 ControlNet (an independent float64 reading of its code, tests/helpers_controlnet.py), on random weights."""
import dataclasses

import pytest
import torch

from flashsd3 import TINY
from flashsd3.controlnet import ControlNet, ControlNetConfig, ControlNetResiduals, controlnet_from_state_dict
from flashsd3.mmdit import from_diffusers_state_dict

pytest.importorskip("diffusers", reason="diffusers is the parity reference (test extra)")
from helpers_controlnet import (  # noqa: E402
    one_thread,  # noqa: F401 (autouse fixture)
    random_diffusers_controlnet,
    random_stability_state_dict,
    run_diffusers,
    stability_mmdit,
    stability_residuals,
)
from helpers_mmdit import random_diffusers_transformer, random_inputs, rmsnorm_in_input_dtype  # noqa: E402
from metrics import rel_l2  # noqa: E402

T4 = dataclasses.replace(TINY, depth=4)
# SD3-medium style: joint blocks, own patch embedding, zero pooled text (InstantX); SD3.5-large style: image-only
# blocks on the transformer's embedding, pooled text (diffusers' conversion of Stability's 8B ControlNets)
CN_SD3 = ControlNetConfig(depth=2, num_heads=2, head_dim=8, in_channels=4, context_dim=32, pooled_dim=24,
                          pos_embed_max_size=16, sample_size=8)
CN_SD35 = dataclasses.replace(CN_SD3, context_dim=None, pos_embed_max_size=None, zero_pooled=False,
                              sample_size=128)  # unused without its own position table
CASES = {
    "sd3": (T4, CN_SD3),
    "sd3_extra_channel": (T4, dataclasses.replace(CN_SD3, extra_channels=1)),
    "sd35_image_only": (T4, CN_SD35),
    "sd35_image_only_extra_channel": (T4, dataclasses.replace(CN_SD35, extra_channels=1, depth=3)),
}
# diffusers' RMSNorm computes its variance in float32 even for float64 inputs (see tests/test_mmdit.py), so with
# qk-norm the reference as shipped carries float32 rounding (agreement ~1e-9); with its RMSNorm in float64
# (helpers_mmdit.rmsnorm_in_input_dtype) agreement is to rounding: measured <= 7.7e-16, asserted at 1e-13
CASES_QK = {
    "sd35_joint_qk_dual": (dataclasses.replace(TINY, depth=3, qk_norm="rms_norm", dual_attention_layers=(0,)),
                           dataclasses.replace(CN_SD3, qk_norm="rms_norm", dual_attention_layers=(0,))),
    "sd35_large_like": (dataclasses.replace(T4, qk_norm="rms_norm"), CN_SD35),
}


def twins(tr_cfg, cn_cfg, dtype=torch.float64):
    ref_tr = random_diffusers_transformer(tr_cfg, dtype)
    ours_tr = from_diffusers_state_dict(ref_tr.state_dict(), tr_cfg)
    ref_cn = random_diffusers_controlnet(cn_cfg, transformer=ref_tr, dtype=dtype)
    state = {k: v for k, v in ref_cn.state_dict().items() if cn_cfg.own_embedding or not k.startswith("pos_embed.")}
    ours_cn = controlnet_from_state_dict(state, cn_cfg, transformer=ours_tr)
    return ref_tr, ours_tr, ref_cn, ours_cn


def control_latents(cfg, inputs, seed=5):
    g = torch.Generator().manual_seed(seed)
    lat = inputs[0]
    return torch.randn(lat.shape[0], cfg.control_channels, *lat.shape[-2:], generator=g, dtype=torch.float64).to(lat)


def compare(tr_cfg, cn_cfg, dtype, scale=0.8):
    ref_tr, ours_tr, ref_cn, ours_cn = twins(tr_cfg, cn_cfg, dtype)
    inputs = random_inputs(tr_cfg, batch=2, hw=(12, 8), timesteps=[3.0, 871.5], dtype=dtype)  # non-square
    control = control_latents(cn_cfg, inputs)
    ref_samples, ref_out = run_diffusers(ref_cn, ref_tr, *inputs, control, scale)
    with torch.no_grad():
        residuals = ours_cn(*inputs, control, scale=scale)
        out = ours_tr(*inputs, controlnet_residuals=residuals)
    (ours_samples, _), = residuals.parts
    res_err = max(rel_l2(a, b) for a, b in zip(ours_samples, ref_samples, strict=True))
    return res_err, rel_l2(out, ref_out), rel_l2(out, ours_tr(*inputs))


@pytest.mark.parametrize("name", CASES)
def test_parity_with_diffusers_float64(name):
    res_err, out_err, effect = compare(*CASES[name], torch.float64)
    assert res_err < 1e-10 and out_err < 1e-10, (res_err, out_err)  # measured ~1e-16 / ~1e-15
    assert effect > 1e-2  # the residuals change the output


@pytest.mark.parametrize("name", CASES_QK)
def test_parity_with_diffusers_qk_norm(name):
    res_err, out_err, _ = compare(*CASES_QK[name], torch.float64)
    assert res_err < 1e-8 and out_err < 1e-8, (res_err, out_err)  # see CASES_QK
    with rmsnorm_in_input_dtype():  # the reference's RMSNorm in float64 too: agreement to rounding
        res_err, out_err, _ = compare(*CASES_QK[name], torch.float64)
    assert res_err < 1e-13 and out_err < 1e-13, (res_err, out_err)  # measured 2.7e-16 to 7.7e-16


def test_parity_with_diffusers_float32():
    res_err, out_err, _ = compare(*CASES["sd3_extra_channel"], torch.float32)
    assert res_err < 1e-5 and out_err < 1e-5, (res_err, out_err)  # image-first vs context-first token order


def test_multi_controlnet_sums_as_diffusers():
    from diffusers import SD3MultiControlNetModel

    ref_tr, ours_tr, ref_a, ours_a = twins(T4, CN_SD3)
    ref_b = random_diffusers_controlnet(CN_SD3, dtype=torch.float64, seed=11)
    ours_b = controlnet_from_state_dict(ref_b.state_dict(), CN_SD3)
    inputs = random_inputs(T4, batch=2, hw=(8, 8))
    ca, cb = control_latents(CN_SD3, inputs, 1), control_latents(CN_SD3, inputs, 2)
    _, ref_out = run_diffusers(SD3MultiControlNetModel([ref_a, ref_b]), ref_tr, *inputs, [ca, cb], [0.7, 1.3])
    with torch.no_grad():
        both = sum((ours_a(*inputs, ca, 0.7), ours_b(*inputs, cb, 1.3)), ControlNetResiduals())
        out = ours_tr(*inputs, controlnet_residuals=both)
    assert rel_l2(out, ref_out) < 1e-10  # measured 4.3e-16


def test_parity_with_stability_reference_float64():
    """Stability's 8B ControlNet file layout and forward, and MMDiTX's residual rule (every block, the last too)."""
    cn_cfg = dataclasses.replace(CN_SD35, residual_rule="stability", control_type="canny")
    ref_tr = random_diffusers_transformer(T4)
    ours_tr = from_diffusers_state_dict(ref_tr.state_dict(), T4)
    sd = random_stability_state_dict(cn_cfg)
    ours_cn = controlnet_from_state_dict(sd, transformer=ours_tr)  # config inferred from the keys
    assert ours_cn.config == cn_cfg
    lat, t, ctx, pooled = random_inputs(T4, batch=2, hw=(8, 12), timesteps=[17.0, 990.0])
    control = control_latents(cn_cfg, (lat,))
    with torch.no_grad():
        ref_res = stability_residuals(sd, cn_cfg.depth, cn_cfg.num_heads, ref_tr.pos_embed(lat), t, pooled, control,
                                      0.6)
        ref_out = stability_mmdit(ref_tr, lat, t, ctx, pooled, ref_res)
        residuals = ours_cn(lat, t, ctx, pooled, control, scale=0.6)
        out = ours_tr(lat, t, ctx, pooled, controlnet_residuals=residuals)
    (ours_res, rule), = residuals.parts
    assert rule == "stability"
    assert max(rel_l2(a, b) for a, b in zip(ours_res, ref_res, strict=True)) < 1e-10
    assert rel_l2(out, ref_out) < 1e-10  # measured 4.3e-16
    # the two references differ: diffusers adds no residual after the last (context pre-only) block
    with torch.no_grad():
        diffusers_rule = ours_tr(lat, t, ctx, pooled, controlnet_residuals=ControlNetResiduals(ours_res))
    assert rel_l2(diffusers_rule, out) > 1e-3


def test_residual_rules():
    from flashsd3.controlnet.model import residual_index

    # InstantX: 6 ControlNet blocks on SD3-medium's 24; alimama: 23; SD3.5-large's 8B: 19 on 38 (Stability's rule)
    assert [residual_index("diffusers", i, 24, 6) for i in range(24)] == [i // 4 for i in range(23)] + [None]
    assert [residual_index("diffusers", i, 24, 23) for i in (0, 1, 2, 22, 23)] == [0, 0, 1, 21, None]
    assert [residual_index("stability", i, 38, 19) for i in (0, 1, 2, 36, 37)] == [0, 0, 1, 18, 18]


def test_init_weights_adds_nothing():
    tr = from_diffusers_state_dict(random_diffusers_transformer(T4).state_dict(), T4)
    cn = ControlNet(dataclasses.replace(CN_SD3, extra_channels=1)).double().init_weights()
    inputs = random_inputs(T4, batch=1)
    with torch.no_grad():
        residuals = cn(*inputs, control_latents(cn.config, inputs))
        assert all(torch.equal(r, torch.zeros_like(r)) for r in residuals.parts[0][0])
        assert torch.equal(tr(*inputs, controlnet_residuals=residuals), tr(*inputs))


def test_bad_inputs_are_refused():
    tr = from_diffusers_state_dict(random_diffusers_transformer(T4).state_dict(), T4)
    with pytest.raises(ValueError, match="uses the transformer's patch embedding"):
        ControlNet(CN_SD35).double()(*random_inputs(T4), torch.zeros(2, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="width .* 32 does not match the transformer's 16"):
        ControlNet(dataclasses.replace(CN_SD35, num_heads=4), transformer=tr)
    cn = ControlNet(CN_SD3).double()
    with pytest.raises(ValueError, match="control image must have the output's size"):
        cn(*random_inputs(T4), torch.zeros(2, 4, 8, 6, dtype=torch.float64))
