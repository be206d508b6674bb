"""Counting the model calls of a training iteration, from the code's own calls: each forward through a wrapped
model callable (with its batch size) and each backward pass that flows back through that forward's output.

Wrap the callables an iteration uses (for Flash: `FlashModels.student`, `.teacher`, `.features`), run the
iteration, then read per-sample counts: a CFG teacher call on a batch of B counts 2B sample-forwards (the
conditional and negative halves are one batched call), so "sample-forwards per training sample" is the
model forward-equivalents each training sample cost, independent of the machine.

A backward is counted once per backward pass that reaches the call's output (a tensor hook), however many
losses use it; a forward whose output needs no gradient, or whose gradient nothing asks for (a term with
weight 0), counts no backward. What a backward costs in FLOPs depends on what needs gradients (frozen base
weights: input gradients only), so the counts stay separate from any FLOP convention.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Call:
    """One forward through a wrapped callable: `batch` rows; `backward` passes that flowed back through it."""

    name: str
    batch: int
    grad: bool  # the output required grad (a backward could flow through this call)
    backward: int = 0


@dataclass
class Tally:
    """Totals of one callable over the recorded calls: calls, sample-forwards, sample-backwards."""

    calls: int = 0
    forward: int = 0  # sum of batch sizes over forwards
    backward: int = 0  # sum of batch sizes over backward passes through them


@dataclass
class CallCounter:
    """Records the forwards and backwards of the callables it wrapped (`wrap`), in call order."""

    calls: list[Call] = field(default_factory=list)

    def wrap(self, fn: Callable[..., torch.Tensor], name: str) -> Callable[..., torch.Tensor]:
        """`fn(x, *args, **kwargs) -> tensor` counted under `name`; x's first dimension is the batch."""
        def counted(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            out = fn(x, *args, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"CallCounter({name!r}) counts callables returning one tensor, got {type(out)}")
            call = Call(name, int(x.shape[0]), out.requires_grad)
            self.calls.append(call)
            if out.requires_grad:
                out.register_hook(lambda grad, c=call: _backward(c))
            return out

        return counted

    def reset(self) -> None:
        self.calls.clear()

    def tally(self) -> dict[str, Tally]:
        """{name: Tally} over the recorded calls, names in first-call order."""
        out: dict[str, Tally] = {}
        for c in self.calls:
            t = out.setdefault(c.name, Tally())
            t.calls += 1
            t.forward += c.batch
            t.backward += c.batch * c.backward
        return out

    def per_sample(self, samples: int) -> dict[str, tuple[float, float]]:
        """{name: (sample-forwards, sample-backwards) per training sample} for `samples` training samples."""
        if samples <= 0:
            raise ValueError(f"samples must be positive, got {samples}")
        return {name: (t.forward / samples, t.backward / samples) for name, t in self.tally().items()}


def _backward(call: Call) -> None:
    call.backward += 1
