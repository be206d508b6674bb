"""Key tables against the real SD3-medium key lists (no weights: meta device) and round trips."""
import dataclasses

import pytest
import torch

from flashsd3 import SD3_MEDIUM, TINY, MMDiT
from flashsd3.keymaps.mmdit import ORIGINAL_PREFIX, diffusers_table
from flashsd3.keymaps.rules import as_is, conv1x1_to_linear, fuse_qkv, identity_table, plan_keys, swap_halves
from flashsd3.mmdit import from_diffusers_state_dict, to_diffusers_state_dict
from flashsd3.mmdit.loading import infer_config
from helpers_reference import KeyListReader, read_tsv


def sd3_medium_meta():
    with torch.device("meta"):
        return MMDiT(SD3_MEDIUM)


def check_table_covers(shapes, table, prefix=""):
    model = sd3_medium_meta()
    expected = model.state_dict()
    plan = plan_keys(expected.keys(), table)
    consumed = set()
    for key, step in plan.items():
        full = [prefix + s for s in step.sources]
        assert all(s in shapes for s in full), f"{key}: sources {full} not in the official key list"
        assert step.transform.shape(*(shapes[s] for s in full)) == tuple(expected[key].shape), key
        consumed.update(full)
    left = {k for k in shapes if k.startswith(prefix)} - consumed
    assert not left, f"official keys mapped to nothing: {sorted(left)[:10]}"
    return len(plan)


def test_every_diffusers_key_maps_onto_sd3_medium():
    shapes = read_tsv("sd3_medium_diffusers_transformer_keys.tsv")
    assert len(shapes) == 683
    # 683 diffusers keys -> 491 of ours: q/k/v fused in 2 streams x 24 blocks x (weight, bias)
    assert check_table_covers(shapes, diffusers_table(SD3_MEDIUM.depth)) == 491


def test_every_original_key_maps_onto_sd3_medium():
    shapes = read_tsv("sd3_medium_original_keys.tsv")
    model_keys = {k: v for k, v in shapes.items() if k.startswith(ORIGINAL_PREFIX)}
    assert len(model_keys) == 491
    check_table_covers(model_keys, identity_table(sd3_medium_meta().state_dict().keys()), prefix=ORIGINAL_PREFIX)


@pytest.mark.parametrize("tsv, layout, prefix", [
    ("sd3_medium_diffusers_transformer_keys.tsv", "diffusers", ""),
    ("sd3_medium_original_keys.tsv", "original", ORIGINAL_PREFIX),
])
def test_infer_config_from_official_shapes(tsv, layout, prefix):
    reader = KeyListReader(read_tsv(tsv), tsv)
    assert infer_config(reader, layout, prefix) == SD3_MEDIUM


def test_parameter_count_matches_published_file():
    # 2,084,951,104 values including the pos_embed buffer: the published fp16 transformer file is
    # 4,169,981,408 bytes = 2 bytes x that + header (tests/fixtures/README.md)
    assert sum(t.numel() for t in sd3_medium_meta().state_dict().values()) == 2_084_951_104


def test_ours_to_diffusers_to_ours_round_trip():
    torch.manual_seed(0)
    model = MMDiT(TINY)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    exported = to_diffusers_state_dict(model)
    plan = plan_keys(model.state_dict().keys(), diffusers_table(TINY.depth))
    assert sorted(exported) == sorted({s for step in plan.values() for s in step.sources})
    back = from_diffusers_state_dict(exported, TINY).state_dict()  # through the strict loader
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k
    pointers = [{t.data_ptr() for t in sd.values()} for sd in (model.state_dict(), exported, back)]
    assert not (pointers[0] & pointers[1]) and not (pointers[1] & pointers[2])  # copies both ways


def test_every_rule_is_used_or_optional():
    # Each templated diffusers row must match some key of an SD3 or SD3.5 model (no dead rows).
    cfg = dataclasses.replace(TINY, depth=3, qk_norm="rms_norm", dual_attention_layers=(0,))
    keys = MMDiT(cfg).state_dict().keys()
    plan = plan_keys(keys, diffusers_table(cfg.depth))
    used = {s.replace(".0.", ".{i}.", 1) if s.startswith("transformer_blocks.0.") else s
            for step in plan.values() for s in step.sources}
    for rule in diffusers_table(cfg.depth):
        if "{i}" in rule.ours:
            assert any(s in used for s in rule.sources), rule


@pytest.mark.parametrize("transform, shapes", [
    (as_is, [(6, 4)]), (fuse_qkv, [(6, 4)] * 3), (swap_halves, [(6, 4)]), (conv1x1_to_linear, [(6, 4, 1, 1)]),
])
def test_transforms_invert_and_shape_agree_with_apply(transform, shapes):
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(s, generator=g) for s in shapes]
    ours = transform.apply(*parts)
    assert tuple(ours.shape) == transform.shape(*shapes)
    assert all(torch.equal(a, b) for a, b in zip(transform.invert(ours, len(parts)), parts, strict=True))
    # each source's rows sit in its row slice of ours, in our row order (what a LoRA B relies on)
    for part, rows in zip(parts, transform.row_slices(ours.shape[0], len(parts)), strict=True):
        if transform is not conv1x1_to_linear:
            assert torch.equal(ours[rows], transform.to_our_rows(part))


def test_transform_shape_refusals():
    assert fuse_qkv.shape((6, 4), (6, 5)) is None
    assert swap_halves.shape((5, 4)) is None
    assert conv1x1_to_linear.shape((6, 4, 3, 3)) is None
    assert fuse_qkv.row_slices(48, 3) == [slice(0, 16), slice(16, 32), slice(32, 48)]
