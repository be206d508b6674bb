"""flashsd3-sample end to end on the offline demo model: files, metadata, seeds, overwrite, errors, torchrun.

Runs go through subprocesses (scripts/sample.py, `python -m flashsd3.cli`, torchrun) with HF_HUB_OFFLINE=1.
The bad-input table and the overwrite refusal call `cli.main(argv)` in-process (each fresh interpreter
costs seconds of imports; main returns the exit code, so an escaping exception would fail the test), and
the missing-weights case runs as a subprocess to see the real entry point print one line, no traceback.
Pixels of the same command in two processes are compared for equality: the CLI turns on MKL's
conditional numerical reproducibility (`cli.reproducible_mkl`). Runs whose pixels are compared exactly
(with each other or with `FlashSD3Pipeline.demo`, float32) pin `--dtype fp32` (DTYPE); what `--dtype auto`
picks is tested in tests/test_precision.py.
"""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flashsd3 import cli
from flashsd3.config import TINY
from flashsd3.outputs import new_file_mode, slugify
from helpers_files import bomb_png

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox in the snow", "Café Ünïcode: a city at night!", "a bowl of ramen"]
PER_PROMPT, SEED, PX = 2, 7, 64  # 64x64 keeps every run well under a second of model time
SIZE = ["--height", str(PX), "--width", str(PX)]
DTYPE = ["--dtype", "fp32"]  # exact pixel comparisons: float32, as FlashSD3Pipeline.demo() (auto may pick bf16)
ERR = "flashsd3-sample: error:"


def run_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def run(cmd: list, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=run_env(**env), capture_output=True, text=True, timeout=300, check=False)


