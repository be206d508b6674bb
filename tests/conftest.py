"""Shared test setup: slow/gpu tests are skipped by default with a visible reason."""
import os

# MKL reads this when torch loads it (as flashsd3-sample and flashsd3-train set it): the same float results
# from run to run, so tests that compare bytes compare like with like.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("FLASHSD3_RUN_SLOW") == "1"
    has_gpu = torch.cuda.is_available()
    skip_slow = pytest.mark.skip(reason="slow: set FLASHSD3_RUN_SLOW=1 to run (large shapes / real weights)")
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device on this machine")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fixed_threads():
    # Deterministic CPU reductions across runs; the CI box has 2 cores.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
