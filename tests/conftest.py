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


# In-process tests run on tiny models with one intra-op thread: the same CPU reductions from run to run (module
# fixtures included, which are made before a test's own fixtures), and no threads fighting each other on a loaded
# machine (tiny ops gain nothing from a second thread). The tests' subprocess runs get OMP_NUM_THREADS=1.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """A test about threading may set its own count; the next test starts with one thread again."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """`flashsd3-train prepare --demo` over 8 random 32x32 images (tests/helpers_training.py), made once."""
    from helpers_training import CAPTIONS, demo_cache

    return demo_cache(tmp_path_factory.mktemp("demo_cache"), CAPTIONS)
