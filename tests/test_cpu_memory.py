"""flashsd3.cpu_memory.keep_freed_memory: freed activations are reused, not faulted in again (glibc, Linux)."""
import resource
import sys

import pytest
import torch

from flashsd3.cpu_memory import keep_freed_memory


def faults_of_one_round() -> int:
    """Minor page faults of allocating and freeing activation-sized tensors (48, 12 and 24 MiB, as fc1's
    output and the residual stream of a 1024 px forward) three times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        x, y = torch.ones(12 * 2**20), torch.ones(3 * 2**20)
        del x
        z = torch.ones(6 * 2**20)
        del y, z
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_freed_activations_are_reused_without_page_faults():
    assert keep_freed_memory()  # this process's allocator, as the CLI sets it at start
    warm = [faults_of_one_round() for _ in range(3)]  # the heap grows to the pattern's peak first
    assert faults_of_one_round() < 1000, warm  # measured 0 after two rounds; ~25,000-60,000 per round without
