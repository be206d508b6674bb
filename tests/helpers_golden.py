"""Golden SHA-256 digests of what short training runs produce (flow, Flash, the toy teacher, toy Flash
distillation), so a refactoring of the training code can be checked to train the same bytes.

    MKL_CBWR=AUTO,STRICT OMP_NUM_THREADS=1 python tests/helpers_golden.py      # prints the digests as JSON

Every run is single-threaded and in-process; the digests depend on the machine's float kernels (CPU
capability, MKL), so tests/fixtures/training_golden.json records the machine they were taken on.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "training_golden.json"


def machine() -> str:
    """What the digests depend on: torch, its CPU kernels' capability, the CPU model."""
    cpu = platform.processor() or "?"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {cpu}"


def digest(*parts) -> str:
    """SHA-256 over tensors (name, dtype, shape, bytes; dicts in sorted key order), numbers and strings."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, dict):
            for k in sorted(x):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, Path):
            h.update(x.read_bytes())
        else:
            h.update(repr(x).encode())

    for p in parts:
        feed(p)
    return h.hexdigest()


def _run_digest(out: Path, step: int) -> str:
    from safetensors.torch import load_file

    ckpt = out / "checkpoints" / f"step-{step:07d}"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    samples = sorted((out / "samples").glob("*.png")) if (out / "samples").is_dir() else []
    return digest(load_file(str(ckpt / "trainable.safetensors")), state["optimizer"]["state"], losses, samples)


def cli_runs(root: Path) -> dict[str, str]:
    """`flashsd3-train prepare --demo`, then short flow and flash runs on it (the tests' settings)."""
    import numpy as np
    from PIL import Image

    from flashsd3.training import cli

    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(["a red circle", "a blue square", "a green star", ""][i % 4])
    cache = root / "cache"
    assert cli.main(["prepare", "--demo", "--data", str(data), "--resolution", "32", "--out", str(cache)]) == 0
    from safetensors.torch import load_file

    out = {"prepare": digest([load_file(str(f)) for f in sorted(cache.glob("*.safetensors"))])}
    common = ["--cache", str(cache), "--batch-size", "4", "--lr", "1e-3", "--checkpoint-every", "100",
              "--keep-checkpoints", "0"]
    runs = {
        "flow": ["flow", "--steps", "3", "--lora-rank", "4", "--sample-every", "3", "--sample-steps", "2"],
        "flow_full_weights": ["flow", "--steps", "2", "--train-modules", "joint_blocks.1.*", "--sample-every", "0",
                              "--seed", "3", "--weighting", "uniform", "--activation-checkpointing"],
        "flash": ["flash", "--steps", "4", "--teacher-steps", "4", "--phase-batches", "1,1,1", "--guidance-min",
                  "2", "--guidance-max", "3", "--lora-rank", "4", "--lora-alpha", "4", "--sample-every", "4",
                  "--sample-steps", "2"],
        "flash_options": ["flash", "--steps", "2", "--teacher-steps", "4", "--phase-batches", "0,0,1",
                          "--guidance-min", "2", "--guidance-max", "3", "--lora-rank", "4", "--lora-alpha", "4",
                          "--sample-every", "0", "--d-pass", "reuse", "--mixture-modes", "sampler", "--seed", "5",
                          "--negative", "empty", "--lambda-adv", "0,0.2,0.4,0.6", "--activation-checkpointing"],
    }
    for name, args in runs.items():
        run = root / name
        assert cli.main([*args, *common, "--out", str(run)]) == 0, name
        steps = int(args[args.index("--steps") + 1])
        out[name] = _run_digest(run, steps)
    return out


def toy_runs(root: Path) -> dict[str, str]:
    """A few toy teacher steps, classifier steps, and toy Flash distillation steps (recipe, bank, options)."""
    from dataclasses import replace

    from flashsd3.lora import lora_state_dict
    from flashsd3.toy.data import balanced_labels
    from flashsd3.toy.distill import TOY_FLASH, ToyFlashRun, distil, make_bank
    from flashsd3.toy.evaluate import train_classifier
    from flashsd3.toy.model import build_teacher, save_teacher
    from flashsd3.toy.train import TeacherRecipe, train_teacher

    out = {}
    result = train_teacher(TeacherRecipe(steps=3, batch=8, warmup=2, ema_decay=0.9), seed=0, log=lambda s: None)
    out["toy_teacher"] = digest(result.model.state_dict(), result.text.state_dict(), result.losses)
    out["toy_classifier"] = digest(train_classifier(seed=0, steps=2, batch=16).state_dict())

    model, text = build_teacher(seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # DiT init predicts 0: perturb every weight so the teacher does something
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_teacher(model, text, root / "teacher.safetensors")
    labels = balanced_labels(4)
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    probe = {"probe_labels": labels, "probe_noise": noise, "probe_ref": noise.clone()}
    flash = replace(TOY_FLASH, teacher_steps=4, phase_batches=(1, 1, 1), disc_width=8)
    base = ToyFlashRun(steps=4, batch=4, rank=4, alpha=4.0, probe=4, probe_every=2, flash=flash)
    bank = make_bank(model.eval(), text.eval(), flash, 8, torch.Generator().manual_seed(base.seed + 77))
    out["toy_bank"] = digest(bank.labels, bank.guidance, bank.states, bank.final)
    variants = {"toy_flash": (base, None),
                "toy_flash_fresh": (replace(base, flash=replace(flash, d_pass="fresh"), seed=2), None),
                "toy_flash_options": (replace(base, flash=replace(flash, disc_input="blocks", disc_blocks=(0, 1),
                                                                  mixture_modes="sampler")), None),
                "toy_flash_bank": (base, bank)}
    for name, (recipe, b) in variants.items():
        student, _, history = distil(root / "teacher.safetensors", recipe, bank=b, log=lambda s: None, **probe)
        out[name] = digest(lora_state_dict(student), [{k: v for k, v in h.items()} for h in history])
    return out


def pipeline_demo() -> dict[str, str]:
    """The demo pipeline's weights from seed 0 (its `seed=` must keep its bytes)."""
    from flashsd3.pipeline import FlashSD3Pipeline

    pipe = FlashSD3Pipeline.demo(seed=0)
    text = pipe.text_encoders
    return {"pipeline_demo": digest(pipe.transformer.state_dict(), pipe.vae.state_dict(),
                                    text.clip_l.state_dict(), text.clip_g.state_dict())}


def compute() -> dict[str, str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            root = Path(tmp)
            (root / "cli").mkdir()
            (root / "toy").mkdir()
            return {**cli_runs(root / "cli"), **toy_runs(root / "toy"), **pipeline_demo()}
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    if os.environ.get("MKL_CBWR") != "AUTO,STRICT":
        sys.exit("run with MKL_CBWR=AUTO,STRICT (as flashsd3-sample and the tests set it)")
    sys.path.insert(0, str(ROOT))
    digests = compute()
    print(json.dumps({"machine": machine(), "digests": digests}, indent=2))
