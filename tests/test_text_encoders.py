"""TextEncoders: parity with diffusers' StableDiffusion3Pipeline.encode_prompt, loading, refusals.

Parity is asserted BITWISE (torch.equal): we call the very same transformers modules on the same token
ids and only concatenate / zero-pad, so any difference at all would be a bug, not rounding.
"""
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from flashsd3.keymaps.text import CLIP_G_PREFIX, CLIP_L_PREFIX, T5_PREFIX
from flashsd3.text_encoders import TextEncoders, load_t5, load_tokenizers
from flashsd3.weights import CheckpointError, SafetensorsReader
from helpers_text import (
    save_diffusers_text_folder,
    save_text_single_file,
    text_single_file_state,
    tiny_clip_pair,
    tiny_t5,
)

CONTEXT = 32  # flashsd3.TINY.context_dim: CLIP 8 + 16 = 24 features, zero-padded to 32
LONG = "a photo of a cat on mars, " * 12  # > 77 CLIP tokens: exercises truncation
PROMPTS = ["a photo of a cat", "", LONG]


def pipeline(tok, enc, tok2, enc2, tok3=None, enc3=None):
    """diffusers' SD3 pipeline around the given text parts; the tiny transformer only supplies
    joint_attention_dim (the width of T5's zeros) to encode_prompt."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the parity reference (test extra)")
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=CONTEXT, caption_projection_dim=16, pooled_projection_dim=24)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=enc, tokenizer=tok, text_encoder_2=enc2, tokenizer_2=tok2, text_encoder_3=enc3, tokenizer_3=tok3)


def reference(pipe, prompts, t5_tokens=77):
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=torch.device("cpu"),
                                              do_classifier_free_guidance=False, max_sequence_length=t5_tokens)
    return embeds, pooled


@pytest.fixture(scope="module")
def clips():  # CLIP-L with a random projection: checks pooled = text_embeds, not the raw EOS state
    return tiny_clip_pair(seed=0, identity_l_projection=False)


@pytest.fixture(scope="module")
def sd3_clips():  # SD3 convention: CLIP-L projection = identity (what a single file gives)
    return tiny_clip_pair(seed=10)


@pytest.fixture(scope="module")
def t5():
    return tiny_t5(seed=5, d_model=CONTEXT)


# Tokenizers ---------------------------------------------------------------------------------------

def test_tiny_tokenizers_pad_like_sd3(clips):
    tok, _, tok2, _ = clips
    a, b = (t(["a cat!"], padding="max_length", max_length=77).input_ids[0] for t in (tok, tok2))
    eot = tok.eos_token_id
    assert a[-1] == eot and tok.pad_token_id == eot  # tokenizer pads with <|endoftext|>
    assert b[-1] == 0 and tok2.pad_token_id == 0  # tokenizer_2 pads with "!" = id 0
    assert a[:3] == b[:3] and a[3] != b[3] == 0  # and splits "!" out as the special id 0


# Parity with diffusers ----------------------------------------------------------------------------

def test_encode_matches_diffusers_without_t5(clips):
    tok, enc, tok2, enc2 = clips
    pipe, ours = pipeline(*clips), TextEncoders(tok, enc, tok2, enc2, context_dim=CONTEXT)
    for prompts in (PROMPTS, *([p] for p in PROMPTS)):  # batch of 3, then each alone
        context, pooled = ours.encode(prompts)
        ref_context, ref_pooled = reference(pipe, prompts)
        assert context.shape == (len(prompts), 154, CONTEXT) and pooled.shape == (len(prompts), 24)
        assert torch.equal(context, ref_context) and torch.equal(pooled, ref_pooled)  # bitwise
    assert torch.equal(context[:, 77:], torch.zeros_like(context[:, 77:]))  # T5 off: 77 zero tokens
    assert torch.equal(context[:, :, 24:], torch.zeros_like(context[:, :, 24:]))  # features padded with zeros
    assert torch.equal(ours.encode("a photo of a cat")[0], ours.encode(["a photo of a cat"])[0])


def test_encode_matches_diffusers_with_t5(clips, t5):
    tok, enc, tok2, enc2 = clips
    pipe = pipeline(*clips, *t5)
    ours = TextEncoders(tok, enc, tok2, enc2, *t5, context_dim=CONTEXT)
    for t5_tokens in (77, 20):
        context, pooled = ours.encode(PROMPTS, t5_tokens=t5_tokens)
        ref_context, ref_pooled = reference(pipe, PROMPTS, t5_tokens)
        assert context.shape == (3, 77 + t5_tokens, CONTEXT)
        assert torch.equal(context, ref_context) and torch.equal(pooled, ref_pooled)  # bitwise
    assert context[:, 77:].abs().amax() > 0  # T5 tokens are real features, not zeros


def test_zeros_and_outputs_in_clip_l_dtype(sd3_clips):
    tok, enc, tok2, enc2 = tiny_clip_pair(seed=3, dtype=torch.float64)
    context, pooled = TextEncoders(tok, enc, tok2, enc2, context_dim=CONTEXT).encode(["a", "b"], t5_tokens=5)
    assert context.dtype == pooled.dtype == torch.float64 and context.shape == (2, 82, CONTEXT)


# Loading ------------------------------------------------------------------------------------------

def test_from_diffusers_folder(tmp_path, clips, t5):
    tok, enc, tok2, enc2 = clips
    save_diffusers_text_folder(tmp_path, *clips, *t5)
    expected = TextEncoders(tok, enc, tok2, enc2, *t5, context_dim=CONTEXT).encode(PROMPTS)
    loaded = TextEncoders.from_diffusers_folder(tmp_path, dtype=torch.float32, t5=True, context_dim=CONTEXT)
    got = loaded.encode(PROMPTS)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])  # bitwise
    no_t5 = TextEncoders.from_diffusers_folder(tmp_path, dtype=torch.float32, context_dim=CONTEXT)
    assert no_t5.t5 is None and no_t5.tokenizer_t5 is None
    assert torch.equal(no_t5.encode(PROMPTS)[1], expected[1])


@pytest.mark.parametrize("t5_key", ["encoder.embed_tokens.weight", "shared.weight"])
def test_from_single_file(tmp_path, sd3_clips, t5, t5_key):
    tok, enc, tok2, enc2 = sd3_clips
    path = save_text_single_file(tmp_path / "sd3.safetensors", enc, enc2, t5[1], t5_embedding_key=t5_key)
    save_diffusers_text_folder(tmp_path / "tok", tok, None, tok2, None, t5[0])
    loaded = TextEncoders.from_single_file(path, tmp_path / "tok", dtype=torch.float32, t5=True, context_dim=CONTEXT,
                                           clip_l_config=enc.config, clip_g_config=enc2.config, t5_config=t5[1].config)
    expected = TextEncoders(tok, enc, tok2, enc2, *t5, context_dim=CONTEXT).encode(PROMPTS)
    got = loaded.encode(PROMPTS)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])  # bitwise
    assert loaded.t5.shared.weight is loaded.t5.encoder.embed_tokens.weight  # one tied tensor


def test_single_file_with_shipped_tokenizers(tmp_path):
    from flashsd3.tokenizers import sd3_clip_tokenizers

    tok, enc, tok2, enc2 = tiny_clip_pair(seed=4, tokenizers=sd3_clip_tokenizers())  # vocab 49408
    path = save_text_single_file(tmp_path / "sd3.safetensors", enc, enc2)
    loaded = TextEncoders.from_single_file(path, dtype=torch.float32, context_dim=CONTEXT,
                                           clip_l_config=enc.config, clip_g_config=enc2.config)
    assert (loaded.tokenizer_l.pad_token_id, loaded.tokenizer_g.pad_token_id) == (49407, 0)
    expected = TextEncoders(tok, enc, tok2, enc2, context_dim=CONTEXT).encode(PROMPTS)
    got = loaded.encode(PROMPTS)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])  # bitwise
    with pytest.raises(ValueError, match="T5 needs a tokenizer source"):
        load_tokenizers(None, t5=True)


def test_single_file_clip_l_projection_is_identity(tmp_path, clips):
    tok, enc, tok2, enc2 = clips  # CLIP-L here HAS a random projection...
    for with_proj in (False, True):  # ...absent from the file, or present and (like diffusers) not used
        path = save_text_single_file(tmp_path / f"p{with_proj}.safetensors", enc, enc2, with_l_projection=with_proj)
        save_diffusers_text_folder(tmp_path / "tok", tok, None, tok2, None)
        loaded = TextEncoders.from_single_file(path, tmp_path / "tok", dtype=torch.float32, context_dim=CONTEXT,
                                               clip_l_config=enc.config, clip_g_config=enc2.config)
        assert torch.equal(loaded.clip_l.text_projection.weight, torch.eye(8))
        ids = tok(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert ids[0, 3] == tok.eos_token_id  # [SOT, a, cat, EOT, pad...]
        with torch.no_grad():
            unprojected = enc(ids).last_hidden_state[0, 3]  # EOS state after the final LayerNorm
        assert torch.equal(loaded.encode(["a cat"])[1][0, :8], unprojected)


def test_t5_fp16_keeps_ff_output_in_fp32(tmp_path, t5):
    enc3 = t5[1]
    sd = {T5_PREFIX + k: v.clone() for k, v in enc3.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(sd, str(tmp_path / "t5.safetensors"))
    model = load_t5(enc3.config, SafetensorsReader([tmp_path / "t5.safetensors"]), T5_PREFIX, dtype=torch.float16)
    wo = model.encoder.block[1].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32 and torch.equal(wo, enc3.encoder.block[1].layer[1].DenseReluDense.wo.weight)
    assert model.encoder.block[1].layer[1].DenseReluDense.wi_0.weight.dtype == torch.float16


# Refusals -----------------------------------------------------------------------------------------

def _load_single(path, tmp_path, enc, enc2, tok, tok2):
    save_diffusers_text_folder(tmp_path / "tok", tok, None, tok2, None)
    return TextEncoders.from_single_file(path, tmp_path / "tok", dtype=torch.float32, context_dim=CONTEXT,
                                         clip_l_config=enc.config, clip_g_config=enc2.config)


def test_harmless_extras_are_accepted(tmp_path, sd3_clips):
    tok, enc, tok2, enc2 = sd3_clips
    extra = {CLIP_L_PREFIX + "text_model.embeddings.position_ids": torch.arange(77)[None],
             CLIP_G_PREFIX + "logit_scale": torch.tensor(4.6), "model.diffusion_model.x": torch.zeros(1)}
    path = save_text_single_file(tmp_path / "x.safetensors", enc, enc2, extra=extra)
    _load_single(path, tmp_path, enc, enc2, tok, tok2)  # loads without error


@pytest.mark.parametrize("fault", ["unexpected", "missing", "shape"])
def test_bad_keys_raise(tmp_path, sd3_clips, fault):
    tok, enc, tok2, enc2 = sd3_clips
    sd = text_single_file_state(enc, enc2)
    bad = CLIP_G_PREFIX + "text_model.encoder.layers.1.mlp.fc2.bias"
    if fault == "unexpected":
        bad = CLIP_G_PREFIX + "text_model.encoder.layers.7.mlp.fc2.bias"
        sd[bad] = torch.zeros(16)
    elif fault == "missing":
        del sd[bad]
    else:
        sd[bad] = torch.zeros(17)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=f"(?s){fault}.*{bad.replace('.', '[.]')}") as err:
        _load_single(tmp_path / "bad.safetensors", tmp_path, enc, enc2, tok, tok2)
    assert "bad.safetensors" in str(err.value)


def test_file_without_text_encoders_raises(tmp_path, sd3_clips):
    tok, enc, tok2, enc2 = sd3_clips
    save_file({"model.diffusion_model.x_embedder.proj.bias": torch.zeros(4)}, str(tmp_path / "mmdit.safetensors"))
    with pytest.raises(CheckpointError, match="no CLIP text encoder weights.*text_encoders.clip_l"):
        _load_single(tmp_path / "mmdit.safetensors", tmp_path, enc, enc2, tok, tok2)


def test_t5_without_embedding_raises(tmp_path, t5):
    sd = {T5_PREFIX + k: v for k, v in t5[1].state_dict().items() if "embed" not in k and "shared" not in k}
    save_file(sd, str(tmp_path / "t5.safetensors"))
    with pytest.raises(CheckpointError, match="no T5 token embedding.*shared.weight"):
        load_t5(t5[1].config, SafetensorsReader([tmp_path / "t5.safetensors"]), T5_PREFIX)


def test_pickle_only_folder_raises(tmp_path, clips):
    save_diffusers_text_folder(tmp_path, *clips)
    (tmp_path / "text_encoder" / "model.safetensors").rename(tmp_path / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"(?s)text_encoder: no model.safetensors.*pytorch_model.bin"):
        TextEncoders.from_diffusers_folder(tmp_path, context_dim=CONTEXT)


def test_inconsistent_parts_raise(clips, t5):
    tok, enc, tok2, enc2 = clips
    with pytest.raises(ValueError, match="exceeds context_dim"):
        TextEncoders(tok, enc, tok2, enc2, context_dim=16)
    with pytest.raises(ValueError, match="d_model"):
        TextEncoders(tok, enc, tok2, enc2, *t5, context_dim=64)
    with pytest.raises(ValueError, match="both its tokenizer"):
        TextEncoders(tok, enc, tok2, enc2, None, t5[1], context_dim=CONTEXT)


def test_offload_moves_to_cpu(clips):
    ours = TextEncoders(*clips, context_dim=CONTEXT)
    assert ours.offload() is ours and ours.device.type == "cpu"
    assert all(p.device.type == "cpu" for p in ours.parameters())


def test_shipped_configs_are_sd3_medium():
    from flashsd3.text_encoders import CONFIG_DIR

    cl, cg, t = (json.loads((CONFIG_DIR / f).read_text()) for f in ("clip_l.json", "clip_g.json", "t5xxl.json"))
    clip = ("hidden_size", "num_hidden_layers", "hidden_act", "projection_dim")
    assert [cl[k] for k in clip] == [768, 12, "quick_gelu", 768]
    assert [cg[k] for k in clip] == [1280, 32, "gelu", 1280]
    t5 = ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "vocab_size")
    assert [t[k] for k in t5] == [4096, 10240, 24, 64, 64, 32128]
    assert t["feed_forward_proj"] == "gated-gelu" and cl["eos_token_id"] == cg["eos_token_id"] == 2


def test_long_prompt_warns_once_with_its_token_count(clips):
    """diffusers truncates to 77 CLIP tokens with a logged warning; we warn (Python warning) once per call."""
    tok, enc, tok2, enc2 = clips
    te = TextEncoders(tok, enc, tok2, enc2, context_dim=CONTEXT)
    n = len(tok(LONG).input_ids)  # start and end tokens included
    with pytest.warns(UserWarning, match=rf"^a prompt of {n} CLIP tokens: only the first 77") as caught:
        te.encode(["short", LONG])
    with pytest.warns(UserWarning, match=rf"^2 prompts of up to {n} CLIP tokens"):
        te.encode([LONG, LONG[:-30]])
    assert n > 77 and len(caught) == 1 and caught[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        te.encode(["a photo of a cat", "a" * 70])  # within the limit: silent
