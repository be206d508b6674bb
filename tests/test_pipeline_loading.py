"""FlashSD3Pipeline.from_pretrained on a saved diffusers folder + a PEFT adapter folder: the Flash
recipe end to end (LoRA merged) against diffusers' pipeline running the peft-wrapped transformer."""
import pytest
import torch

from flashsd3 import FlashSD3Pipeline
from flashsd3.hub import WeightsUnavailable
from flashsd3.lora import lora_info

pytest.importorskip("diffusers", reason="diffusers is the parity reference (pip install .[test])")
pytest.importorskip("peft", reason="peft is the LoRA reference (pip install .[test])")
from helpers_lora import lora_config  # noqa: E402
from helpers_pipeline import initial_latents, make_twins, run_diffusers, run_ours  # noqa: E402
from metrics import max_abs, rel_max  # noqa: E402

PROMPTS = ["a photo of a cat", "the dog on mars"]
H, W = 64, 96


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(diffusers pipeline with a random Flash-shaped adapter injected, model folder, adapter folder)."""
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("sd3")
    twins = make_twins(root / "scratch", torch.float32, stochastic=True)
    ref = twins.ref
    ref.save_pretrained(root / "model")  # the diffusers folder layout, base weights only
    peft_model = get_peft_model(ref.transformer, lora_config(r=4, lora_alpha=8))  # wraps in place
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(root / "adapter")
    return ref, root / "model", root / "adapter"


@pytest.mark.parametrize("merge", [True, False])
def test_from_pretrained_folder_with_peft_adapter_matches_diffusers(saved, merge):
    ref, model_dir, adapter_dir = saved
    pipe = FlashSD3Pipeline.from_pretrained(model_dir, lora=[(str(adapter_dir), 1.0)], dtype=torch.float32,
                                            merge=merge)
    info = lora_info(pipe.transformer)
    assert [i.merged for i in info.values()] == [merge]
    for steps in (1, 4):
        kw = dict(height=H, width=W, latents=initial_latents(2, H, W, torch.float32, seed=steps))
        ref_img, ref_lat = run_diffusers(ref, PROMPTS, seed=5, num_inference_steps=steps, guidance_scale=0, **kw)
        img, lat = run_ours(pipe, PROMPTS, seed=5, num_steps=steps, guidance=0, **kw)
        # float32 chain incl. the LoRA (scale alpha/r = 2 from adapter_config.json); bounds as test_pipeline.py
        assert max_abs(img, ref_img) < 1e-5
        assert max(rel_max(a, b) for a, b in zip(lat, ref_lat, strict=True)) < 1e-6


def test_from_pretrained_base_model_and_missing_weights(saved, tmp_path):
    ref, model_dir, _ = saved
    pipe = FlashSD3Pipeline.from_pretrained(model_dir, lora=[], dtype=torch.float32)
    assert lora_info(pipe.transformer) == {}
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels
    with pytest.raises(WeightsUnavailable, match="neither an existing path nor a hub repo id"):
        FlashSD3Pipeline.from_pretrained(tmp_path / "nothing" / "here", lora=[])
