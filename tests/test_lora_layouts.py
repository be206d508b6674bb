"""LoRA files other SD3 tools write and ComfyUI reads: ComfyUI's own trainer / extractor layout
(`diffusion_model.<Stability name>.lora_up/lora_down/alpha`, with `.diff_b` bias differences) and the
`lycoris_` layout SimpleTuner saves through LyCORIS.

ComfyUI is not on PyPI, so its layout is written here from its published key conventions (comfy_extras/
nodes_train.py TrainLoraNode + SaveLoRA: `f"{module}.{param}"` of the adapters, flat 2-D conv matrices, alpha
1.0, a `.diff_b` on every bias; comfy_extras/nodes_lora_extract.py calc_lora_model) and checked for parity
against the same weights in the kohya layout. LyCORIS installs from PyPI (the `test` extra): its own network,
wrapped around diffusers' SD3 transformer as SimpleTuner wraps it, is the reference.
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from flashsd3 import TINY
from flashsd3.lora import LoRAError, add_lora, load_lora, lora_info, merge_lora, remove_lora, save_lora, unmerge_lora
from flashsd3.lora.convert import main as convert
from flashsd3.lora.keys import lora_layers

pytest.importorskip("diffusers", reason="diffusers is the parity reference (test extra)")
pytest.importorskip("peft", reason="peft is used by the shared LoRA test helpers (test extra)")

from helpers_lora_train import FLOAT64_TOL, call_ref, frozen_base, randomize  # noqa: E402
from helpers_mmdit import random_diffusers_transformer, random_inputs  # noqa: E402
from metrics import rel_l2  # noqa: E402

INPUTS = random_inputs(TINY)


def out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(*INPUTS)


@pytest.fixture(scope="module")
def kohya(tmp_path_factory):
    """A random rank-4 adapter on the published Flash targets (the patch-embedding conv included), saved in
    the kohya layout, which flashsd3 already reads; and the model's layer names."""
    root = tmp_path_factory.mktemp("kohya")
    model = frozen_base()
    add_lora(model, rank=4, alpha=3, targets="flash-sd3", dtype=torch.float64)
    randomize(model)
    save_lora(model, root / "k.safetensors", format="kohya")
    return root / "k.safetensors", sorted(lora_layers(model))


def comfyui_from_kohya(path, layers, flat_conv=True) -> dict[str, torch.Tensor]:
    """The same tensors under ComfyUI's names: `diffusion_model.` + the Stability module path (what kohya
    writes with '_' for '.'); conv matrices flattened to 2-D as ComfyUI's trainer stores them."""
    dotted = {"lora_unet_" + name.replace(".", "_"): name for name in layers}
    out = {}
    for key, t in load_file(str(path)).items():
        module, _, suffix = key.partition(".")
        if flat_conv and t.ndim == 4:
            t = t.flatten(1)  # A (r, in, kh, kw) -> (r, in*kh*kw); B (out, r, 1, 1) -> (out, r)
        out[f"diffusion_model.{dotted[module]}.{suffix}"] = t
    return out


def test_comfyui_layout_equals_the_kohya_file(kohya, tmp_path):
    path, layers = kohya
    reference = frozen_base()
    load_lora(reference, path)
    tensors = comfyui_from_kohya(path, layers)
    assert any(t.ndim == 2 and "x_embedder" in k for k, t in tensors.items())  # the flat conv is exercised
    save_file(tensors, tmp_path / "comfy.safetensors")
    ours = frozen_base()
    load_lora(ours, tmp_path / "comfy.safetensors", scale=0.7)
    load_lora(reference, path, scale=0.7, name="again")
    remove_lora(reference, "k")
    assert torch.equal(out(ours), out(reference))  # the same matrices: the same arithmetic
    merge_lora(ours)
    assert rel_l2(out(ours), out(reference)) < FLOAT64_TOL


def test_comfyui_bias_differences_are_applied_at_the_user_scale(kohya, tmp_path):
    """bias += strength x diff_b (comfy/lora.py: a "diff" patch on `<module>.bias`), also on a layer the LoRA
    does not otherwise adapt; merged, unmerged, removed."""
    path, layers = kohya
    tensors = comfyui_from_kohya(path, layers)
    base = frozen_base()
    g = torch.Generator().manual_seed(11)
    alone = next(name for name in layers if not any(k.startswith(f"diffusion_model.{name}.") for k in tensors))
    diffs = {name: torch.randn(base.get_submodule(name).bias.shape, generator=g, dtype=torch.float64) * 0.1
             for name in ("joint_blocks.0.x_block.attn.qkv", "x_embedder.proj", alone)}  # alone: a bias change only
    tensors.update({f"diffusion_model.{name}.diff_b": d for name, d in diffs.items()})
    save_file(tensors, tmp_path / "comfy.safetensors")
    reference = frozen_base()
    with torch.no_grad():
        for name, d in diffs.items():
            reference.get_submodule(name).bias.add_(0.7 * d)
    load_lora(reference, path, scale=0.7)
    ours = frozen_base()
    load_lora(ours, tmp_path / "comfy.safetensors", scale=0.7, name="c")
    assert lora_info(ours)["c"].params == lora_info(reference)["k"].params + sum(d.numel() for d in diffs.values())
    assert rel_l2(out(ours), out(reference)) < FLOAT64_TOL
    merge_lora(ours)
    assert rel_l2(out(ours), out(reference)) < FLOAT64_TOL
    unmerge_lora(ours)
    remove_lora(ours, "c")
    for name, p in frozen_base().named_parameters():
        torch.testing.assert_close(ours.get_parameter(name), p, rtol=0, atol=1e-15)  # one rounding each way
    load_lora(ours, tmp_path / "comfy.safetensors", name="c")
    with pytest.raises(LoRAError, match=r"changes the biases of 3 layers \(ComfyUI .diff_b"):
        save_lora(ours, tmp_path / "out", name="c")
    assert not (tmp_path / "out").exists()


