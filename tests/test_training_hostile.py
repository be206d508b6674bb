"""`flashsd3-train` under careless or hostile input: one line on stderr, the right exit code, and nothing outside
what a run wrote changed (a digest of the folder before and after). In-process (`cli.main`) on the demo model.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flashsd3.training import cli
from helpers_training import ERR, ROOT, checkpoint_state, env, error_line, tree_state

RUN = ["--batch-size", "4", "--lr", "1e-3", "--lora-rank", "4", "--checkpoint-every", "1", "--keep-checkpoints", "0",
       "--sample-every", "0"]
FLASH = ["--teacher-steps", "4", "--phase-batches", "1,1,1", "--guidance-min", "2", "--guidance-max", "3",
         "--lora-alpha", "4"]


def train(objective: str, cache: Path, out: Path, *extra) -> int:
    """`flashsd3-train OBJECTIVE ...` in-process: its exit status (argparse's own errors exit 2 as well)."""
    try:
        return cli.main([objective, "--cache", str(cache), "--out", str(out), *RUN,
                         *(FLASH if objective == "flash" else []), *map(str, extra)])
    except SystemExit as e:
        return e.code


def refused(capsys, objective, cache, out, *extra, code: int = 2) -> str:
    """The command fails with `code` and one error line, and changes nothing in `out` (or its absence)."""
    before = tree_state(out)
    assert train(objective, cache, out, *extra) == code
    assert tree_state(out) == before
    return error_line(capsys)


@pytest.fixture(scope="module")
def run3(demo_cache, tmp_path_factory):
    """A finished 3-step flow run, checkpoints at every step."""
    out = tmp_path_factory.mktemp("hostile") / "run3"
    assert train("flow", demo_cache, out, "--steps", 3) == 0
    return out


def copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# Data lost or replaced ----------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["flow", "flash"])
def test_out_folder_holding_no_run_is_refused(objective, demo_cache, tmp_path, capsys):
    """Files a user keeps in --out, some named like run files, are neither written over nor deleted."""
    out = tmp_path / "mine"
    (out / "lora").mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(b"my adapter")
    (out / "lora" / "adapter_config.json").write_text("{}")
    (out / "config.json").write_text('{"_class_name": "SD3Transformer2DModel"}')
    (out / "metrics.jsonl").write_text("mine\n")
    for flags in ([], ["--overwrite"], ["--resume"]):
        line = refused(capsys, objective, demo_cache, out, "--steps", 1, *flags)
        assert str(out) in line and ("holds no" in line or "nothing to resume" in line), line


def test_overwrite_deletes_only_what_the_run_wrote(run3, tmp_path, capsys, demo_cache):
    out = copy(run3, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    (out / "samples").mkdir()
    (out / "samples" / "mine.png").write_bytes(b"png")
    (out / "checkpoints" / "keep-me").write_text("mine")
    assert train("flow", demo_cache, out, "--steps", 1, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "samples" / "mine.png").read_bytes() == b"png"
    assert (out / "checkpoints" / "keep-me").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["keep-me", "step-0000001"]
    assert json.loads((out / "done.json").read_text()) == {"step": 1}


def test_failed_resume_changes_nothing(run3, tmp_path, capsys, demo_cache):
    """A truncated or foreign checkpoint: refused before anything changes (the finished marker stays)."""
    out = copy(run3, tmp_path / "trunc")
    for step in (1, 2, 3):
        path = out / "checkpoints" / f"step-{step:07d}" / "trainable.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    line = refused(capsys, "flow", demo_cache, out, "--steps", 5, "--resume")
    assert "step-0000003" in line and "trainable.safetensors" in line, line
    out = copy(run3, tmp_path / "foreign")
    other = tmp_path / "other"
    assert train("flow", demo_cache, other, "--steps", 1, "--lora-rank", "2") == 0
    capsys.readouterr()
    for step in (1, 2, 3):
        shutil.rmtree(out / "checkpoints" / f"step-{step:07d}")
        shutil.copytree(other / "checkpoints" / "step-0000001", out / "checkpoints" / f"step-{step:07d}")
    line = refused(capsys, "flow", demo_cache, out, "--steps", 5, "--resume")
    assert "step-0000003" in line and "does not match" in line, line


def test_resume_falls_back_to_the_previous_checkpoint(run3, tmp_path, capsys, demo_cache):
    out = copy(run3, tmp_path / "run")
    path = out / "checkpoints" / "step-0000003" / "state.pt"
    path.write_bytes(path.read_bytes()[:50])
    assert train("flow", demo_cache, out, "--steps", 3, "--resume") == 0
    said = capsys.readouterr()
    assert "step-0000003" in said.err and "unreadable" in said.err and "resumed from" in said.out, said
    assert all(torch.equal(a, b) for a, b in zip(checkpoint_state(out, 3).values(),
                                                 checkpoint_state(run3, 3).values(), strict=True))


CHECKS = {  # flags -> words of the message; each refused before the run folder is created
    "train-modules": ("flow", ["--train-modules", "nothing.*"], "--train-modules"),
    "lora-targets": ("flow", ["--lora-targets", "attn.nope"], "--lora-targets"),
    "disc-blocks": ("flash", ["--disc-input", "blocks", "--disc-blocks", "7"], "--disc-blocks"),
    "disc-side": ("flash", ["--disc-input", "blocks", "--disc-blocks", "0"], "--disc-blocks"),
    "teacher-steps": ("flash", ["--teacher-steps", "0"], "--teacher-steps"),
    "seed-negative": ("flow", ["--seed", "-1"], "--seed"),
    "seed-huge": ("flash", ["--seed", str(2**64)], "--seed"),
    "sample-seed": ("flow", ["--sample-seed", "-3"], "--sample-seed"),
    "lr-inf": ("flow", ["--lr", "inf"], "--lr"),
}


@pytest.mark.parametrize("case", CHECKS)
def test_refused_start_leaves_nothing(case, demo_cache, tmp_path, capsys):
    objective, flags, words = CHECKS[case]
    line = refused(capsys, objective, demo_cache, tmp_path / "new", "--steps", 1, *flags)
    assert words in line, line
    (tmp_path / "empty").mkdir()
    refused(capsys, objective, demo_cache, tmp_path / "empty", "--steps", 1, *flags)


def test_resolution_beyond_the_position_table(demo_cache, tmp_path, capsys):
    cache = copy(demo_cache, tmp_path / "cache")
    record = json.loads((cache / "cache.json").read_text())
    record["spec"]["resolution"] = 2048  # demo: 64 tokens of 16 px -> at most 1024
    (cache / "cache.json").write_text(json.dumps(record))
    line = refused(capsys, "flow", cache, tmp_path / "new", "--steps", 1)
    assert "2048" in line and "1024" in line, line


# Valid input refused or silently wrong ----------------------------------------------------------------

@pytest.mark.parametrize("objective", ["flow", "flash"])
def test_every_sampling_seed_trains(objective, demo_cache, tmp_path):
    top = 2**64 - 1
    assert train(objective, demo_cache, tmp_path / "a", "--steps", 1, "--seed", top, "--sample-seed", top,
                 "--sample-every", 1, "--sample-steps", 1) == 0
    assert train(objective, demo_cache, tmp_path / "b", "--steps", 1, "--seed", 123_456_789) == 0
    a, b = checkpoint_state(tmp_path / "a", 1), checkpoint_state(tmp_path / "b", 1)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_with_the_path_spelled_differently(run3, demo_cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train("flow", demo_cache, out, "--steps", 1) == 0
    moved = tmp_path / "moved"
    out.rename(moved)  # a run folder moved (or copied) elsewhere resumes there
    assert train("flow", demo_cache, str(moved) + "/", "--steps", 2, "--resume") == 0
    monkeypatch.chdir(tmp_path)
    assert train("flow", demo_cache, "moved", "--steps", 3, "--resume") == 0
    assert json.loads((moved / "done.json").read_text()) == {"step": 3}
    ours, ref = checkpoint_state(moved, 3), checkpoint_state(run3, 3)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_prepare_accepts_the_same_data_spelled_differently(demo_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(demo_cache.parent)
    args = ["prepare", "--demo", "--resolution", "32", "--out", str(tmp_path / "c")]
    assert cli.main([*args, "--data", "data"]) == 0
    assert cli.main([*args, "--data", "./data/"]) == 0
    assert cli.main([*args, "--data", str(demo_cache.parent / "data")]) == 0


def test_resume_below_the_current_step_is_refused(run3, tmp_path, capsys, demo_cache):
    out = copy(run3, tmp_path / "run")
    line = refused(capsys, "flow", demo_cache, out, "--steps", 2, "--resume")
    assert "--steps 2" in line and "step 3" in line, line


def test_resume_moving_the_learning_rate_decay_is_refused(demo_cache, tmp_path, capsys):
    """A run whose rate decays over its last steps cannot be extended (the decay is placed by --steps); a decay
    longer than the run is refused before the folder exists. Nothing in either folder changes."""
    out = tmp_path / "decay"
    assert train("flow", demo_cache, out, "--steps", 2, "--lr-decay-steps", 1) == 0
    capsys.readouterr()
    line = refused(capsys, "flow", demo_cache, out, "--steps", 3, "--lr-decay-steps", 1, "--resume")
    assert "--lr-decay-steps" in line and "--steps cannot change" in line, line
    line = refused(capsys, "flow", demo_cache, tmp_path / "new", "--steps", 2, "--lr-decay-steps", 3)
    assert "--lr-decay-steps 3 must be <= --steps 2" in line and not (tmp_path / "new").exists(), line


def test_non_finite_training_stops_at_the_first_bad_step(demo_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert train("flow", demo_cache, out, "--steps", 6, "--lr", "1e30") == 1
    line = error_line(capsys)
    bad = int(line.split("step ")[1].split(":")[0])
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept[-1] == f"step-{bad - 1:07d}" and f"step {bad - 1}" in line, (line, kept)
    assert all(torch.isfinite(t).all() for t in checkpoint_state(out, bad - 1).values())
    assert not (out / "done.json").exists() and not (out / "lora").exists()


@pytest.mark.parametrize(("flags", "words"), [
    (["--phase-batches=-1,1,1"], "--phase-batches"),
    (["--phase-batches", "-1,1,1"], "--phase-batches"),  # argparse reads -1,... as a flag: still named
    (["--phase-batches", "a,b,c"], "--phase-batches"),
    (["--phase-batches", "1,1"], "--phase-batches"),
    (["--lambda-adv", "x,0,0,0"], "--lambda-adv"),
    (["--guidance-min", "5", "--guidance-max", "2"], "--guidance-min"),
    (["--teacher-steps", "-4"], "--teacher-steps"),
    (["--recipe", "distill", "--chain-steps", "all", "--chain-starts", "0.5"], "--chain-steps all"),
    (["--chain-steps", "all"], "--chain-steps all"),  # the released recipe: DMD and GAN on
    (["--recipe", "distill", "--late-guidance", "0"], "--late-guidance must be a finite factor > 0, got 0.0"),
    (["--late-guidance", "nan"], "--late-guidance must be a finite factor > 0, got nan"),
])
def test_flash_settings_name_their_flag(flags, words, demo_cache, tmp_path, capsys):
    line = refused(capsys, "flash", demo_cache, tmp_path / "x", "--steps", 1, *flags)
    assert words in line, line


# Tracebacks instead of one line ---------------------------------------------------------------------

def test_corrupt_cache_files_are_named(demo_cache, tmp_path, capsys):
    cache = copy(demo_cache, tmp_path / "shard")
    shard = cache / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:2000])
    assert shard.name in refused(capsys, "flow", cache, tmp_path / "x", "--steps", 1)
    cache = copy(demo_cache, tmp_path / "index")
    (cache / "cache.json").write_text('{"spec": ')
    assert "cache.json" in refused(capsys, "flow", cache, tmp_path / "x", "--steps", 1)


def test_non_utf8_text_files_are_named(demo_cache, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_cache.parent / "data", data)
    (data / "1.txt").write_bytes(b"caf\xe9 au lait")
    args = ["prepare", "--demo", "--resolution", "32", "--data", str(data), "--out", str(tmp_path / "c")]
    assert cli.main(args) == 2
    assert "1.txt" in error_line(capsys) and not (tmp_path / "c").exists()
    (data / "1.txt").write_text("fine")
    (tmp_path / "prompts.txt").write_bytes(b"\xff\xfe")
    assert cli.main([*args, "--sample-prompts", str(tmp_path / "prompts.txt")]) == 2
    assert "prompts.txt" in error_line(capsys) and not (tmp_path / "c").exists()


@pytest.mark.parametrize(("text", "key"), [
    ("train_modules = 5", "train_modules"),
    ('lr = "fast"', "lr"),
    ("lr = [1e-3]", "lr"),
    ("phase_batches = 7", "phase_batches"),
    ('lambda_adv = [0, "x", 0, 0]', "lambda_adv"),
    ("steps = { a = 1 }", "steps"),
])
def test_config_file_wrong_types_name_the_key(text, key, demo_cache, tmp_path, capsys):
    (tmp_path / "run.toml").write_text(text + "\n")
    line = refused(capsys, "flash", demo_cache, tmp_path / "x", "--config", tmp_path / "run.toml")
    assert repr(key) in line or f"'{key}'" in line, line


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "xpu", "meta", "nope"])
def test_unusable_devices_one_line_before_any_load(device, demo_cache, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = refused(capsys, "flow", demo_cache, tmp_path / "x", "--steps", 1, "--device", device)
    assert f"--device {device}" in line, line
    assert cli.main(["prepare", "--demo", "--resolution", "32", "--data", str(demo_cache.parent / "data"),
                     "--out", str(tmp_path / "c"), "--device", device]) == 2
    assert f"--device {device}" in error_line(capsys) and not (tmp_path / "c").exists()
    from flashsd3 import cli as sample_cli

    assert sample_cli.main(["--demo", "--prompt", "x", "--device", device, "--out", str(tmp_path / "img")]) == 2
    assert f"--device {device}" in capsys.readouterr().err and not (tmp_path / "img").exists()


# Modes -------------------------------------------------------------------------------------------------

def test_outputs_honour_the_umask(demo_cache, tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        assert cli.main(["prepare", "--demo", "--resolution", "32", "--data", str(demo_cache.parent / "data"),
                         "--out", str(tmp_path / "cache")]) == 0
        assert train("flow", tmp_path / "cache", out, "--steps", 1, "--sample-every", 1, "--sample-steps", 1) == 0
    finally:
        os.umask(old)
    for root in (tmp_path / "cache", out):
        for p in [root, *root.rglob("*")]:
            want = 0o750 if p.is_dir() else 0o640
            assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))
    assert load_file(str(out / "lora" / "adapter_model.safetensors"))


def test_train_entry_sets_mkl_reproducibility_before_torch():
    code = ("import os, sys; import flashsd3.training.cli as c; assert 'torch' not in sys.modules\n"
            "try:\n    c.main(['flow', '--bogus'])\nexcept SystemExit:\n    pass\nprint(os.environ['MKL_CBWR'])")
    e = {k: v for k, v in env().items() if k != "MKL_CBWR"}
    proc = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "AUTO,STRICT", proc.stdout + proc.stderr
    assert proc.stderr.startswith(ERR)
