"""The toy world: dataset determinism and caption/pixel agreement, the evaluator (classifier, Frechet
distance against float64 formulas), the teacher file round trip, and a smoke run of scripts/toy.py."""
import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from flashsd3.toy.data import COLOURS, PALETTE, POSITIONS, SHAPES, balanced_labels, caption, make_dataset, render
from flashsd3.toy.evaluate import (
    accuracies,
    classify,
    frechet_distance,
    frechet_distance_features,
    gaussian_stats,
    train_classifier,
)
from flashsd3.toy.model import AttributeText, build_teacher, generate, load_teacher, save_teacher

ROOT = Path(__file__).resolve().parents[1]


def test_dataset_is_deterministic_from_its_seed():
    a, la = make_dataset(64, seed=5)
    b, lb = make_dataset(64, seed=5)
    c, _ = make_dataset(64, seed=6)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.shape == (64, 3, 16, 16) and a.min() >= -1 and a.max() <= 1


def test_caption_text():
    assert caption((0, 0, 0)) == "a red circle at the top left"
    assert caption(torch.tensor([2, 3, 3])) == "a yellow triangle at the bottom right"
    labels = balanced_labels(48)
    assert len({caption(row) for row in labels}) == len(SHAPES) * len(COLOURS) * len(POSITIONS) == 48


def _shape_pixels(img01: torch.Tensor) -> torch.Tensor:
    """Saturated pixels: the background is near-grey (channel spread < 0.25), every palette colour is not."""
    spread = img01.max(0).values - img01.min(0).values
    return spread > 0.3


def test_captions_match_the_pixels():
    """Read each attribute back from the pixels with hand-written rules: colour = nearest palette entry of
    the saturated pixels' mean, position = quadrant of their centroid, shape = how much of their bounding
    box they fill (square 1, circle pi/4, triangle ~0.55), at 64x64 where edges are a small part of it."""
    labels = balanced_labels(96)
    images = (render(labels, torch.Generator().manual_seed(0), resolution=64) + 1) / 2
    for img, (shape, colour, pos) in zip(images, labels.tolist(), strict=True):
        mask = _shape_pixels(img)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        mean_rgb = img[:, mask].mean(1)
        assert (PALETTE - mean_rgb).norm(dim=1).argmin().item() == colour, caption((shape, colour, pos))
        quadrant = int(ys.float().mean() >= 32) * 2 + int(xs.float().mean() >= 32)
        assert quadrant == pos, caption((shape, colour, pos))
        fill = mask.sum().item() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)).item()
        read = 1 if fill > 0.9 else (0 if fill > 0.66 else 2)
        assert read == shape, f"{caption((shape, colour, pos))}: fill {fill:.3f}"


def test_render_rejects_bad_labels():
    with pytest.raises(ValueError, match="colour labels"):
        render(torch.tensor([[0, 4, 0]]), torch.Generator())
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        render(torch.tensor([0, 1, 2]), torch.Generator())


def _held_out_accuracy(steps: int, batch: int = 128) -> dict[str, float]:
    clf = train_classifier(seed=0, steps=steps, batch=batch)
    images, labels = make_dataset(512, seed=99)
    return accuracies(classify(clf, images)[1], labels)


def test_classifier_reads_colour_and_position_quickly():
    """A briefly trained classifier (80 steps at batch 64, in the test) already reads colour and position of
    held-out data and shape above chance (measured: 1.0, 1.0, 0.60); shape needs longer (the next test, slow)."""
    acc = _held_out_accuracy(80, batch=64)
    assert acc["colour_acc"] > 0.98 and acc["position_acc"] > 0.98, acc
    assert acc["shape_acc"] > 0.5, acc  # chance is 1/3


@pytest.mark.slow
def test_classifier_reads_held_out_data():
    """The evaluator's own budget (1000 steps at batch 128, ~2-4 min on 2 shared cores) reads every attribute
    of held-out procedural data (measured: 100% on 1000 images; results.json row data_heldout: 2000 images)."""
    acc = _held_out_accuracy(1000)
    assert acc["adherence"] > 0.99, acc


