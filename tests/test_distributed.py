"""flashsd3.distributed: one process without a group, and the object collectives on a one-rank gloo group.
Two real ranks under torchrun: tests/test_cli.py::test_torchrun_two_ranks_match_one_process, and the backend's
threads after close() below."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flashsd3.distributed import Ranks, resolve_device

ROOT = Path(__file__).resolve().parents[1]


def test_one_process_needs_no_group(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ranks = Ranks.from_env()
    ranks.start(torch.device("cpu"))
    assert (ranks.world, ranks.rank, ranks.local_rank, ranks.started) == (1, 0, None, False)
    assert ranks.gather((3, 1.5)) == [(3, 1.5)] and ranks.from_rank0(2**63 + 5) == 2**63 + 5
    assert ranks.first_failure(None) is None and ranks.first_failure("bad") == (0, "bad")
    assert ranks.all_sum([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0] and ranks.main
    grads = [torch.ones(2)]
    ranks.average(grads)
    assert torch.equal(grads[0], torch.ones(2))
    ranks.close(synchronize=True)


def test_env_of_a_torchrun_worker(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Ranks.from_env() == Ranks(world=4, rank=3, local_rank=1)


def test_object_collectives_on_a_group(tmp_path):
    """Seeds past 2**53 and messages travel intact (a float64 all_reduce would round the seed)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    ranks = Ranks(world=1, rank=0, started=True)
    try:
        assert ranks.from_rank0(2**64 - 1) == 2**64 - 1
        assert ranks.gather((7, 0.25)) == [(7, 0.25)]
        assert ranks.first_failure("--seed 5: bad") == (0, "--seed 5: bad") and ranks.first_failure(None) is None
        assert ranks.all_sum([0.25, 3.0], torch.device("cpu")) == [0.25, 3.0]
        grads = [torch.arange(3.0), torch.full((2, 2), 5.0)]
        ranks.average(grads)  # one rank: the mean is the value itself
        assert torch.equal(grads[0], torch.arange(3.0)) and torch.equal(grads[1], torch.full((2, 2), 5.0))
    finally:
        ranks.close(synchronize=True)
    assert not dist.is_initialized() and not ranks.started


def test_resolve_device():
    assert resolve_device("cpu", None) == torch.device("cpu") == resolve_device("cpu:3", None)
    with pytest.raises(ValueError, match="--device nope: not a device"):
        resolve_device("nope", None)
    for name in ("xpu", "meta", "mps"):  # device types this program does not run on
        with pytest.raises(ValueError, match=f"--device {name}: the {name} device type is not supported"):
            resolve_device(name, None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:1: CUDA is not available"):
            resolve_device("cuda:1", None)


CLOSE_SCRIPT = """
import os, sys, torch
from flashsd3.distributed import Ranks
ranks = Ranks.from_env()
ranks.start(torch.device("cpu"))
import flashsd3.pipeline  # transformers -> fsdp -> torch.distributed.nn, imported after the group exists
ranks.gather(ranks.rank)
ranks.close(synchronize=True)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(f"rank{ranks.rank}.txt", "w") as f:  # one file each: two ranks' prints may interleave on one pipe
    f.write(f"backend threads left {sorted(n for n in names if 'gloo' in n)}")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc/self/task to list threads")
def test_close_ends_the_backend_threads(tmp_path):
    """After close() no gloo thread is left, even with the pipeline's imports done after start(). A group kept
    alive by a module's default argument left them running into Python's finalization, where one aborted the
    process at exit (exit -6) in about 1 torchrun run in 5 on a busy machine."""
    script = tmp_path / "close.py"
    script.write_text(CLOSE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text() == "backend threads left []", r
