"""The toy's per-sample measures (paired L2, mean chroma) and the recipe rows' keys, on hand-made tensors."""
import pytest
import torch

from flashsd3.toy.evaluate import (
    ROW_METRICS,
    ToyClassifier,
    ToyEvaluator,
    make_eval_set,
    mean_chroma,
    paired_l2,
    parse_row_key,
    row_key,
)


def _rgb(r, g, b, n=1, side=4):
    return torch.tensor([r, g, b], dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, side, side).clone()


def test_paired_l2_is_the_mean_per_pixel_squared_difference():
    ref = torch.zeros(2, 3, 4, 4)
    images = ref.clone()
    images[0] += 0.5  # sample 0: every pixel off by 0.5 -> 0.25; sample 1 exact -> 0
    assert paired_l2(images, ref) == pytest.approx(0.125, abs=1e-12)
    images[1, 0, 0, 0] = 4.0  # one of 48 values off by 4 -> 16 / 48
    assert paired_l2(images, ref) == pytest.approx((0.25 + 16 / 48) / 2, abs=1e-7)  # float32 mean: ulp 3e-8
    assert paired_l2(ref.double(), ref) == 0.0
    with pytest.raises(ValueError, match="shaped like the reference"):
        paired_l2(images[:1], ref)


def test_mean_chroma_on_hand_made_colours():
    assert mean_chroma(_rgb(0.3, 0.3, 0.3)) == 0.0  # any grey
    assert mean_chroma(_rgb(1, -1, -1)) == pytest.approx(2.0)  # pure red: the maximum
    assert mean_chroma(_rgb(0.5, 0.0, -0.5)) == pytest.approx(1.0)
    half = _rgb(0.0, 0.0, 0.0, side=4)
    half[..., :2] = _rgb(1, -1, 0, side=4)[..., :2]  # half the pixels red-ish (chroma 2), half grey
    assert mean_chroma(half) == pytest.approx(1.0)
    assert mean_chroma(_rgb(3.0, -3.0, 0.0)) == pytest.approx(2.0)  # clamped to [-1, 1] as displayed
    two = torch.cat([_rgb(0.2, 0.2, 0.2), _rgb(1, 0, 0)])  # mean over images too
    assert mean_chroma(two) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        mean_chroma(torch.zeros(2, 1, 4, 4))


def test_row_keys_round_trip_and_reject_bad_names():
    assert row_key("distill", 1, 4) == "distill_seed1_4step"
    assert row_key("flash-sd3", 0, 1) == "flash-sd3_seed0_1step"
    assert parse_row_key("flash-sd3_seed12_4step") == ("flash-sd3", 12, 4)
    for other in ("teacher_4_cfg", "student_4", "_meta", "distill_seed1_4steps", "Distill_seed1_4step"):
        assert parse_row_key(other) is None
    for bad in (("Distill", 0, 4), ("dis_till", 0, 4), ("", 0, 4), ("distill", -1, 4), ("distill", 0, 0)):
        with pytest.raises(ValueError, match="recipe row"):
            row_key(*bad)


def test_evaluator_rows_carry_every_metric():
    torch.manual_seed(0)
    ev = ToyEvaluator(ToyClassifier().eval(), make_eval_set(48))
    ref = ev.eval_set.data.clone()  # any images of the set's size serve as a reference here
    with pytest.raises(ValueError, match="set_reference"):
        ev.score(ref, paired=True)
    ev.set_reference(ref)
    key, row = ev.recipe_row(ref, recipe="distill", seed=1, steps=4, sampler="flash_initial")
    assert key == "distill_seed1_4step" and set(ROW_METRICS) <= set(row) and row["sampler"] == "flash_initial"
    assert row["paired_l2"] == 0.0 and row["nfe"] == 4
    assert abs(row["fd_ref"]) < 1e-11  # float64 FD of a set to itself: sqrtm rounding, measured 1.5e-12
    assert row["mean_chroma"] == pytest.approx(mean_chroma(ref))
    shifted = ev.score(ref + 0.1, paired=True)
    # float32 ref + 0.1 rounds each difference by up to 6e-8 (0.6 ppm of 0.1): squared, 1.2 ppm; measured 0.26 ppm
    assert shifted["paired_l2"] == pytest.approx(0.01, rel=2e-6) and "paired_l2" not in ev.score(ref)
