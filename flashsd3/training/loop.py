"""The training loop every objective shares, top to bottom as nanoGPT's train.py: torchrun environment ->
process group -> model + trainable parameters -> DDP -> AdamW -> steps (loss, backward, clip, step, log,
sample grid, checkpoint) -> final weights. The objective is a `Task` (flow.py: SD3's flow matching; flash.py:
Flash distillation); this file knows no loss.

Determinism: the data order and every random draw of a step come from generators keyed by (seed, step) and
drawn for the whole global batch, each rank taking its rows. A run's trajectory therefore does not depend on
the number of ranks (up to float summation order) nor on where it was interrupted and resumed (bitwise on CPU).
"""
from __future__ import annotations

import json
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from . import models
from .cache import CachedData
from .checkpoint import atomic_json, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .grid import GridMaker

INTERRUPTED = 130  # exit status after Ctrl-C, as a shell reports SIGINT


class RunError(ValueError):
    """The run cannot start as asked (output folder, batch size, resume); one line for the user."""


@dataclass
class Batch:
    """This rank's rows of one global batch, on the device."""

    latents: torch.Tensor  # (b, C, h, w) model-space latents
    context: torch.Tensor  # (b, L, context_dim)
    pooled: torch.Tensor  # (b, pooled_dim)
    rows: slice  # this rank's rows of the global batch
    global_size: int  # B, all ranks together
    step: int


