"""Error measures shared by the tests: one name, one meaning.

    rel_l2(a, ref)   ||a - ref||_2 / ||ref||_2        (whole-tensor relative error)
    rel_max(a, ref)  max |a - ref| / max |ref|        (worst element, relative to the largest)
    max_abs(a, ref)  max |a - ref|                    (absolute, e.g. image values in [0, 1])
All computed in float64.
"""
from __future__ import annotations

import torch


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def rel_max(a: torch.Tensor, ref: torch.Tensor) -> float:
    return max_abs(a, ref) / ref.double().abs().max().item()


def max_abs(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item()
