"""The bytes short training runs produce (flow, Flash, the toy teacher, toy Flash distillation, the demo
pipeline's seed-0 weights) against digests recorded before the training code was reshaped
(tests/helpers_golden.py; tests/fixtures/training_golden.json). Float kernels differ between CPUs, so the
comparison runs only on the kind of machine the digests were taken on, and is skipped elsewhere."""
import json
import os

import pytest

from helpers_golden import FIXTURE, compute, machine

RECORDED = json.loads(FIXTURE.read_text())


@pytest.mark.skipif(machine() != RECORDED["machine"] or os.environ.get("MKL_CBWR") != "AUTO,STRICT",
                    reason=f"digests recorded on {RECORDED['machine']} with MKL_CBWR=AUTO,STRICT; this machine: "
                           f"{machine()}")
def test_training_runs_give_the_recorded_bytes():
    assert compute() == RECORDED["digests"]
