"""`flashsd3-train flow` runs end to end on the demo model: torchrun (2 ranks, gloo) against 1 process, Ctrl-C
and kill -9 then --resume against an uninterrupted run, the output-folder rules, the saved adapter.

Runs that need a process of their own (signals, kill -9, torchrun) are subprocesses with OMP_NUM_THREADS=1, so a
run's float operations do not depend on the machine's load; the others call `cli.main` in this process (one
thread, the same float operations).
"""
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flashsd3.training import cli
from helpers_training import checkpoint_state, env, metrics, run, run_here, train_cmd

STEPS = 6
# 8 examples, global batch 4: two batches per epoch, so 6 steps cross epochs; lr 1e-3 moves the weights visibly
RUN = ["--steps", str(STEPS), "--batch-size", "4", "--lr", "1e-3", "--lora-rank", "4", "--checkpoint-every", "1",
       "--keep-checkpoints", "0", "--sample-every", "0", "--warmup-steps", "2", "--lr-decay-steps", "3"]
# the learning rate of steps 1..6 under RUN's schedule (training.loop.lr_schedule), written out
LRS = [0.5e-3, 1e-3, 1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3]
SLOW_GRIDS = ["--sample-every", "1", "--sample-steps", "60"]  # ~1 s per step here: time to deliver a signal


def flow(cache: Path, out: Path, *extra, ranks: int = 1) -> list:
    return train_cmd("flow", cache, out, [*RUN, *extra], ranks)


def final(out: Path, step: int = STEPS) -> dict:
    return checkpoint_state(out, step)


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in metrics(out)]