def test_frechet_distance_identical_sets_is_zero():
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    # exact in exact arithmetic; float64 eigen-solvers leave ~1e-13 relative to tr(S) ~ 150
    assert abs(frechet_distance_features(feats, feats)) < 1e-9


def test_frechet_distance_matches_closed_forms():
    gen = torch.Generator().manual_seed(1)
    D = 6
    mu1, mu2 = torch.randn(D, generator=gen, dtype=torch.float64), torch.randn(D, generator=gen, dtype=torch.float64)
    a, b = torch.rand(D, generator=gen, dtype=torch.float64) + 0.1, torch.rand(D, generator=gen, dtype=torch.float64)
    # commuting (diagonal) covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert abs(got - expected.item()) < 1e-12 * max(1.0, expected.item())
    # same covariance: only the means count
    s = torch.randn(D, D, generator=gen, dtype=torch.float64)
    s = s @ s.T + 0.1 * torch.eye(D, dtype=torch.float64)
    assert abs(frechet_distance(mu1, s, mu2, s) - ((mu1 - mu2) ** 2).sum().item()) < 1e-10


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg", reason="scipy gives the reference matrix square root")
    gen = torch.Generator().manual_seed(2)
    D = 8
    m1, m2 = (torch.randn(D, D, generator=gen, dtype=torch.float64) for _ in range(2))
    s1, s2 = m1 @ m1.T + 0.05 * torch.eye(D, dtype=torch.float64), m2 @ m2.T
    mu1, mu2 = torch.randn(D, generator=gen, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real  # the FID reference formula (pytorch-fid)
    expected = ((mu1 - mu2) ** 2).sum().item() + (s1.trace() + s2.trace()).item() - 2 * covmean.trace()
    assert abs(frechet_distance(mu1, s1, mu2, s2) - expected) < 1e-9 * max(1.0, abs(expected))


def test_gaussian_stats_match_torch_cov():
    feats = torch.randn(50, 5, generator=torch.Generator().manual_seed(3))
    mu, cov = gaussian_stats(feats)
    assert torch.allclose(cov, torch.cov(feats.double().T), rtol=0, atol=1e-14)
    assert torch.allclose(mu, feats.double().mean(0), rtol=0, atol=1e-15)


def test_attribute_text_empty_prompt_and_errors():
    text = AttributeText()
    ctx, pooled = text(torch.tensor([[0, 1, 2], [-1, -1, -1]]))
    e_ctx, e_pooled = text.empty(1)
    assert ctx.shape == (2, 3, 64) and pooled.shape == (2, 192)
    assert torch.equal(ctx[1:], e_ctx) and torch.equal(pooled[1:], e_pooled)
    with pytest.raises(ValueError, match="label column 1"):
        text(torch.tensor([[0, 4, 0]]))


def test_teacher_file_round_trip(tmp_path):
    model, text = build_teacher(seed=0)
    with torch.no_grad():  # the DiT init zeroes the output; perturb so the comparison means something
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "teacher.safetensors"
    save_teacher(model, text, path, seed="0")
    model2, text2 = load_teacher(path)
    labels, noise = balanced_labels(4), torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = generate(model.eval(), text.eval(), labels, noise, steps=2, guidance=2.0)
    b = generate(model2, text2, labels, noise, steps=2, guidance=2.0)
    assert torch.equal(a, b)  # same weights, same ops: bitwise
    with pytest.raises(FileNotFoundError, match="toy teacher"):
        load_teacher(tmp_path / "missing.safetensors")


def test_toy_script_smoke(tmp_path):
    """scripts/toy.py end to end on minimal budgets: files written, every teacher row present."""
    spec = importlib.util.spec_from_file_location("toy_script", ROOT / "scripts" / "toy.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules["toy_script"] = script  # its dataclasses look their module up
    spec.loader.exec_module(script)
    with contextlib.redirect_stdout(io.StringIO()):  # in this process: no second Python and torch import
        assert script.main(["--quick", "--out", str(tmp_path), "--steps", "3", "--num-samples", "48",
                            "--classifier-steps", "3", "--threads", "1", "--distil-steps", "4", "--distil-batch", "4",
                            "--bank", "8", "--variants"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for row in ("teacher_cfg_ref", "teacher_nocfg", "teacher_4_cfg", "teacher_4_nocfg", "data_heldout"):
        assert {"adherence", "fd_data", "fd_ref", "shape_acc", "colour_acc", "position_acc"} <= set(results[row])
        assert (tmp_path / f"samples_{row}.png").is_file()
    assert results["teacher_cfg_ref"]["fd_ref"] == pytest.approx(0, abs=1e-6)
    for name in ("RESULTS.md", "loss.png", "teacher.safetensors", "classifier.safetensors"):
        assert (tmp_path / name).is_file(), name
    model, _ = load_teacher(tmp_path / "teacher.safetensors")
    assert model.config.depth == 4 and model.config.hidden_size == 128
    for row in ("student_init", "student_1", "student_2", "student_4", "student_4_no_adv_dmd",
                "student_4_mid_features"):  # Flash distillation rows (flashsd3/toy/distill.py)
        assert {"adherence", "fd_data", "fd_ref", "paired_l2"} <= set(results[row]), row
    assert results["teacher_cfg_ref"]["paired_l2"] == 0 and results["student_1"]["nfe"] == 1
    for name in ("flash_student_losses.png", "flash_student_discriminator.png", "flash_history.json"):
        assert (tmp_path / name).is_file(), name
    for recipe in ("flash-sd3", "distill"):  # the named recipes, student seed 0 (--quick), 1 and 4 steps
        for steps in (1, 4):
            row = results[f"{recipe}_seed0_{steps}step"]
            assert {"adherence", "fd_data", "fd_ref", "paired_l2", "mean_chroma"} <= set(row)
            assert row["nfe"] == steps and row["recipe"] == recipe
            assert row["sampler"] == {"flash-sd3": "flash", "distill": "flash_initial"}[recipe]  # what sampled it
        assert (tmp_path / f"samples_{recipe}_seed0_4step.png").is_file()
    # flash-sd3 at student seed 0 is the `student` run: the same samples, not a second training
    assert results["flash-sd3_seed0_4step"]["fd_ref"] == results["student_4"]["fd_ref"]
    runs = results["_meta"]["recipe_runs"]
    assert runs["flash-sd3_seed0"] == {"reused": True}
    calls = runs["distill_seed0"]["calls_per_sample"]  # no discriminator: the features are never called
    assert "features" not in calls and calls["student"]["backward"] == 1.0
    assert "| `distill_seed0_4step` |" in (tmp_path / "RESULTS.md").read_text()
    # scripts/toy_cfg_frontier.py on the same folder: its row at the reference's scale is the reference row
    spec = importlib.util.spec_from_file_location("toy_cfg_frontier", ROOT / "scripts" / "toy_cfg_frontier.py")
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert frontier.main(["--run", str(tmp_path), "--num-samples", "48", "--guidance", "3,1"]) == 0
    rows = [line.split("|")[1:-1] for line in out.getvalue().splitlines() if line.startswith("| 3 |")]
    ref = results["teacher_cfg_ref"]
    assert len(rows) == 1 and float(rows[0][2]) == round(ref["fd_data"], 1) and float(rows[0][3]) == 0.0, rows
    # --steps 4 against the 32-step reference (--reference-steps' default) is the teacher_4_cfg row
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert frontier.main(["--run", str(tmp_path), "--num-samples", "48", "--guidance", "3", "--steps", "4"]) == 0
    rows = [line.split("|")[1:-1] for line in out.getvalue().splitlines() if line.startswith("| 3 |")]
    four = results["teacher_4_cfg"]
    assert len(rows) == 1 and [float(rows[0][2]), float(rows[0][3])] == [round(four["fd_data"], 1),
                                                                          round(four["fd_ref"], 1)], (rows, four)


def test_toy_recipe_runs_apply_preset_options_and_batches():
    """recipes.recipe_run: flash-sd3 = the base run; distill = the preset over the toy's sizes at DISTILL.batches x
    its batches (phases the 4 quarters); each option = its preset with its fields, at its batches, rows and rate."""
    from dataclasses import replace

    from flashsd3.toy.distill import ToyFlashRun, last_phase
    from flashsd3.toy.recipes import DISTILL, NAMES, OPTIONS, recipe_run
    from flashsd3.training.flash import RECIPES

    base = replace(ToyFlashRun(), steps=400)
    assert recipe_run(base, "flash-sd3", 3) == replace(base, seed=3)
    d = recipe_run(base, "distill", 1)
    assert (d.seed, d.bank, d.steps, d.flash.phase_batches) == (1, 0, 400 * DISTILL.batches, (200, 200, 200))
    preset = RECIPES["distill"]
    assert all(getattr(d.flash, k) == getattr(preset, k) for k in ("lambda_adv", "lambda_dmd", "mixture_modes",
                                                                    "target_steps", "chain_starts", "renoise",
                                                                    "late_guidance"))
    assert d.flash.guidance == base.flash.guidance and d.flash.sampler == "flash_initial"  # the toy's sizes
    for name, row in OPTIONS.items():
        run = recipe_run(base, name, 0)
        assert run.flash.recipe == row.preset and all(getattr(run.flash, k) == v for k, v in row.fields.items()), name
        assert (run.steps, run.batch, run.lr_decay) == (400 * row.batches, row.rows or base.batch, row.decay), name
    data = recipe_run(base, "distill-data", 0)
    assert (data.flash.chain_starts, data.flash.sampler, data.steps) == (0.0, "flash", 400)
    # distill's rate decays over its last phase (the 4th quarter of its 800 batches); the options keep theirs
    assert d.lr_decay and last_phase(d) == 200
    assert not data.lr_decay and not recipe_run(base, "distill-half", 0).lr_decay
    # an option at the toy's batches keeps the base's phases; scripts/toy.py --lr-decay reaches it through the base
    assert data.flash.phase_batches == base.flash.phase_batches
    assert recipe_run(replace(base, lr_decay=True), "distill-data", 0).lr_decay
    # distill-w1: the distill row with one w for every step, the preset's before --late-guidance; distill-t8:
    # that row on the 8-step target grid, the preset's before 16 (the committed rows' runs)
    one_w = replace(d, flash=replace(d.flash, late_guidance=1.0))
    assert recipe_run(base, "distill-w1", 1) == one_w and d.flash.late_guidance == 0.8
    assert recipe_run(base, "distill-t8", 1) == replace(one_w, flash=replace(one_w.flash, target_steps=8))
    assert d.flash.target_steps == 16
    for name in OPTIONS:  # every option but distill-l75 was measured with one w and keeps it
        assert recipe_run(base, name, 0).flash.late_guidance == (0.75 if name == "distill-l75" else 1.0), name
    assert recipe_run(base, "distill-l75", 1) == replace(d, flash=replace(d.flash, late_guidance=0.75))
    for name in OPTIONS:  # the options measured on the 8-step grid keep it; the guidance ones are the preset's
        on_preset_grid = name.startswith(("distill-w", "distill-l")) or name == "distill-all16"  # distill-w1 too
        assert recipe_run(base, name, 0).flash.target_steps == (16 if on_preset_grid else 8), name
    every = recipe_run(base, "distill-all", 0)  # every chain step per row: a quarter of the rows per batch
    assert (every.flash.chain_steps, every.batch, every.steps, every.lr_decay) == ("all", 8, 800, True)
    assert recipe_run(base, "distill-all16", 0) == replace(every, flash=replace(every.flash, target_steps=16))
    assert set(NAMES) == {*RECIPES, *OPTIONS}
    with pytest.raises(ValueError, match="unknown recipe 'dmd'"):
        recipe_run(base, "dmd", 0)
