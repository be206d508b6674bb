"""The few torch.distributed steps flashsd3-sample and flashsd3-train need under torchrun: a device per local
rank, agree on failures, share a seed, add up results and average gradients. Python objects travel with
torch.distributed's object collectives (`all_gather_object`, `broadcast_object_list`), numbers and gradients
with `all_reduce`; one process (no WORLD_SIZE) needs no process group.

    torchrun --nproc_per_node 4 -m flashsd3.cli --prompts-file prompts.txt
    torchrun --nproc_per_node 2 -m flashsd3.training.cli flow --config run.toml
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Ranks:
    """This process's place in a torchrun job (WORLD_SIZE, RANK, LOCAL_RANK), or one process."""

    world: int = 1
    rank: int = 0
    local_rank: int | None = None  # the GPU index under torchrun; None for one process
    started: bool = False

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(world, int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes."""
        return self.rank == 0

    def start(self, device) -> None:
        """Join the process group on `device` (a torch.device: nccl on CUDA, gloo on CPU; torchrun's env://
        rendezvous)."""
        if self.world > 1:
            import torch.distributed as dist

            bind_default_group_arguments_early()
            cuda = device.type == "cuda"
            dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
            self.started = True

    def gather(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if not self.started:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def from_rank0(self, value):
        """Rank 0's `value` on every rank."""
        if not self.started:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.barrier()

    def all_sum(self, values: list[float], device) -> list[float]:
        """Elementwise sums over ranks of `values` (float64 on `device`, where the backend reduces)."""
        if not self.started:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def average(self, tensors: list) -> None:
        """Replace each tensor (e.g. a gradient) by its mean over ranks: one all_reduce of them flattened."""
        if not self.started or not tensors:
            return
        import torch
        import torch.distributed as dist

        flat = torch.cat([t.flatten() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def first_failure(self, error: str | None) -> tuple[int, str] | None:
        """Each rank says what failed (None: nothing); all learn (rank, message) of the lowest failing rank."""
        return next(((r, e) for r, e in enumerate(self.gather(error)) if e is not None), None)

    def close(self, synchronize: bool = False) -> None:
        """Leave the process group (idempotent): its backend threads end here, before Python's finalization
        (see WORLD_AT_IMPORT). synchronize=True (only after a run that every rank finished) waits for all
        ranks first, so no rank leaves while a peer still waits on it."""
        if not self.started:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            if synchronize:
                dist.barrier()
            dist.destroy_process_group()
        self.started = False


# torch modules whose default arguments read `group.WORLD` when imported (`def all_reduce(..., group=group.WORLD)`).
# Imported after init_process_group (transformers imports fsdp, fsdp imports torch.distributed.nn), they keep
# the default group alive after destroy_process_group: its gloo threads then outlive Python's finalization and
# one that frees a finished collective's tensors needs the GIL there, which aborts the process ("terminate called
# without an active exception", exit -6, in roughly 1 torchrun run in 5 on a busy machine).
WORLD_AT_IMPORT = ("torch.distributed.nn.functional", "torch.distributed.fsdp.sharded_grad_scaler",
                   "torch.distributed.optim.zero_redundancy_optimizer")


def bind_default_group_arguments_early() -> None:
    """Import WORLD_AT_IMPORT while there is no default group, so their default arguments hold None."""
    import importlib

    for name in WORLD_AT_IMPORT:
        importlib.import_module(name)


DEVICES = "auto, cpu, cuda, cuda:N"


def resolve_device(name: str, local_rank: int | None):
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N' as a torch.device; under torchrun
    a bare 'cuda' means this local rank's GPU. Call it before loading anything: ValueError names the
    --device value and what is wrong (no such device type, no CUDA here, no such GPU)."""
    import torch

    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device ({DEVICES})") from None
    if device.type not in ("cpu", "cuda"):  # xpu, mps, meta, ...: devices this program does not run on
        raise ValueError(f"--device {name}: the {device.type} device type is not supported ({DEVICES})")
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if local_rank is not None and device.index is None:  # torchrun: one GPU per local rank
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(device)  # also where NCCL's object collectives put their tensors
    return device