def cli_run(*args, cwd: Path, **env) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "flashsd3.cli", *map(str, args)], cwd, **env)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def expected_names(base_seed: int) -> list[str]:
    jobs = [(k, p) for k, p in enumerate(p for p in PROMPTS for _ in range(PER_PROMPT))]
    return [f"{k:05d}-{base_seed + k}-{slugify(p)}.png" for k, p in jobs]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run through scripts/sample.py: 3 prompts (from a file with a blank line) x 2 images."""
    tmp = tmp_path_factory.mktemp("demo")
    (tmp / "prompts.txt").write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n   \n{PROMPTS[2]}\n", encoding="utf-8")
    proc = run([sys.executable, str(ROOT / "scripts" / "sample.py"), "--demo", "--prompts-file", "prompts.txt",
                "--num-images", str(PER_PROMPT), "--seed", str(SEED), "--batch-size", "4", "--json", "--out", "out",
                *SIZE, *DTYPE], tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp, proc


@pytest.fixture(scope="module")
def demo_pipe():
    from flashsd3.pipeline import FlashSD3Pipeline

    return FlashSD3Pipeline.demo(seed=0)  # the CLI's demo weights


def test_lora_values():
    assert cli.parse_lora("C:\\loras\\style.safetensors") == ("C:\\loras\\style.safetensors", 1.0)
    assert cli.parse_lora("C:\\loras\\style.safetensors:0.5") == ("C:\\loras\\style.safetensors", 0.5)
    assert cli.parse_lora("jasperai/flash-sd3:0.8") == ("jasperai/flash-sd3", 0.8)
    assert cli.parse_lora("jasperai/flash-sd3") == ("jasperai/flash-sd3", 1.0)
    assert cli.parse_lora("./a:b:-2") == ("./a:b", -2.0)
    with pytest.raises(cli.UsageError, match="finite"):
        cli.parse_lora("x.safetensors:inf")
    with pytest.raises(cli.UsageError, match="the scale 'big' is not a number"):
        cli.parse_lora("jasperai/flash-sd3:big")


def test_messages_for_the_command_line():
    assert cli.one_line("f: cannot load\n  missing keys (2): a, b\n") == "f: cannot load missing keys (2): a, b"
    assert cli.one_line("x: width 96; pass config= (or use a folder with config.json)") == \
        "x: width 96; use a folder with config.json"  # no keyword advice for CLI users
    assert cli.one_line("no SD3 norm; pass config= otherwise") == "no SD3 norm"
    listing = "found " + ", ".join(f"file-{k:04d}.txt" for k in range(1000))
    short = cli.one_line(listing, limit=100)
    cut = short.split(", ...")[0]  # cut after a whole list item
    assert listing.startswith(cut + ", ") and len(cut) <= 100, short
    assert short == f"{cut}, ... ({len(listing) - len(cut)} more characters)"


def test_mkl_reproducibility_is_set_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    cli.reproducible_mkl()
    assert os.environ["MKL_CBWR"] == "AUTO,STRICT"
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    cli.reproducible_mkl()
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"


def test_importing_the_cli_does_not_import_torch():
    """MKL reads MKL_CBWR when torch loads it: main() must run before anything imports torch."""
    proc = run([sys.executable, "-c", "import sys, flashsd3.cli; print('torch' in sys.modules)"], ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stdout + proc.stderr


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
            "--batch-size", 4, "--json", "--out", out, *SIZE, *DTYPE]
    assert cli.main([str(a) for a in args]) == 2  # in-process: the check runs before any model work
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith(ERR)] == err.splitlines()
    assert "12 output file(s) already exist" in err and "--overwrite" in err  # 6 PNGs + 6 sidecars
    assert all((out / n).stat().st_mtime_ns == before[n][1] for n in names)
    assert all(stat.S_IMODE((out / n).stat().st_mode) == new_file_mode() for n in names)  # as `open` would
    (out / names[0]).chmod(0o600)
    again = cli_run(*args, "--overwrite", cwd=tmp)
    assert again.returncode == 0, again.stderr
    assert stat.S_IMODE((out / names[0]).stat().st_mode) == 0o600  # a replaced file keeps its mode
    for n in names:  # the same command in a fresh process: the same pixels, bit for bit
        assert np.array_equal(pixels(out / n), before[n][0]), n


def test_image_k_alone_matches_the_run(demo_run, tmp_path):
    k = 3  # the second image of the second prompt: seed 7 + 3
    alone = cli_run("--demo", "--prompt", PROMPTS[k // PER_PROMPT], "--seed", SEED + k, *SIZE, *DTYPE, "--out",
                    tmp_path, cwd=tmp_path)
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
    for name, image in zip(expected_names(SEED), ref, strict=True):  # batch of 6 vs the CLI's 4 + 2: see the test above
        diff = np.abs(np.asarray(image, dtype=np.int16) - pixels(demo_run[0] / "out" / name))
        assert diff.max() <= 1, (name, diff.max())


def test_torchrun_two_ranks_match_one_process(tmp_path):
    """Two ranks share a random seed and the batches; the files equal a one-process run's, bit for bit."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    args = ["--demo", "--prompts-file", "prompts.txt", "--num-images", str(PER_PROMPT), "--batch-size", "2",
            "--device", "cpu", *SIZE, *DTYPE]
    # --standalone: the rendezvous binds a free port itself, so parallel runs cannot collide on a port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flashsd3.cli", *args, "--out", "out"]
    # No retry: the exit abort this test used to retry on is fixed (tests/test_distributed.py, close).
    proc = run(cmd, tmp_path, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seed_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("seed ")]
    summary = [ln for ln in proc.stdout.splitlines() if ln.startswith("wrote")]
    assert len(seed_lines) == 1 and len(summary) == 1 and summary[0].startswith("wrote 6 images"), proc.stdout
    base = int(seed_lines[0].split()[1].rstrip(":"))  # random, drawn on rank 0 and shared with rank 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == expected_names(base)  # 6 files, no gaps/dups
    alone = cli_run(*args, "--seed", base, "--out", "alone", cwd=tmp_path, OMP_NUM_THREADS="1")  # torchrun's
    assert alone.returncode == 0, alone.stderr  # default thread count, so only the number of processes differs
    for name in expected_names(base):
        assert np.array_equal(pixels(tmp_path / "out" / name), pixels(tmp_path / "alone" / name)), name


def _demo_lora(path: Path) -> None:
    """A kohya-layout rank-2 adapter of the demo model's first image-stream qkv layer."""
    import torch
    from safetensors.torch import save_file

    g, module = torch.Generator().manual_seed(1), "lora_unet_joint_blocks_0_x_block_attn_qkv"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{module}.lora_down.weight": torch.randn(2, 16, generator=g),
               f"{module}.lora_up.weight": torch.randn(48, 2, generator=g)}, str(path))


