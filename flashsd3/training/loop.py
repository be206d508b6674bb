"""The training loop every objective shares, top to bottom as nanoGPT's train.py: torchrun environment ->
process group -> every check, then the run folder -> model + trainable parameters -> AdamW -> steps (batch,
learning rate, the objective's step, log, sample grid, checkpoint) -> final weights. The objective is a `Task`
(flow.py: SD3's flow matching; flash/task.py: Flash distillation) that owns its whole step and finishes each of
its updates through the one `OptimizerStep`; this file knows no loss.

Determinism: the data order and every random draw of a step come from generators keyed by (seed, step)
(flashsd3/rng.py) and drawn for the whole global batch, each rank taking its rows. A run's trajectory therefore
does not depend on the number of ranks (up to float summation order) nor on where it was interrupted and
resumed (bitwise on CPU).
"""
from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .. import rng
from ..distributed import Ranks, resolve_device
from ..outputs import atomic_json
from . import folder, models
from .cache import CachedData
from .checkpoint import Checkpoint, resume_point, save_checkpoint
from .config import TrainConfig, config_differences, flat
from .folder import RunError
from .grid import GridMaker

INTERRUPTED = 130  # exit status after Ctrl-C, as a shell reports SIGINT
DATA_ORDER = 1  # the loop's stream of rng.step_generator: the epoch's example order (flow.py draws from 0)


class NonFinite(ArithmeticError):
    """A loss, gradient or update that is not finite: the run stops before it is kept."""


@dataclass
class Batch:
    """This rank's rows of one global batch, on the device."""

    latents: torch.Tensor  # (b, C, h, w) model-space latents
    context: torch.Tensor  # (b, L, context_dim)
    pooled: torch.Tensor  # (b, pooled_dim)
    rows: slice  # this rank's rows of the global batch
    indices: list[int]  # the rows' example indices in the cache
    global_size: int  # B, all ranks together
    step: int


