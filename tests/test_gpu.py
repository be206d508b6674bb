"""Full-size checks: need a CUDA device (marked `gpu`) or real weights (marked `slow`).

Skipped by default with their reason (tests/conftest.py). On a GPU:
    python -m pytest tests/test_gpu.py -q -s
With real weights: FLASHSD3_RUN_SLOW=1 FLASHSD3_WEIGHTS=/path/to/stable-diffusion-3-medium-diffusers ...
"""
import os
from pathlib import Path

import pytest
import torch

from flashsd3 import SD3_MEDIUM, load_transformer
from flashsd3.mmdit import from_diffusers_state_dict

pytest.importorskip("diffusers", reason="diffusers is the parity reference (test extra)")
from helpers_mmdit import random_diffusers_transformer, random_inputs, run_reference  # noqa: E402
from metrics import rel_l2  # noqa: E402


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sd3_medium_shape_matches_diffusers_on_gpu(dtype):
    # Random SD3-medium-shaped weights (std 0.3 would overflow fp16 at full width: use 0.02-scaled copies).
    ref32 = random_diffusers_transformer(SD3_MEDIUM, torch.float32, seed=0)
    with torch.no_grad():
        for p in ref32.parameters():
            p.mul_(0.02 / 0.3)
    ours = from_diffusers_state_dict(ref32.state_dict(), SD3_MEDIUM).to("cuda", dtype)
    ref = ref32.to("cuda", dtype)
    inputs = [t.to("cuda") for t in random_inputs(SD3_MEDIUM, batch=2, hw=(128, 128), tokens=154,
                                                  timesteps=[1000.0, 602.15], dtype=torch.float32)]
    lat, t, ctx, pooled = inputs
    with torch.no_grad():
        truth = run_reference(ref.to(torch.float32), lat, t, ctx, pooled)
        ref.to(dtype)
        ours_out = ours(lat.to(dtype), t, ctx.to(dtype), pooled.to(dtype)).float()
        ref_out = run_reference(ref, lat.to(dtype), t, ctx.to(dtype), pooled.to(dtype)).float()
    e_ours, e_ref = rel_l2(ours_out, truth), rel_l2(ref_out, truth)
    print(f"{dtype}: ours vs fp32 {e_ours:.2e}, diffusers vs fp32 {e_ref:.2e}, "
          f"ours vs diffusers {rel_l2(ours_out, ref_out):.2e}")
    # Both carry the dtype's rounding; ours must be no worse than diffusers' own low-precision run (+10%).
    assert e_ours <= 1.1 * e_ref + 1e-4


WEIGHTS = os.environ.get("FLASHSD3_WEIGHTS")


@pytest.mark.slow
@pytest.mark.skipif(not WEIGHTS, reason="set FLASHSD3_WEIGHTS to a diffusers SD3-medium folder")
def test_real_weights_match_diffusers():
    from diffusers import SD3Transformer2DModel

    root = Path(WEIGHTS)
    ours = load_transformer(root / "transformer", dtype=torch.float32)
    assert ours.config == SD3_MEDIUM
    ref = SD3Transformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=torch.float32).eval()
    inputs = random_inputs(SD3_MEDIUM, batch=1, hw=(64, 64), tokens=154, timesteps=[857.69], dtype=torch.float32)
    with torch.no_grad():
        assert rel_l2(ours(*inputs), run_reference(ref, *inputs)) < 1e-5  # fp32 summation order only