def test_warnings_modes_home_and_lora_names(tmp_path):
    """A long prompt warns once, on one line of our own; files follow the umask; `~` expands in every
    path flag; two adapters with one file name load side by side (no "pass name=" for CLI users)."""
    _demo_lora(tmp_path / "a" / "style.safetensors")
    _demo_lora(tmp_path / "b" / "style.safetensors")
    (tmp_path / "prompts.txt").write_text("a tiny cat " * 40 + "\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "flashsd3.cli", "--demo", "--prompts-file", "~/prompts.txt", "--seed", "1",
           "--lora", "~/a/style.safetensors", "--lora", "~/b/style.safetensors:0.5", "--height", "16",
           "--width", "16", "--json", "--out", "~/out"]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(HOME=str(tmp_path)), capture_output=True, text=True,
                          timeout=300, check=False, preexec_fn=lambda: os.umask(0o027))
    assert proc.returncode == 0, proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if "CLIP tokens" in ln]
    line = f"{cli.PROG}: warning: a prompt of 122 CLIP tokens: only the first 77 of each are used, the rest is cut off"
    assert warned == [line], proc.stderr  # 40 x 3 words + start and end tokens
    assert "Warning:" not in proc.stderr and "Token indices" not in proc.stderr, proc.stderr
    files = sorted((tmp_path / "out").iterdir())
    assert [stat.S_IMODE(f.stat().st_mode) for f in files] == [0o640, 0o640], files
    meta = json.loads(files[0].read_text(encoding="utf-8"))
    assert meta["lora"] == [{"source": str(tmp_path / "a" / "style.safetensors"), "scale": 1.0},
                            {"source": str(tmp_path / "b" / "style.safetensors"), "scale": 0.5}]


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


def _tiny_model_folder(root: Path) -> None:
    """A diffusers folder whose transformer/config.json is TINY (a 16-token position table: 256 px at most)."""
    import torch
    from safetensors.torch import save_file

    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(TINY.to_diffusers()))
    save_file({"pos_embed.pos_embed": torch.zeros(1, 256, 16)}, str(root / "transformer" / WEIGHTS))


