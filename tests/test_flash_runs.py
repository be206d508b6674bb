"""`flashsd3-train flash` end to end on the demo model: 2-rank torchrun against 1 process, a resumed run against
an uninterrupted one, the saved adapter, the sample grid. torchrun with OMP_NUM_THREADS=1 and the one-process
runs in this process (one thread), as test_training_runs.py; a short recipe (K = 4 teacher steps, one batch per
phase) so every loss is exercised; both named recipes (--recipe flash-sd3, distill), distill with the chain-start
option on half of the batches (--chain-starts 0.5) and with every chain step per batch (--chain-steps all)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from flashsd3.training import cli
from helpers_training import checkpoint_state, metrics, run, run_here, train_cmd

STEPS = 4
RUN = ["--batch-size", "4", "--lr", "1e-3", "--teacher-steps", "4", "--phase-batches", "1,1,1", "--guidance-min", "2",
       "--guidance-max", "3", "--lora-rank", "4", "--lora-alpha", "4", "--checkpoint-every", "1", "--keep-checkpoints",
       "0", "--sample-every", "0"]


def flash(cache: Path, out: Path, *extra, ranks: int = 1, steps: int = STEPS) -> list:
    return train_cmd("flash", cache, out, ["--steps", steps, *RUN, *extra], ranks)


def state(out: Path, step: int = STEPS) -> dict:
    return checkpoint_state(out, step)


@pytest.fixture(scope="module")
def cache(demo_cache):
    return demo_cache  # conftest.py: one demo cache for every training-run test


RECIPE_ARGS = {"flash-sd3": ["--recipe", "flash-sd3"], "distill": ["--recipe", "distill"],
               "distill-chain": ["--recipe", "distill", "--chain-starts", "0.5"],
               "distill-all": ["--recipe", "distill", "--chain-steps", "all"]}


@pytest.fixture(scope="module", params=list(RECIPE_ARGS))
def recipe(request):
    return request.param


@pytest.fixture(scope="module")
def reference(cache, recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run_here(flash(cache, out, *RECIPE_ARGS[recipe], "--sample-every", str(STEPS)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # a student trained for the flash_initial sampler says so when it is saved; the released recipe's does not
    assert ("sample it with --sampler flash_initial" in proc.stdout) == (recipe != "flash-sd3"), proc.stdout
    return out


def test_reference_run_outputs(reference, recipe):
    logs = metrics(reference)
    assert [m["phase"] for m in logs] == [0, 1, 2, 3]
    config = json.loads((reference / "config.json").read_text())
    chain = {"flash-sd3": 0.0, "distill": 1.0, "distill-chain": 0.5, "distill-all": 1.0}[recipe]  # distill's: 1
    assert (config["recipe"], config["chain_starts"]) == (recipe.removesuffix("-chain").removesuffix("-all"), chain)
    assert config["chain_steps"] == ("all" if recipe == "distill-all" else "drawn")
    assert config["renoise"] == ("fresh" if recipe == "flash-sd3" else "initial")
    names = state(reference)
    assert any(k.startswith("head.") for k in names) and any(".lora" in k or "lora_" in k for k in names)
    moved = {k: (state(reference)[k] - state(reference, 1)[k]).abs().max().item() for k in names}
    assert max(moved.values()) > 1e-4
    if recipe == "flash-sd3":
        assert all("d" in m and "distill" in m for m in logs) and all("dmd" in m and "adv" in m for m in logs[1:])
    else:  # the distillation term only: no DMD, no GAN, no discriminator step (its head never moves)
        assert all("distill" in m and not {"d", "dmd", "adv", "grad_norm_d"} & set(m) for m in logs)
        assert all(v == 0 for k, v in moved.items() if k.startswith("head."))
    grid = Image.open(reference / "samples" / f"step-{STEPS:07d}.png")
    assert grid.size == (4 * 32, 4 * 32)  # 4 prompts x (student 1, 2, 4 steps, teacher)
    config = json.loads((reference / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4
    assert (reference / "lora" / "adapter_model.safetensors").is_file()


def test_two_ranks_equal_one(cache, recipe, reference, tmp_path):
    out = tmp_path / "ddp"
    proc = run(flash(cache, out, *RECIPE_ARGS[recipe], ranks=2))  # torchrun: no retry, every exit must be clean
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ours, ref = state(out), state(reference)
    assert sorted(ours) == sorted(ref)
    # fp32: each rank computes the losses on its 2 rows and the gradients are averaged by all_reduce, another
    # summation order than one process's mean over 4 rows (~1e-7 relative); 4 AdamW steps carry it, hence 1e-5.
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(metrics(out), metrics(reference), strict=True):
        assert a.keys() == b.keys()
        for key in {"loss", "distill", "d", "k", "w"} & b.keys():  # no "d" without a discriminator step
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key


def test_resumed_equals_uninterrupted(cache, recipe, reference, tmp_path):
    out = tmp_path / "resumed"
    proc = run_here(flash(cache, out, *RECIPE_ARGS[recipe], steps=2))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_here(flash(cache, out, "--resume", steps=STEPS))  # the saved config holds the recipe
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout
    ours, ref = state(out), state(reference)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)  # one process, fp32, same ops: bitwise
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(reference)]


def test_bad_flash_settings(cache, tmp_path, capsys):
    def main(*args) -> str:
        assert cli.main([str(a) for a in args]) == 2
        return capsys.readouterr().err.strip()

    base = ["flash", "--cache", cache, "--out", tmp_path / "x"]
    assert "--lambda-adv needs 4 finite weights" in main(*base, "--lambda-adv", "0,1")
    assert "--disc-blocks (block indices >= 0) must be given exactly when" in main(*base, "--disc-input", "blocks")
    assert "--train-modules is not supported" in main(*base, "--train-modules", "joint_blocks.0.*")
    if importlib.util.find_spec("lpips") is None:
        assert "needs the `lpips` package" in main(*base, "--distill-loss", "lpips")
    with pytest.raises(SystemExit) as exit_:  # a choices flag: argparse's one-line usage error
        cli.main([str(a) for a in (*base, "--recipe", "fast")])
    assert exit_.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err
    assert "--chain-starts is a probability in [0, 1], got 1.5" in main(*base, "--chain-starts", "1.5")
    assert "--chain-starts maps one mode per sampler step" in main(*base, "--chain-starts", "0.5", "--sampler-steps",
                                                                   "2")
    assert not (tmp_path / "x").exists()
    kept = tmp_path / "kept"  # a folder of the user's: refused settings leave it as it was
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    before = sorted((p.relative_to(kept), p.read_bytes()) for p in kept.rglob("*"))
    assert "--chain-starts is a probability" in main("flash", "--cache", cache, "--out", kept, "--chain-starts", "-1")
    assert sorted((p.relative_to(kept), p.read_bytes()) for p in kept.rglob("*")) == before


def test_distilled_adapter_samples_in_one_step(recipe, reference, tmp_path):
    """flashsd3-sample --steps 1 with a trained adapter: the Flash sampler at one step is the student's first x0,
    noise - 1.0 * v(noise, t = 1000), decoded."""
    from flashsd3 import cli as sample_cli
    from flashsd3.lora import load_lora
    from flashsd3.pipeline import FlashSD3Pipeline

    pipe = FlashSD3Pipeline.demo(seed=0)
    load_lora(pipe.transformer, reference / "lora")
    noise = torch.randn(1, pipe.transformer.config.in_channels, 4, 4, generator=torch.Generator().manual_seed(3))
    out = pipe("a red circle", height=32, width=32, num_steps=1, latents=noise, output_type="latent").latents
    ctx, pooled = pipe.encode_prompt(["a red circle"])
    with torch.no_grad():
        x0 = noise - pipe.transformer(noise, torch.tensor([1000.0]), ctx, pooled)
    torch.testing.assert_close(out, x0, rtol=0, atol=0)  # the same call in the same dtype (MKL_CBWR: conftest)
    assert sample_cli.main(["--demo", "--lora", str(reference / "lora"), "--prompt", "a red circle", "--seed", "0",
                            "--height", "32", "--width", "32", "--steps", "1", "--out", str(tmp_path / "img")]) == 0
    (png,) = (tmp_path / "img").glob("*.png")
    assert Image.open(png).text["steps"] == "1" and Image.open(png).text["sampler"] == "flash"
