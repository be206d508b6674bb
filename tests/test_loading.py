"""load_transformer: every accepted source layout, and every refusal."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from flashsd3 import TINY, load_transformer
from flashsd3.keymaps.mmdit import ORIGINAL_PREFIX
from flashsd3.mmdit import from_diffusers_state_dict, transformer_config
from flashsd3.weights import CheckpointError

pytest.importorskip("diffusers", reason="diffusers is the parity reference (test extra)")
from helpers_mmdit import random_diffusers_transformer, random_inputs, run_reference  # noqa: E402
from metrics import rel_l2  # noqa: E402

CFG = dataclasses.replace(TINY, depth=3)


@pytest.fixture(scope="module")
def ref():
    return random_diffusers_transformer(CFG, torch.float64, seed=3)


@pytest.fixture(scope="module")
def inputs():
    return random_inputs(CFG, batch=2, hw=(8, 12), timesteps=[0.0, 731.5])


@pytest.fixture(scope="module")
def expected(ref, inputs):
    return run_reference(ref, *inputs)


def original_state_dict(ref, cfg=CFG, prefix=ORIGINAL_PREFIX):
    """A Stability-layout checkpoint of the reference weights: our (official) names plus prefix."""
    return {prefix + k: v for k, v in from_diffusers_state_dict(ref.state_dict(), cfg).state_dict().items()}


def forward(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_diffusers_folder(tmp_path, ref, inputs, expected):
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model = load_transformer(tmp_path)
    assert model.config == CFG
    assert rel_l2(forward(model, inputs), expected) < 1e-10


def test_diffusers_pipeline_root_and_sharded(tmp_path, ref, inputs, expected):
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    (tmp_path / "model_index.json").write_text("{}")
    assert rel_l2(forward(load_transformer(tmp_path), inputs), expected) < 1e-10


# Single files carry no config; their head count follows SD3's 64-channel convention, so these
# use a 64-wide head (still tiny).
CFG64 = dataclasses.replace(TINY, depth=3, num_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def ref64():
    return random_diffusers_transformer(CFG64, torch.float64, seed=5)


@pytest.fixture(scope="module")
def inputs64():
    return random_inputs(CFG64, batch=2, hw=(8, 12), timesteps=[1000.0, 12.5])


def test_single_diffusers_file_infers_config(tmp_path, ref64, inputs64):
    path = tmp_path / "sd3_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in ref64.state_dict().items()}, path)
    with pytest.warns(UserWarning, match="matches no preset"):
        model = load_transformer(path)
    assert dataclasses.replace(model.config, sample_size=CFG64.sample_size) == CFG64
    assert rel_l2(forward(model, inputs64), run_reference(ref64, *inputs64)) < 1e-10


def test_transformer_config_reads_headers_only(tmp_path, ref64):
    ref64.save_pretrained(tmp_path / "folder", safe_serialization=True)
    assert transformer_config(tmp_path / "folder") == CFG64  # from config.json
    save_file({k: v.contiguous() for k, v in ref64.state_dict().items()}, tmp_path / "one.safetensors")
    with pytest.warns(UserWarning, match="matches no preset"):
        inferred = transformer_config(tmp_path / "one.safetensors")  # from the shapes in the header
    assert dataclasses.replace(inferred, sample_size=CFG64.sample_size) == CFG64


def test_width_without_64_channel_heads_needs_config(tmp_path, ref, inputs, expected):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    with pytest.raises(CheckpointError, match="pass config="):
        load_transformer(path)
    assert rel_l2(forward(load_transformer(path, config=CFG), inputs), expected) < 1e-10


def test_stability_single_file_equals_diffusers_conversion(tmp_path, ref64, inputs64):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    ckpt = original_state_dict(ref64, CFG64)
    # other models of the single file sit beside the transformer and are left alone
    ckpt["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3, dtype=torch.float64)
    ckpt["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(8, dtype=torch.float64)
    path = tmp_path / "sd3_tiny_incl_clips.safetensors"
    save_file(ckpt, path)

    converted = convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in ckpt.items() if k.startswith(ORIGINAL_PREFIX)})
    theirs = SD3Transformer2DModel(**CFG64.to_diffusers()).double().eval()
    theirs.load_state_dict(converted, strict=True)
    with pytest.warns(UserWarning, match="matches no preset"):
        ours = load_transformer(path)
    assert dataclasses.replace(ours.config, sample_size=CFG64.sample_size) == CFG64
    assert rel_l2(forward(ours, inputs64), run_reference(theirs, *inputs64)) < 1e-10

    # the same keys without the prefix
    bare = tmp_path / "bare.safetensors"
    save_file({k[len(ORIGINAL_PREFIX):]: v for k, v in ckpt.items() if k.startswith(ORIGINAL_PREFIX)}, bare)
    with pytest.warns(UserWarning, match="matches no preset"):
        assert rel_l2(forward(load_transformer(bare), inputs64), run_reference(theirs, *inputs64)) < 1e-10


def test_dtype_is_converted_while_reading(tmp_path, ref):
    ref.to(torch.float16).save_pretrained(tmp_path, safe_serialization=True)
    ref.to(torch.float64)
    assert load_transformer(tmp_path).x_embedder.proj.weight.dtype == torch.float16
    model = load_transformer(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.state_dict().values()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.state_dict().values())


# Refusals ------------------------------------------------------------------------------------

@pytest.fixture()
def orig_file(tmp_path, ref):
    def write(mutate=lambda sd: None, name="ckpt.safetensors"):
        sd = original_state_dict(ref)
        mutate(sd)
        path = tmp_path / name
        save_file(sd, path)
        return path
    return write


def test_missing_key(orig_file):
    key = ORIGINAL_PREFIX + "joint_blocks.1.x_block.mlp.fc2.bias"
    path = orig_file(lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(1\).*joint_blocks\.1\.x_block\.mlp\.fc2\.bias") as e:
        load_transformer(path, dtype=torch.float32, config=CFG)
    assert str(path) in str(e.value)


def test_extra_key(orig_file):
    path = orig_file(lambda sd: sd.update({ORIGINAL_PREFIX + "joint_blocks.0.x_block.attn.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\).*x_block\.attn\.extra"):
        load_transformer(path, config=CFG)


def test_wrong_shape(orig_file):
    key = ORIGINAL_PREFIX + "joint_blocks.2.x_block.attn.proj.weight"
    path = orig_file(lambda sd: sd.update({key: torch.zeros(16, 15, dtype=torch.float64)}))
    match = r"(?s)shape mismatches \(1\).*attn\.proj\.weight: expected \[16, 16\].*\[16, 15\]"
    with pytest.raises(CheckpointError, match=match):
        load_transformer(path, config=CFG)


def test_truncated_and_corrupt_files(orig_file):
    path = orig_file()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_transformer(path)
    path.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_transformer(path)


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors"):
        load_transformer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_transformer(tmp_path / "nope.safetensors")


def test_pickle_files_are_refused(tmp_path):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="pickle files .* are refused"):
        load_transformer(tmp_path)
    ckpt = tmp_path / "sd3_medium.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="can run arbitrary code"):
        load_transformer(ckpt)


def test_not_a_transformer_file(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="no SD3 transformer keys"):
        load_transformer(path)


def test_bad_config_json(tmp_path, ref):
    ref.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "config.json").write_text(json.dumps({"num_layers": 3}))
    with pytest.raises(CheckpointError, match="not a usable SD3Transformer2DModel config"):
        load_transformer(tmp_path)


def test_missing_fused_part_is_reported_once_as_missing(tmp_path, ref):
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    del sd["transformer_blocks.1.attn.to_k.weight"]  # its to_q / to_v siblings stay
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_diffusers()))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): transformer_blocks\.1\.attn\.to_k\.weight$") as e:
        load_transformer(tmp_path)
    assert "unexpected" not in str(e.value)


def test_nan_or_inf_tensor_is_named(orig_file):
    key = ORIGINAL_PREFIX + "joint_blocks.1.context_block.mlp.fc1.weight"

    def poison(sd):
        sd[key] = sd[key].clone()
        sd[key][0, 3] = float("inf")

    path = orig_file(poison)
    with pytest.raises(CheckpointError, match=rf"1 tensors hold NaN or inf values.*{path}: {key}"):
        load_transformer(path, config=CFG)


def test_folder_listing_is_capped(tmp_path):
    for n in range(40):
        (tmp_path / f"file_{n:02d}.txt").write_text("")
    with pytest.raises(CheckpointError, match=r"found file_00\.txt, .*file_07\.txt, \.\.\. and 32 more$"):
        load_transformer(tmp_path)


def test_from_diffusers_state_dict_copies_and_refuses_the_official_layout(ref):
    model = from_diffusers_state_dict(ref.state_dict(), CFG)
    ptrs = {t.data_ptr() for t in ref.state_dict().values()}
    assert not any(t.data_ptr() in ptrs for t in model.state_dict().values())  # a copy, as a file load
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.float64)
    assert from_diffusers_state_dict(ref.state_dict(), CFG, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(CheckpointError, match="not diffusers'"):
        from_diffusers_state_dict(model.state_dict(), CFG)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_sees_every_nan_and_inf(dtype):
    from flashsd3.weights import all_finite

    assert all_finite(torch.randn(1000).to(dtype)) and all_finite(torch.empty(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for pos in (0, 517, 999):
            t = torch.randn(1000).to(dtype)
            t[pos] = bad
            assert not all_finite(t), (bad, pos)