WEIGHTS = "diffusion_pytorch_model.safetensors"
BAD_INPUTS = {  # argv (after --out) -> a fragment the one error line must contain ({tmp}: tmp_path = $HOME)
    "no prompt": (["--steps", "4"], "no prompt"),
    "empty prompts file": (["--demo", "--prompts-file", "{tmp}/empty.txt"], "has no prompts"),
    "missing prompts file": (["--demo", "--prompts-file", "{tmp}/nope.txt"], "cannot read --prompts-file"),
    "prompts file under ~": (["--demo", "--prompts-file", "~/nope.txt"], "--prompts-file {tmp}/nope.txt"),
    "prompts file not UTF-8": (["--demo", "--prompts-file", "{tmp}/latin1.txt"],
                               "--prompts-file {tmp}/latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)"),
    "height not /16": (["--demo", "--height", "100"], "multiple of 16"),
    "width beyond table": (["--demo", "--width", "2048"], "--width 2048 exceeds the position table"),
    "size beyond a local model's table": (["--prompt", "x", "--model", "{tmp}/tiny", "--lora", "none",
                                           "--height", "512"],
                                          "--height 512 exceeds the position table: at most 256 pixels"),
    "local model that fails to load": (["--prompt", "x", "--model", "{tmp}/tiny", "--lora", "none"],
                                       "cannot load the weights: {tmp}/tiny/transformer/"),  # after the checks
    "unknown dtype": (["--demo", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    "zero steps": (["--demo", "--steps", "0"], "--steps must be an int from 1 to 10000, got 0"),
    "steps that cannot be allocated": (["--demo", "--steps", str(10**12)], "--steps must be an int from 1 to 10000"),
    "negative seed": (["--demo", "--seed", "-1"], "--seed must be an int in [0, 2**64 - 1] for 1 image(s)"),
    "seed past 2**64": (["--demo", "--seed", str(2**64)], "a torch generator takes 0 .. 2**64 - 1), got 1844674"),
    "seed + k past 2**64": (["--demo", "--num-images", "3", "--seed", str(2**64 - 2)],
                            "image 2 would need 18446744073709551616"),
    "lora for another model": (["--demo", "--lora", "{tmp}/sdxl_lora.safetensors:0.7"], "not SD3"),
    "lora scale not a number": (["--demo", "--lora", "{tmp}/sdxl_lora.safetensors:notanumber"],
                                "the scale 'notanumber' is not a number"),
    "missing lora": (["--demo", "--lora", "{tmp}/nope.safetensors"], "no such file"),
    "missing lora under ~": (["--demo", "--lora", "~/nope.safetensors:0.5"], "--lora {tmp}/nope.safetensors:"),
    "none plus lora": (["--prompt", "x", "--lora", "none", "--lora", "a/b"], "cannot be combined"),
    "missing model path": (["--prompt", "x", "--model", "{tmp}/no/such/model"], "--model"),
    "crowded model folder": (["--prompt", "x", "--model", "{tmp}/crowded", "--lora", "none"],
                             "... and 292 more"),  # a listing of 300 long names, capped by the library
    "unwritable out": (["--demo", "--out", "{tmp}/a_file/sub"], "cannot write to --out"),
    "unwritable out under ~": (["--demo", "--out", "~/a_file/sub"], "cannot write to --out {tmp}/a_file/sub"),
    "huge count, existing file": (["--demo", "--prompt", "x", "--seed", "0", "--num-images", str(10**15),
                                   "--out", "{tmp}/full"], "1 output file(s) already exist in {tmp}/full"),
    # image to edit (img.png and mask.png: 80x64; see _edit_files)
    "strength 0": (["--demo", "--image", "{tmp}/img.png", "--strength", "0"], "--strength must be a number in (0, 1]"),
    "strength above 1": (["--demo", "--image", "{tmp}/img.png", "--strength", "1.5"], "from pure noise), got 1.5"),
    "strength not finite": (["--demo", "--image", "{tmp}/img.png", "--strength", "nan"], "--strength must be a"),
    "strength that leaves no step": (["--demo", "--image", "{tmp}/img.png", "--strength", "1e-20"],
                                     "--strength 1e-20 leaves no step of the 4-step schedule: an edit starts"),
    "strength without image": (["--demo", "--strength", "0.5"], "--strength needs --image"),
    "mask without image": (["--demo", "--mask", "{tmp}/mask.png"], "--mask needs --image"),
    "missing image": (["--demo", "--image", "{tmp}/nope.png"], "--image: image '{tmp}/nope.png' does not exist"),
    "unreadable image": (["--demo", "--image", "{tmp}/empty.txt"], "--image: cannot read image '{tmp}/empty.txt'"),
    "image is a folder": (["--demo", "--image", "{tmp}/crowded"], "--image: image '{tmp}/crowded' is not a file"),
    "image decompression bomb": (["--demo", "--image", "{tmp}/bomb.png"],
                                 "--image: image '{tmp}/bomb.png': refused before decoding"),
    "mask decompression bomb": (["--demo", "--image", "{tmp}/img.png", "--mask", "{tmp}/bomb.png"],
                                "--mask: mask '{tmp}/bomb.png': refused before decoding"),
    "mask of another size": (["--demo", "--image", "{tmp}/img.png", "--mask", "{tmp}/small_mask.png"],
                             "mask is 32x32 but the image is 80x64 (width x height)"),
    "mask with colour": (["--demo", "--image", "{tmp}/img.png", "--mask", "{tmp}/img.png"],
                         "--mask: mask '{tmp}/img.png' is not a single-channel image"),
    "mask with transparency": (["--demo", "--image", "{tmp}/img.png", "--mask", "{tmp}/alpha_mask.png"],
                               "has transparency"),
    "image not a multiple of 16": (["--demo", "--image", "{tmp}/odd.png"],
                                   "80x60 (width x height), not a multiple of 16 for this model: pass --width and "
                                   "--height to resize it (nearest: width 80 or 96, height 48 or 64)"),
    "image with --height only": (["--demo", "--image", "{tmp}/img.png", "--height", "64"],
                                 "give both --height and --width to resize it, or neither"),
    "image beyond the position table": (["--demo", "--image", "{tmp}/big.png"],
                                        "--image {tmp}/big.png is 16x2048, the output size without --height/--width: "
                                        "--height 2048 exceeds the position table"),
    # recipe and skip-layer guidance (the demo model has 2 joint blocks, SD3-medium 24)
    "unknown recipe": (["--demo", "--recipe", "sd4"], "argument --recipe: invalid choice: 'sd4'"),
    "unknown sampler": (["--demo", "--sampler", "ddim"], "argument --sampler: invalid choice: 'ddim'"),
    "skip layers beyond the depth": (["--demo", "--guidance", "5", "--slg-layers", "1,2"],
                                     "--slg-layers [2] beyond the model's 2 joint blocks (0..1)"),
    "recipe's skip layers beyond the depth": (["--demo", "--recipe", "sd3.5-medium-slg"],
                                              "[7, 8, 9] beyond the model's 2 joint blocks (0..1); give --slg-layers"),
    "skip layers beyond SD3-medium's depth": (["--prompt", "x", "--lora", "none", "--slg-layers", "7,24"],
                                              "--slg-layers [24] beyond the model's 24 joint blocks"),  # no download
    "skip layers without CFG": (["--demo", "--slg-layers", "1"],
                                "--slg-layers needs classifier-free guidance, which is off: guidance 0 <= 1"),
    "SLG recipe with guidance 1": (["--demo", "--recipe", "sd3.5-medium-slg", "--guidance", "1"],
                                   "skip-layer guidance (recipe sd3.5-medium-slg) needs classifier-free guidance"),
    "SLG scale without layers": (["--demo", "--slg-scale", "3"],
                                 "--slg-scale adjusts skip-layer guidance, which is off (recipe flash-sd3 has none)"),
    "SLG tuning with layers none": (["--demo", "--recipe", "sd3.5-medium-slg", "--slg-layers", "none",
                                     "--slg-start", "0.1"], "--slg-start adjusts skip-layer guidance, which is off"),
    "SLG start after stop": (["--demo", "--guidance", "5", "--slg-layers", "1", "--slg-start", "0.5", "--slg-stop",
                              "0.2"], "needs 0 <= --slg-start < --slg-stop <= 1, got start 0.5, stop 0.2"),
    "SLG layers not numbers": (["--demo", "--slg-layers", "7-9"], "expected block indices like 7,8,9 or 'none'"),
    "SLG window without a step": (["--demo", "--guidance", "5", "--slg-layers", "1"],
                                  "skip-layer guidance on --slg-start 0.01 .. --slg-stop 0.2 guides no step of 4 "
                                  "(step i is guided when 4 x 0.01 < i < 4 x 0.2): give --steps >= 6, a wider "
                                  "window, or --slg-layers none to turn it off"),
    "SLG window without a step of an edit": (["--demo", "--image", "{tmp}/img.png", "--strength", "0.5", "--guidance",
                                              "5", "--steps", "8", "--slg-layers", "1"],
                                             "guides no step of 4 (the steps --strength 0.5 runs of 8) (step i is "
                                             "guided when 4 x 0.01 < i < 4 x 0.2): give --steps >= 11,"),
}


def _edit_files(tmp: Path) -> None:
    """img.png 80x64 RGB, mask.png of its size, and inputs that must be refused."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp / "img.png")
    mask = np.zeros((64, 80), np.uint8)
    mask[16:48, 24:64] = 255
    Image.fromarray(mask).save(tmp / "mask.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp / "small_mask.png")
    Image.fromarray(np.full((64, 80, 4), 128, np.uint8)).save(tmp / "alpha_mask.png")
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp / "odd.png")
    Image.fromarray(np.zeros((2048, 16, 3), np.uint8)).save(tmp / "big.png")
    bomb_png(tmp / "bomb.png")  # a header that claims 10^10 pixels
    (tmp / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exit_2_one_line(case, tmp_path, capsys, monkeypatch):
    """Each bad input: exit 2 with one line naming the cause, before any model load (the local models here
    are headers only; SD3-medium's hub repo is known by its config) and without writing any file or folder
    (the local model that fails to load does so after its checks, once --out is created)."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "a_file").write_text("in the way")
    _foreign_lora(tmp_path / "sdxl_lora.safetensors")
    _tiny_model_folder(tmp_path / "tiny")
    (tmp_path / "crowded").mkdir()
    for k in range(300):
        (tmp_path / "crowded" / f"not-a-weights-file-with-a-long-name-{k:04d}.txt").write_text("")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "00000-0-x.json").write_text("{}")
    (tmp_path / "full" / "00000-0-x.png").write_bytes(b"")
    _edit_files(tmp_path)
    argv, fragment = BAD_INPUTS[case]
    argv = [a.format(tmp=tmp_path) for a in argv]
    argv = ["--out", str(tmp_path / "out"), *argv, *([] if {"--height", "--width", "--image"} & set(argv) else SIZE)]
    before = set(tmp_path.rglob("*"))
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own exit, as the console script would see it
        code = e.code
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith(ERR)]
    assert code == 2 and len(errors) == 1 and fragment.format(tmp=tmp_path) in errors[0], err
    assert len(errors[0]) < 1000 and "gated" not in errors[0], errors[0]  # local inputs: no hub hints
    assert case == "local model that fails to load" or not (tmp_path / "out").exists()
    written = set(tmp_path.rglob("*")) - before
    assert written == (set() if case != "local model that fails to load" else {tmp_path / "out"}), written
