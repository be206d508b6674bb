"""flashsd3-sample end to end on the offline demo model: files, metadata, seeds, overwrite, errors, torchrun.

Runs go through subprocesses (scripts/sample.py, `python -m flashsd3.cli`, torchrun) with HF_HUB_OFFLINE=1.
The bad-input table and the overwrite refusal call `cli.main(argv)` in-process (each fresh interpreter
costs seconds of imports; main returns the exit code, so an escaping exception would fail the test), and
the missing-weights case runs as a subprocess to see the real entry point print one line, no traceback.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flashsd3 import cli

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox in the snow", "Café Ünïcode: a city at night!", "a bowl of ramen"]
PER_PROMPT, SEED, PX = 2, 7, 64  # 64x64 keeps every run well under a second of model time
SIZE = ["--height", str(PX), "--width", str(PX)]
ERR = "flashsd3-sample: error:"


def run_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def run(cmd: list, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=run_env(**env), capture_output=True, text=True, timeout=300)


def cli_run(*args, cwd: Path, **env) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "flashsd3.cli", *map(str, args)], cwd, **env)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def expected_names(base_seed: int) -> list[str]:
    jobs = [(k, p) for k, p in enumerate(p for p in PROMPTS for _ in range(PER_PROMPT))]
    return [f"{k:05d}-{base_seed + k}-{cli.slugify(p)}.png" for k, p in jobs]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run through scripts/sample.py: 3 prompts (from a file with a blank line) x 2 images."""
    tmp = tmp_path_factory.mktemp("demo")
    (tmp / "prompts.txt").write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n   \n{PROMPTS[2]}\n", encoding="utf-8")
    proc = run([sys.executable, str(ROOT / "scripts" / "sample.py"), "--demo", "--prompts-file", "prompts.txt",
                "--num-images", str(PER_PROMPT), "--seed", str(SEED), "--batch-size", "4", "--json", "--out", "out",
                *SIZE], tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp, proc


@pytest.fixture(scope="module")
def demo_pipe():
    from flashsd3.pipeline import FlashSD3Pipeline

    return FlashSD3Pipeline.demo(seed=0)  # the CLI's demo weights


def test_slug_lora_and_sharding_helpers():
    assert cli.slugify("Café Ünïcode: a city at night!") == "cafe-unicode-a-city-at-night"
    assert cli.slugify("x" * 50) == "x" * 40 and cli.slugify("!!!") == "untitled"
    assert cli.slugify("A raccoon trapped inside a glass jar full of colorful candies") == \
        "a-raccoon-trapped-inside-a-glass-jar"  # 40 characters would cut "full" to "ful"
    assert cli.parse_lora("C:\\loras\\style.safetensors") == ("C:\\loras\\style.safetensors", 1.0)
    assert cli.parse_lora("C:\\loras\\style.safetensors:0.5") == ("C:\\loras\\style.safetensors", 0.5)
    assert cli.parse_lora("jasperai/flash-sd3:0.8") == ("jasperai/flash-sd3", 0.8)
    assert cli.parse_lora("jasperai/flash-sd3") == ("jasperai/flash-sd3", 1.0)
    assert cli.parse_lora("./a:b:-2") == ("./a:b", -2.0)
    with pytest.raises(cli.UsageError):
        cli.parse_lora("x.safetensors:inf")
    jobs = cli.plan_jobs(["a", "b", "c"], 3, seed=100)
    assert [(j.index, j.seed) for j in jobs] == [(k, 100 + k) for k in range(9)]
    for world in (1, 2, 4):  # job j -> rank j % world: every job exactly once
        shards = [jobs[r::world] for r in range(world)]
        assert sorted(j.index for s in shards for j in s) == list(range(9))


def test_demo_writes_pngs_with_metadata(demo_run):
    tmp, proc = demo_run
    out = tmp / "out"
    names = expected_names(SEED)
    assert sorted(p.name for p in out.iterdir()) == sorted(names + [n[:-4] + ".json" for n in names])  # no tmp files
    for k, name in enumerate(names):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size == (PX, PX) and im.mode == "RGB"
            text = dict(im.text)
        assert text["prompt"] == PROMPTS[k // PER_PROMPT] and text["seed"] == str(SEED + k)
        assert (text["index"], text["steps"], text["guidance"], text["sampler"]) == (str(k), "4", "0.0", "flash")
        assert (text["width"], text["height"], text["dtype"]) == (str(PX), str(PX), "fp32")
        assert (text["lora"], text["t5"]) == ("[]", "false")  # the demo applies no LoRA unless given
        assert text["model"].startswith("demo") and text["negative_prompt"] == ""
        sidecar = json.loads((out / name).with_suffix(".json").read_text(encoding="utf-8"))
        assert {k: v if isinstance(v, str) else json.dumps(v) for k, v in sidecar.items()} == text
    assert f"seed {SEED}" in proc.stdout and "wrote 6 images" in proc.stdout and "images/s" in proc.stdout
    assert "noise-like" in proc.stderr and "Traceback" not in proc.stderr


def test_overwrite_refused_then_same_seed_same_pixels(demo_run, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tmp, _ = demo_run
    out, names = tmp / "out", expected_names(SEED)
    before = {n: (pixels(out / n), (out / n).stat().st_mtime_ns) for n in names}
    args = ["--demo", "--prompts-file", tmp / "prompts.txt", "--num-images", PER_PROMPT, "--seed", SEED,
            "--batch-size", 4, "--json", "--out", out, *SIZE]
    assert cli.main([str(a) for a in args]) == 2  # in-process: the check runs before any model work
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith(ERR)] == err.splitlines()
    assert "12 output file(s) already exist" in err and "--overwrite" in err  # 6 PNGs + 6 sidecars
    assert all((out / n).stat().st_mtime_ns == before[n][1] for n in names)
    again = cli_run(*args, "--overwrite", cwd=tmp)
    assert again.returncode == 0, again.stderr
    for n in names:  # the same command in a fresh process: the same pixels
        # Usually bitwise equal; in a few of ~30 process pairs observed here (never within one process),
        # 1-2 of 12,288 values differed by one level: some CPU kernel's rounding varies between
        # processes (root cause not found). So: at most one level, on at most 0.1% of the values.
        diff = np.abs(pixels(out / n) - before[n][0])
        assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (n, diff.max(), (diff > 0).sum())


def test_image_k_alone_matches_the_run(demo_run, tmp_path):
    k = 3  # the second image of the second prompt: seed 7 + 3
    alone = cli_run("--demo", "--prompt", PROMPTS[k // PER_PROMPT], "--seed", SEED + k, *SIZE, "--out", tmp_path,
                    cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    name = expected_names(SEED)[k]
    assert [p.name for p in tmp_path.glob("*.png")] == [f"00000-{SEED + k}-{name.split('-', 2)[2]}"]
    # Same noise, same weights, but a batch of 1 instead of 4: matmul blocking (BLAS) differs with the batch,
    # so floats differ in the last bits and a pixel may round to the neighbouring uint8 level.
    diff = np.abs(pixels(next(tmp_path.glob("*.png"))) - pixels(demo_run[0] / "out" / name))
    assert diff.max() <= 1, diff.max()


def test_cli_images_equal_pipeline_seed_images(demo_run, demo_pipe):
    """The CLI's per-image noise reproduces pipe(prompts, seed=...) (image k from seed + k)."""
    ref = demo_pipe(PROMPTS, height=PX, width=PX, seed=SEED, num_images_per_prompt=PER_PROMPT).images
    for name, image in zip(expected_names(SEED), ref):  # batch of 6 vs the CLI's 4 + 2: see the test above
        diff = np.abs(np.asarray(image, dtype=np.int16) - pixels(demo_run[0] / "out" / name))
        assert diff.max() <= 1, (name, diff.max())


def test_torchrun_two_ranks_shard_without_duplicates(demo_pipe, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    # --standalone: the rendezvous binds a free port itself, so parallel runs cannot collide on a port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flashsd3.cli", "--demo", "--prompts-file", "prompts.txt", "--num-images", str(PER_PROMPT),
           "--batch-size", "2", "--device", "cpu", "--out", "out", *SIZE]
    for _ in range(2):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        proc = run(cmd, tmp_path, OMP_NUM_THREADS="1")
        # Known flake, ~1 run in 10-20 here: a worker aborts in C++ teardown after its work and the
        # process group's destruction are done (root cause not found); one retry, any other failure counts.
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seed_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("seed ")]
    summary = [ln for ln in proc.stdout.splitlines() if ln.startswith("wrote")]
    assert len(seed_lines) == 1 and len(summary) == 1 and summary[0].startswith("wrote 6 images"), proc.stdout
    base = int(seed_lines[0].split()[1].rstrip(":"))  # random, drawn on rank 0 and shared with rank 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == expected_names(base)  # 6 files, no gaps/dups
    ref = demo_pipe(PROMPTS, height=PX, width=PX, seed=base, num_images_per_prompt=PER_PROMPT).images
    for name, image in zip(expected_names(base), ref):  # batches of 2 per rank vs 6: see test_image_k_alone
        assert np.abs(np.asarray(image, dtype=np.int16) - pixels(tmp_path / "out" / name)).max() <= 1, name


def test_weights_unavailable_one_message(tmp_path):
    proc = cli_run("--prompt", "a cat", "--out", tmp_path / "out", cwd=tmp_path, HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERR), proc.stderr
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in lines[0] and "gated" in lines[0]
    assert "license" in lines[0] and "--model /path/to/" in lines[0]
    assert not list(tmp_path.rglob("*.png"))


def _foreign_lora(path: Path) -> str:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({f"lora_unet_down_blocks_0_attentions_0_proj_in.lora_{s}.weight": torch.randn(4, 4, generator=g)
               for s in ("down", "up")}, str(path))
    return str(path)


BAD_INPUTS = {  # argv (after --out) -> a fragment the one error line must contain
    "no prompt": (["--steps", "4"], "no prompt"),
    "empty prompts file": (["--demo", "--prompts-file", "{tmp}/empty.txt"], "has no prompts"),
    "missing prompts file": (["--demo", "--prompts-file", "{tmp}/nope.txt"], "cannot read --prompts-file"),
    "height not /16": (["--demo", "--height", "100"], "multiple of 16"),
    "width beyond table": (["--demo", "--width", "2048"], "exceeds the position table"),
    "unknown dtype": (["--demo", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    "zero steps": (["--demo", "--steps", "0"], "--steps: must be a finite number >= 1"),
    "lora for another model": (["--demo", "--lora", "{tmp}/sdxl_lora.safetensors:0.7"], "not SD3"),
    "missing lora": (["--demo", "--lora", "{tmp}/nope.safetensors"], "no such file"),
    "none plus lora": (["--prompt", "x", "--lora", "none", "--lora", "a/b"], "cannot be combined"),
    "missing model path": (["--prompt", "x", "--model", "{tmp}/no/such/model"], "--model"),
    "unwritable out": (["--demo", "--out", "{tmp}/a_file/sub"], "cannot write to --out"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exit_2_one_line(case, tmp_path, capsys, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "a_file").write_text("in the way")
    _foreign_lora(tmp_path / "sdxl_lora.safetensors")
    argv, fragment = BAD_INPUTS[case]
    argv = [a.format(tmp=tmp_path) for a in argv]
    argv = ["--out", str(tmp_path / "out"), *argv, *([] if {"--height", "--width"} & set(argv) else SIZE)]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own exit, as the console script would see it
        code = e.code
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith(ERR)]
    assert code == 2 and len(errors) == 1 and fragment in errors[0], err
    assert not list(tmp_path.rglob("*.png"))