class Task(Protocol):
    """An objective: what trains, its loss, how it samples. See flow.FlowTask."""

    module: nn.Module  # holds every trained parameter (requires_grad=True) and is what DDP wraps

    def loss(self, module: nn.Module, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """module: `self.module` or its DDP wrapper (call it, not self.module, so gradients are averaged).
        generator: keyed by (seed, step); draw for batch.global_size samples, then take batch.rows."""

    def sample(self, context: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Latents for the sample grid from noise (n, C, h, w), under no_grad."""

    def save_final(self, out: Path) -> None:
        """Write the trained weights in their published layout (rank 0 only)."""

    # Optional: param_groups(named) -> AdamW parameter groups; ddp_kwargs: dict for DistributedDataParallel.
    # Optional, instead of `loss`: update(module, batch, generator, optimizer, autocast) -> logs ("loss" first)
    # makes the whole step itself (backward, gradient averaging over ranks, optimiser steps); flash.FlashTask.


# Ranks ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_ranks(device: str) -> Ranks:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: one process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Ranks(int(os.environ.get("RANK", "0")), world, dev)


def close_ranks(ranks: Ranks, finished: bool) -> None:
    """After a finished run every rank meets once more (no rank exits while another still writes); after an
    error a rank leaves at once (torchrun stops the others)."""
    if ranks.world > 1 and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_sum(ranks: Ranks, values: list[float]) -> list[float]:
    if ranks.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ranks.device)
    dist.all_reduce(t)
    return t.tolist()


# Determinism ------------------------------------------------------------------------------------

def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator keyed by (seed, step, stream): the same draws on every rank and after a resume."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + stream) << 32) + step)


def global_batch(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of global batch `step`: one permutation per epoch, the incomplete tail dropped."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=step_generator(seed, epoch, stream=1))
    return order[k * batch_size:(k + 1) * batch_size].tolist()


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of each parameter group's learning rate at `step`: linear warm-up, then constant."""
    return min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0


# Output folder ----------------------------------------------------------------------------------

RUN_FILES = ("config.json", "metrics.jsonl", "done.json", "checkpoints", "samples", "lora", "trained.safetensors")


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run: a finished or started run needs --resume or --overwrite."""
    if overwrite or resume or not out.exists():
        return
    done = out / "done.json"
    if done.is_file():
        step = json.loads(done.read_text())["step"]
        raise RunError(f"{out} holds a finished run ({step} steps): --resume (with more --steps) to continue it, "
                       "--overwrite to replace it, or another --out")
    ckpts = list_checkpoints(out / "checkpoints")
    if ckpts or (out / "config.json").exists():
        at = f" (last checkpoint {ckpts[-1].name})" if ckpts else ""
        raise RunError(f"{out} holds a run in progress{at}: --resume to continue it, --overwrite to replace it, "
                       "or another --out")


def clear_run(out: Path) -> None:
    import shutil

    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step (a killed run may have logged beyond its last checkpoint)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        atomic_json_lines(path, lines)


def atomic_json_lines(path: Path, lines: list[str]) -> None:
    from .checkpoint import atomic_file

    atomic_file(path, lambda tmp: Path(tmp).write_text("".join(ln + "\n" for ln in lines), encoding="utf-8"))


# Ctrl-C -----------------------------------------------------------------------------------------

@contextmanager
def stop_requests():
    """SIGINT/SIGTERM set a flag the loop checks after each step (checkpoint, then exit 130); a second
    Ctrl-C interrupts at once."""
    flag = {"stop": False}

    def handler(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# The loop ---------------------------------------------------------------------------------------

def train(cfg: TrainConfig, build_task, *, resume: bool = False, overwrite: bool = False) -> int:
    """Run (or resume) a training run; returns the exit status (0, or 130 after Ctrl-C).

    build_task(cfg, transformer, data, ranks) -> Task makes the objective: it chooses what trains
    (adapters or weights of the frozen transformer) and may add modules of its own to `Task.module`.
    """
    ranks = setup_ranks(cfg.device)
    finished = False
    try:
        code = _run(cfg, build_task, ranks, resume, overwrite)
        finished = True
        return code
    finally:
        close_ranks(ranks, finished)


def _open_run(cfg: TrainConfig, ranks: Ranks, resume: bool, overwrite: bool) -> tuple[CachedData, str, Path | None]:
    """Checks every rank makes before rank 0 writes anything; returns (data, model, checkpoint to resume)."""
    out = Path(cfg.out)
    check_out_dir(out, resume, overwrite)
    data = CachedData(cfg.cache)
    model = models.model_id(cfg.model) if cfg.model else data.spec.model
    data.check(model)
    if cfg.batch_size % ranks.world:
        raise RunError(f"--batch-size {cfg.batch_size} (global) is not divisible by the {ranks.world} ranks")
    if len(data) < cfg.batch_size:
        raise RunError(f"the cache holds {len(data)} examples, fewer than one batch of {cfg.batch_size}")
    ckpts = list_checkpoints(out / "checkpoints") if resume and not overwrite else []
    if ranks.world > 1:
        dist.barrier()  # every rank has looked at the folder before rank 0 changes it
    if ranks.main:
        if overwrite:
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "done.json").unlink(missing_ok=True)
        trim_metrics(out / "metrics.jsonl", int(ckpts[-1].name[5:]) if ckpts else 0)
        atomic_json(out / "config.json", {"command": cfg.command, **asdict(cfg)})
    return data, model, (ckpts[-1] if ckpts else None)


def _restore(path: Path, named: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    tensors, state = load_checkpoint(path)
    if sorted(tensors) != sorted(named):
        extra, missing = sorted(set(tensors) - set(named)), sorted(set(named) - set(tensors))
        raise RunError(f"{path} does not match this run's trained parameters (extra {extra[:3]}, "
                       f"missing {missing[:3]}): resume with the run's own configuration")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(tensors[name])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def _precision(cfg: TrainConfig, device: torch.device):
    """(autocast context, base weight dtype): bf16 autocast where asked (default on CUDA), else fp32."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not bf16:
        return nullcontext(), torch.float32
    return torch.autocast(device.type, dtype=torch.bfloat16), torch.bfloat16


@dataclass
class Run:
    """What the steps of a started run share (one per process)."""

    cfg: TrainConfig
    task: Task
    module: nn.Module  # task.module, or its DDP wrapper
    named: dict[str, nn.Parameter]  # the trained parameters by name (checkpoint keys)
    optimizer: torch.optim.Optimizer
    data: CachedData
    ranks: Ranks
    autocast: object  # a context manager: bf16 autocast or nullcontext
    out: Path


def _run(cfg: TrainConfig, build_task, ranks: Ranks, resume: bool, overwrite: bool) -> int:
    data, model_name, ckpt = _open_run(cfg, ranks, resume, overwrite)
    autocast, base_dtype = _precision(cfg, ranks.device)
    transformer = models.load_transformer(model_name, torch.float32 if cfg.train_modules else base_dtype, ranks.device)
    task = build_task(cfg, transformer, data, ranks)
    named = {n: p for n, p in task.module.named_parameters() if p.requires_grad}
    # A task may ask for parameter groups (e.g. another lr for a discriminator); lr_factor scales each group's lr.
    groups = task.param_groups(named) if hasattr(task, "param_groups") else [{"params": list(named.values())}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    step = _restore(ckpt, named, optimizer) if ckpt else 0
    module = task.module
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # a task whose steps leave some trained parameters unused (e.g. alternating updates) sets
        # ddp_kwargs = {"find_unused_parameters": True}
        module = DDP(task.module, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None,
                     **getattr(task, "ddp_kwargs", {}))
    if ranks.main:
        n = sum(p.numel() for p in named.values())
        print(f"training {n:,} parameters in {len(named)} tensors, from step {step} to {cfg.steps}"
              f"{f' (resumed from {ckpt})' if ckpt else ''}; {ranks.world} rank(s), {len(data)} examples", flush=True)
    run = Run(cfg, task, module, named, optimizer, data, ranks, autocast, Path(cfg.out))
    grids = GridMaker(cfg, data, model_name, ranks) if ranks.main and cfg.sample_every else None
    return _loop(run, step, grids)


def _loop(run: Run, step: int, grids: GridMaker | None) -> int:
    from tqdm import tqdm

    cfg, ranks = run.cfg, run.ranks
    bar = tqdm(total=cfg.steps, initial=step, unit="step", disable=not ranks.main or None, dynamic_ncols=True)
    start, first = time.perf_counter(), step
    with stop_requests() as flag:
        while step < cfg.steps:
            logs = _step(run, step)
            step += 1
            *values, stop = all_sum(ranks, [*logs.values(), float(flag["stop"])])  # every rank stops together
            logs = {k: v / ranks.world for k, v in zip(logs, values, strict=True)}
            if ranks.main:
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
                rate = (step - first) / (time.perf_counter() - start)
                _log(run.out, {"step": step, **logs, "lr": cfg.lr * lr_factor(cfg, step - 1), "it_s": rate})
            if grids is not None and not stop and (step % cfg.sample_every == 0 or step == cfg.steps):
                grids.save(run.task, step, run.autocast)
            if stop or step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _checkpoint(run, step)
            if stop:
                bar.close()
                if ranks.main:
                    print(f"interrupted: checkpoint at step {step} in {run.out / 'checkpoints'}; "
                          "continue with --resume", flush=True)
                return INTERRUPTED
    bar.close()
    if ranks.main:
        run.task.save_final(run.out)
        atomic_json(run.out / "done.json", {"step": step})
        print(f"done: {step} steps; outputs in {run.out}", flush=True)
    return 0


def _step(run: Run, step: int) -> dict:
    """One optimiser step on this rank's rows of global batch `step`; returns its logs (loss first)."""
    cfg, ranks = run.cfg, run.ranks
    b = cfg.batch_size // ranks.world
    rows = slice(ranks.rank * b, (ranks.rank + 1) * b)
    indices = global_batch(step, len(run.data), cfg.batch_size, cfg.seed)[rows]
    latents, context, pooled = (t.to(ranks.device, torch.float32) for t in run.data.batch(indices))  # autocast casts
    torch.manual_seed(((cfg.seed * 1_000_003 + 2 + ranks.rank) << 32) + step)  # per-rank, per-step global RNG
    for group in run.optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(cfg, step)
    batch = Batch(latents, context, pooled, rows, cfg.batch_size, step)
    if hasattr(run.task, "update"):  # an objective with its own update scheme (flash: alternating G and D steps)
        return run.task.update(run.module, batch, step_generator(cfg.seed, step), run.optimizer, run.autocast)
    with run.autocast:
        loss, logs = run.task.loss(run.module, batch, step_generator(cfg.seed, step))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(run.named.values(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "grad_norm": norm.item(), **{k: float(v) for k, v in logs.items()}}


def _log(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _checkpoint(run: Run, step: int) -> None:
    cfg = run.cfg
    if run.ranks.main:
        per_epoch = len(run.data) // cfg.batch_size
        position = {"step": step, "epoch": step // per_epoch, "batch_in_epoch": step % per_epoch}
        extra = {"config": asdict(cfg), "param_names": list(run.named), "data_position": position}
        save_checkpoint(run.out / "checkpoints", step, dict(run.named), run.optimizer, extra,
                        keep=cfg.keep_checkpoints)
    if run.ranks.world > 1:
        dist.barrier()  # nobody runs ahead of (or exits before) a checkpoint being written
