"""The few torch.distributed steps flashsd3-sample needs under torchrun: a device per local rank,
agree on failures, share a seed, add up the results. Python objects travel with torch.distributed's object collectives
(`all_gather_object`, `broadcast_object_list`); one process (no WORLD_SIZE) needs no process group.

    torchrun --nproc_per_node 4 -m flashsd3.cli --prompts-file prompts.txt
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

    def start(self, backend: str) -> None:
        """Join the process group (gloo on CPU, nccl on CUDA; torchrun's env:// rendezvous)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group(backend)
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

    def first_failure(self, error: str | None) -> tuple[int, str] | None:
        """Each rank says what failed (None: nothing); all learn (rank, message) of the lowest failing rank."""
        return next(((r, e) for r, e in enumerate(self.gather(error)) if e is not None), None)

    def close(self, synchronize: bool = False) -> None:
        """Leave the process group (idempotent). synchronize=True (only after a run that every rank
        finished) waits for all ranks first: a rank closing its gloo sockets while a peer still talked
        to it aborted that peer at exit ("terminate called without an active exception")."""
        if not self.started:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            if synchronize:
                dist.barrier()
            dist.destroy_process_group()
        self.started = False


def resolve_device(name: str, local_rank: int | None):
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N' as a torch.device; under torchrun
    a bare 'cuda' means this local rank's GPU. ValueError names what is wrong."""
    import torch

    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if local_rank is not None and device.index is None:  # torchrun: one GPU per local rank
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(device)  # also where NCCL's object collectives put their tensors
    return device