class Task(Protocol):
    """An objective: what trains, its step, how it samples. See flow.FlowTask and flash.task.FlashTask."""

    module: nn.Module  # holds every trained parameter (requires_grad=True): the checkpoint's tensors

    @staticmethod
    def trained_module(cfg: TrainConfig, transformer: nn.Module, latent_side: int) -> nn.Module:
        """Make the trained parameters on `transformer` (also a meta-device one: the checks before a run starts)
        and return the module holding them all."""

    def step(self, batch: Batch, update: Callable[[torch.Tensor], float]) -> dict:
        """Batch `batch.step`: forward passes and losses, each finished by update(loss) -> gradient norm (the
        loop's OptimizerStep); returns the logs, "loss" first."""

    def sample(self, context: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Latents for the sample grid from noise (n, C, h, w), under no_grad."""

    def save_final(self, out: Path) -> None:
        """Write the trained weights in their published layout (rank 0 only)."""


# The one optimiser step -----------------------------------------------------------------------------

@dataclass
class OptimizerStep:
    """backward, then the update every objective ends each pass with: average the gradients over ranks, clip
    their global norm, step, zero. Returns the norm; NonFinite (nothing stepped) on a non-finite gradient, or
    after an update that left a parameter non-finite.

    Gradient accumulation would go here (backward every micro-batch, step every Nth); FSDP2 (`fully_shard` per
    block, torchtitan `parallelize.py`) reduces gradients itself, so `ranks.average` would go; an LR scheduler
    lives in `lr_factor`."""

    optimizer: torch.optim.Optimizer
    clip: float  # 0: off
    ranks: Ranks = field(default_factory=Ranks)

    def __call__(self, loss: torch.Tensor) -> float:
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.ranks.average([p.grad for p in params])  # one all_reduce: DDP's average, for every objective
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip > 0 else math.inf))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFinite(f"the gradient norm is {norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.stack([p.isfinite().all() for p in params]).all():
            raise NonFinite("the update left parameters that are not finite")
        return norm


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the learning rate at `step` (0-based) of cfg's run: see `lr_schedule`."""
    return lr_schedule(step, cfg.steps, cfg.warmup_steps, cfg.lr_decay_steps)


def lr_schedule(step: int, steps: int, warmup: int = 0, decay: int = 0) -> float:
    """Warm-up, constant, then decay ("WSD"): the multiplier of the update at 0-based `step` of `steps` is
    (step + 1) / warmup during the first `warmup`, (steps - step) / decay during the last `decay` (1 down to
    1 / decay: the final update still moves), 1 between; the smaller of the two where they overlap. The decay
    lets the last iterate settle instead of ending on a full-size step's noise (measured on the toy's distill
    runs: RESULTS.md)."""
    up = min(1.0, (step + 1) / warmup) if warmup else 1.0
    down = min(1.0, (steps - step) / decay) if decay else 1.0
    return min(up, down)


def global_batch(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of global batch `step`: one permutation per epoch, the incomplete tail dropped."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=rng.step_generator(seed, epoch, DATA_ORDER))
    return order[k * batch_size:(k + 1) * batch_size].tolist()


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


# Starting a run -------------------------------------------------------------------------------------

def train(cfg: TrainConfig, task_cls, *, resume: bool = False, overwrite: bool = False) -> int:
    """Run (or resume) a training run; returns the exit status (0, or 130 after Ctrl-C); NonFinite ends it.

    task_cls(cfg, transformer, data, device, autocast) -> Task makes the objective on the frozen transformer."""
    ranks = Ranks.from_env()
    device = resolve_device(cfg.device, ranks.local_rank)
    ranks.start(device)
    finished = False
    try:
        code = _run(cfg, task_cls, ranks, device, resume, overwrite)
        finished = True
        return code
    finally:  # after a finished run every rank meets once more; after an error a rank leaves at once
        ranks.close(synchronize=finished)


@dataclass
class Opened:
    """What the checks before a run found: the data, the model to load, the checkpoint to continue from."""

    data: CachedData
    model: str
    checkpoint: Checkpoint | None


def open_run(cfg: TrainConfig, task_cls, ranks: Ranks, resume: bool, overwrite: bool) -> Opened:
    """Every check every rank makes (on the data, the model's config, the trained parameters on a meta-device
    model, the checkpoint to resume) before rank 0 creates or changes anything in the run folder."""
    out = Path(cfg.out)
    folder.check_out(out, resume, overwrite)
    data = CachedData(cfg.cache)
    model = models.model_id(cfg.model) if cfg.model else data.spec.model
    data.check(model)
    if cfg.batch_size % ranks.world:
        raise RunError(f"--batch-size {cfg.batch_size} (global) is not divisible by the {ranks.world} ranks")
    if len(data) < cfg.batch_size:
        raise RunError(f"the cache holds {len(data)} examples, fewer than one batch of {cfg.batch_size}")
    meta = models.meta_transformer(model, data.spec.resolution, f"the cache {data.folder}")
    module = task_cls.trained_module(cfg, meta, data.latent_side)
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
    ckpt = None
    if resume and not overwrite:
        def warn(msg: str) -> None:
            if ranks.main:
                print(f"flashsd3-train: warning: {msg}", file=sys.stderr, flush=True)

        ckpt = resume_point(out / "checkpoints", shapes, lambda c: config_differences(type(cfg), cfg, c), warn)
        if ckpt is not None and cfg.steps < ckpt.step:
            raise RunError(f"--steps {cfg.steps} is below the run's step {ckpt.step} ({ckpt.path.name}): a resumed "
                           f"run continues to more steps")
    ranks.barrier()  # every rank has looked at the folder before rank 0 changes it
    if ranks.main:
        folder.start(out, cfg.command, flat(cfg), overwrite, ckpt.step if ckpt else None)
    return Opened(data, model, ckpt)


def precision(cfg: TrainConfig, device: torch.device):
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
    named: dict[str, nn.Parameter]  # the trained parameters by name (checkpoint keys), in optimiser order
    optimizer: torch.optim.Optimizer
    update: OptimizerStep
    data: CachedData
    ranks: Ranks
    device: torch.device
    autocast: object  # a context manager: bf16 autocast or nullcontext
    out: Path
    checkpointed: int | None = None  # step of the newest checkpoint on disk


def _run(cfg: TrainConfig, task_cls, ranks: Ranks, device: torch.device, resume: bool, overwrite: bool) -> int:
    opened = open_run(cfg, task_cls, ranks, resume, overwrite)
    autocast, base_dtype = precision(cfg, device)
    transformer = models.training_transformer(opened.model, torch.float32 if cfg.train_modules else base_dtype,
                                              device)
    task = task_cls(cfg, transformer, opened.data, device, autocast)
    named = {n: p for n, p in task.module.named_parameters() if p.requires_grad}
    # One parameter group; a task wanting another lr for some parameters would return groups here.
    optimizer = torch.optim.AdamW(list(named.values()), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    ckpt, step = opened.checkpoint, 0
    if ckpt is not None:
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(ckpt.tensors[name])
        optimizer.load_state_dict(ckpt.optimizer)
        step = ckpt.step
    if ranks.main:
        n = sum(p.numel() for p in named.values())
        print(f"training {n:,} parameters in {len(named)} tensors, from step {step} to {cfg.steps}"
              f"{f' (resumed from {ckpt.path})' if ckpt else ''}; {ranks.world} rank(s), {len(opened.data)} examples",
              flush=True)
    run = Run(cfg, task, named, optimizer, OptimizerStep(optimizer, cfg.grad_clip, ranks), opened.data, ranks,
              device, autocast, Path(cfg.out), step if ckpt else None)
    grids = GridMaker(cfg, opened.data, opened.model, device) if ranks.main and cfg.sample_every else None
    return _loop(run, step, grids)


# The loop ---------------------------------------------------------------------------------------

def _loop(run: Run, step: int, grids: GridMaker | None) -> int:
    from tqdm import tqdm

    cfg, ranks = run.cfg, run.ranks
    bar = tqdm(total=cfg.steps, initial=step, unit="step", disable=not ranks.main or None, dynamic_ncols=True)
    start, first = time.perf_counter(), step
    with stop_requests() as flag:
        while step < cfg.steps:
            try:
                logs = _step(run, step)
            except NonFinite as e:
                raise NonFinite(_stopped(run, step + 1, str(e))) from None
            step += 1
            *values, stop = ranks.all_sum([*logs.values(), float(flag["stop"])], run.device)  # all stop together
            logs = {k: v / ranks.world for k, v in zip(logs, values, strict=True)}
            if not all(math.isfinite(v) for v in logs.values()):
                bad = ", ".join(f"{k} {v}" for k, v in logs.items() if not math.isfinite(v))
                raise NonFinite(_stopped(run, step, f"the step logged {bad}"))
            if ranks.main:
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
                rate = (step - first) / (time.perf_counter() - start)
                folder.log_metrics(run.out, {"step": step, **logs, "lr": cfg.lr * lr_factor(cfg, step - 1),
                                             "it_s": rate})
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
    """One batch on this rank's rows of global batch `step`; returns its logs (loss first)."""
    cfg, ranks = run.cfg, run.ranks
    b = cfg.batch_size // ranks.world
    rows = slice(ranks.rank * b, (ranks.rank + 1) * b)
    indices = global_batch(step, len(run.data), cfg.batch_size, cfg.seed)[rows]
    latents, context, pooled = (t.to(run.device, torch.float32) for t in run.data.batch(indices))  # autocast casts
    for group in run.optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(cfg, step)
    return run.task.step(Batch(latents, context, pooled, rows, indices, cfg.batch_size, step), run.update)


def _stopped(run: Run, step: int, what: str) -> str:
    kept = (f"the last checkpoint, step {run.checkpointed}, is kept (--resume continues from it)"
            if run.checkpointed is not None else "no checkpoint was written")
    return f"step {step}: {what}; stopped without keeping this step: {kept}; try a lower --lr"


def _checkpoint(run: Run, step: int) -> None:
    if run.ranks.main:
        save_checkpoint(run.out / "checkpoints", step, run.named, run.optimizer, flat(run.cfg),
                        keep=run.cfg.keep_checkpoints)
    run.checkpointed = step
    run.ranks.barrier()  # nobody runs ahead of (or exits before) a checkpoint being written