@pytest.fixture(scope="module")
def cache(demo_cache):
    return demo_cache  # conftest.py: one demo cache for every training-run test


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run_here(flow(cache, out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_lr_schedule_written_out():
    """training.loop.lr_schedule on hand-made cases: constant; decay alone ends at 1 / decay; warm-up and decay
    overlapping take the smaller."""
    from flashsd3.training.loop import lr_schedule

    assert [lr_schedule(s, 4) for s in range(4)] == [1.0] * 4
    assert [lr_schedule(s, 5, decay=2) for s in range(5)] == [1.0, 1.0, 1.0, 1.0, 0.5]
    assert [lr_schedule(s, 4, warmup=4, decay=4) for s in range(4)] == [0.25, 0.5, 0.5, 0.25]


def test_learning_rate_follows_the_schedule(reference):
    """metrics.jsonl logs the rate each step was taken with: warm-up, constant, then the decay over the last 3."""
    logged = [m["lr"] for m in metrics(reference)]
    assert logged == LRS, logged  # the same float64 products (lr x factor) on both sides, through JSON: exact


def test_two_ranks_equal_one(cache, reference, tmp_path):
    out = tmp_path / "ddp"
    proc = run(flow(cache, out, ranks=2))  # torchrun: no retry, every exit must be clean
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ours, ref = final(out), final(reference)
    assert sorted(ours) == sorted(ref) and len(ref) > 0
    moved = max((ref[k] - final(reference, 1)[k]).abs().max().item() for k in ref)
    assert moved > 1e-3  # the comparison below is not between two untouched initialisations
    # fp32: DDP averages the two ranks' gradients in another summation order than one process's batch mean
    # (~1e-7 relative). AdamW's normalised step m / (sqrt(v) + eps) passes that on, most where a gradient is
    # near eps (the adapters' A at the first steps, while B is ~0): measured up to 4e-6 after 6 steps of
    # lr 1e-3, i.e. 0.4% of one step. atol 2e-5 = 2% of one step; a wrong shard or average is off by whole steps.
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=2e-5, msg=k)
    np.testing.assert_allclose(losses(out), losses(reference), rtol=1e-5)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared: {proc.communicate()}"
        assert time.monotonic() < end, f"no {path} after {timeout} s"
        time.sleep(0.05)


def test_ctrl_c_and_kill_then_resume_continue_the_same_trajectory(cache, reference, tmp_path):
    out = tmp_path / "run"
    # 1. Ctrl-C while the step-1 grid is drawn: the step ends, a checkpoint is written, exit 130
    proc = subprocess.Popen(flow(cache, out, *SLOW_GRIDS), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(out / "checkpoints" / "step-0000001", proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout + stderr
    stopped = int(stdout.split("interrupted: checkpoint at step ")[1].split()[0])
    assert 1 <= stopped < STEPS and not (out / "done.json").exists()
    # 2. resumed, then killed (-9) after its next checkpoint: the steps past it are lost, nothing else
    proc = subprocess.Popen(flow(cache, out, "--resume", *SLOW_GRIDS), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoints" / f"step-{stopped + 1:07d}", proc)
    proc.kill()
    proc.communicate()
    # 3. resumed to the end (grids off: a change a resume may make), in this process
    proc = run_here(flow(cache, out, "--resume"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout
    ours, ref = final(out), final(reference)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)  # one process, fp32, same ops: bitwise
    opt, ref_opt = (torch.load(p / "checkpoints" / f"step-{STEPS:07d}" / "state.pt", weights_only=True)["optimizer"]
                    for p in (out, reference))
    assert all(torch.equal(opt["state"][i]["exp_avg_sq"], ref_opt["state"][i]["exp_avg_sq"]) for i in ref_opt["state"])
    assert losses(out) == losses(reference)  # metrics.jsonl: one line per step, lines past the kill replaced
    assert json.loads((out / "done.json").read_text()) == {"step": STEPS}
    assert sorted(p.name for p in (out / "samples").iterdir())[:1] == ["step-0000001.png"]


def test_output_folder_and_resume_rules(cache, reference, tmp_path, capsys):
    def main(*args) -> str:
        assert cli.main([str(a) for a in args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("flashsd3-train: error:"), lines
        return lines[0]

    base = ["flow", "--cache", cache, "--out", reference, *RUN]
    assert "holds a finished run (6 steps): --resume" in main(*base)
    assert "cannot change --lr" in main(*base[:-len(RUN)], "--resume", "--lr", "0.5")
    assert "nothing to resume" in main("flow", "--cache", cache, "--out", tmp_path / "new", "--resume")
    assert "8 examples, fewer than one batch of 16" in main("flow", "--cache", cache, "--out", tmp_path / "b",
                                                             "--batch-size", "16")
    (tmp_path / "c.toml").write_text('steps = 2\nlearning_rate = 1.0\n')
    assert "unknown setting 'learning_rate' in" in main("flow", "--cache", cache, "--out", tmp_path / "c",
                                                         "--config", tmp_path / "c.toml")
    assert not (tmp_path / "c").exists() and not (tmp_path / "b").exists()


def test_saved_adapter_loads_for_sampling(reference, tmp_path):
    """RUN/lora (save_lora, PEFT layout) gives the trained model back through load_lora and flashsd3-sample."""
    from flashsd3 import cli as sample_cli
    from flashsd3.lora import load_lora
    from flashsd3.pipeline import FlashSD3Pipeline
    from flashsd3.training.config import make_config
    from flashsd3.training.flow import FlowConfig
    from flashsd3.training.trainable import set_trainable

    saved = json.loads((reference / "config.json").read_text())
    cfg = make_config(FlowConfig, ({k: v for k, v in saved.items() if k != "command"}, "config.json"))
    trained = FlashSD3Pipeline.demo(seed=0).transformer
    set_trainable(cfg, trained)  # the run's adapters, then its final values
    params = dict(trained.named_parameters())
    with torch.no_grad():
        for k, v in final(reference).items():
            params[k].copy_(v)
    loaded = FlashSD3Pipeline.demo(seed=0).transformer
    load_lora(loaded, reference / "lora")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 154, 32, generator=g)
    pooled = torch.randn(2, 24, generator=g)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        # same adapters, the file's B @ A regrouped per diffusers layer (q, k, v): fp32 rounding only
        torch.testing.assert_close(loaded(x, t, ctx, pooled), trained(x, t, ctx, pooled), rtol=1e-5, atol=1e-6)
    assert sample_cli.main(["--demo", "--lora", str(reference / "lora"), "--prompt", "a red circle", "--seed", "0",
                            "--height", "32", "--width", "32", "--steps", "2", "--out", str(tmp_path / "img")]) == 0
    assert len(list((tmp_path / "img").glob("*.png"))) == 1


def test_config_file_flags_and_full_weights(cache, tmp_path):
    """Settings from a TOML file, flags over them, the resolved configuration saved beside the outputs; a
    --train-modules run trains those weights in fp32 and ends with RUN/transformer/ that load_transformer reads."""
    from flashsd3.mmdit import load_transformer

    out = tmp_path / "cfg"
    (tmp_path / "run.toml").write_text(f'cache = "{cache}"\nout = "{out}"\nsteps = 3\nbatch-size = 2\n'
                                       'train_modules = ["joint_blocks.1.*"]\nsample_every = 0\nlr = 5e-4\n')
    assert cli.main(["flow", "--config", str(tmp_path / "run.toml"), "--steps", "2", "--caption-dropout", "0.5",
                     "--train-modules", "joint_blocks.1.*,final_layer.linear.*"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["steps"], saved["batch_size"], saved["lr"], saved["caption_dropout"]) == (2, 2, 5e-4, 0.5)
    assert saved["train_modules"] == ["joint_blocks.1.*", "final_layer.linear.*"] and saved["command"] == "flow"
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    state, trained = load_transformer(out / "transformer").state_dict(), final(out, 2)
    assert len(trained) == 16 and all(k.startswith(("joint_blocks.1.", "final_layer.linear.")) for k in trained)
    assert all(torch.equal(state[k], v) for k, v in trained.items())  # fp32 written and read back: exact