def test_comfyui_files_convert_unless_their_bias_differences_matter(kohya, tmp_path, capsys):
    """The extractor's default output of a LoRA-only difference has all-zero `.diff_b`: converted (for
    ComfyUI with --format kohya); a trained one is refused by name, nothing written."""
    path, layers = kohya
    tensors = comfyui_from_kohya(path, layers, flat_conv=False)  # the extractor keeps conv shapes
    tensors["diffusion_model.final_layer.linear.diff_b"] = torch.zeros(16, dtype=torch.float16)
    save_file(tensors, tmp_path / "extracted.safetensors")
    assert convert([str(tmp_path / "extracted.safetensors"), str(tmp_path / "k.safetensors"), "--format", "kohya"]) == 0
    assert load_file(str(tmp_path / "k.safetensors")).keys() == load_file(str(path)).keys()
    tensors["diffusion_model.final_layer.linear.diff_b"][3] = 0.5
    save_file(tensors, tmp_path / "trained.safetensors")
    capsys.readouterr()
    assert convert([str(tmp_path / "trained.safetensors"), str(tmp_path / "t.safetensors"), "--format", "kohya"]) == 2
    assert "'diffusion_model.final_layer.linear.diff_b' changes the bias of our final_layer.linear" in \
        capsys.readouterr().err
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.parametrize("key, match", [
    ("diffusion_model.joint_blocks.0.x_block.attn.qkv.diff", r"full weight difference \(.diff, ComfyUI\) is not"),
    ("diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_mid.weight", "Tucker mid weight"),
    ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_up.weight", "adapt a text encoder"),
    ("lycoris_transformer_blocks_0_attn_to_q.hada_w1_a", r"LoHa \(LyCORIS\) is not supported"),
])
def test_other_comfyui_and_lycoris_kinds_are_refused_by_name(kohya, tmp_path, key, match):
    path, layers = kohya
    tensors = comfyui_from_kohya(path, layers) if not key.startswith("lycoris") else {}
    tensors[key] = torch.zeros(4, 4)
    save_file(tensors, tmp_path / "x.safetensors")
    ours = frozen_base()
    with pytest.raises(LoRAError, match=match):
        load_lora(ours, tmp_path / "x.safetensors")
    assert lora_info(ours) == {}


def test_lycoris_layout_matches_lycoris(tmp_path, monkeypatch):
    """SimpleTuner's --lora_type=lycoris with algo "lora": LyCORIS wraps diffusers' transformer (its
    documented preset targets Attention and FeedForward) and saves `lycoris_<diffusers path>` keys."""
    lycoris = pytest.importorskip("lycoris", reason="lycoris-lora writes this layout (test extra)")
    from lycoris import LycorisNetwork, create_lycoris

    for attr in ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP"):
        monkeypatch.setattr(LycorisNetwork, attr, getattr(LycorisNetwork, attr))  # apply_preset sets class state
    LycorisNetwork.apply_preset({"target_module": ["Attention", "FeedForward"]})
    ref = random_diffusers_transformer(TINY, torch.float64, seed=0)
    network = create_lycoris(ref, 1.0, linear_dim=4, linear_alpha=3, algo="lora")
    network.apply_to()
    network.to(torch.float64)  # after apply_to: LyCORIS computes in the dtype of its own tensors
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith(("lora_up.weight", "lora_down.weight")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
        expected = call_ref(ref, *INPUTS)
    network.save_weights(str(tmp_path / "lycoris.safetensors"), torch.float64, {"lycoris_config": "{}"})
    keys = load_file(str(tmp_path / "lycoris.safetensors")).keys()
    assert all(k.startswith("lycoris_transformer_blocks_") for k in keys) and len(keys) % 3 == 0, lycoris.__name__
    ours = frozen_base()
    load_lora(ours, tmp_path / "lycoris.safetensors")
    assert rel_l2(out(ours), expected) < FLOAT64_TOL
    merge_lora(ours)
    assert rel_l2(out(ours), expected) < FLOAT64_TOL
