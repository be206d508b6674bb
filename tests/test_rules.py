"""flashsd3/rules.py: each rule has one message, which names the argument as its caller calls it (the pipeline's
Python names, flashsd3-sample's flags); the skip-layer window rule is the one the guidance stage applies."""
import pytest

from flashsd3 import rules
from flashsd3.config import TINY
from flashsd3.sampling.guidance import SkipLayerGuidance

PY = ("height", "width", "seed", "num_steps", "strength")
CLI = ("--height", "--width", "--seed", "--steps", "--strength")
MARKS = ("<H>", "<W>", "<S>", "<N>", "<F>")


def message(call) -> str:
    with pytest.raises(rules.InputError) as e:
        call()
    return str(e.value)


@pytest.mark.parametrize("rule", [
    lambda n: rules.check_size(TINY, 100, 32, names=(n[0], n[1])),
    lambda n: rules.check_size(TINY, 32, 16 * 17 * 8, names=(n[0], n[1])),  # beyond the 16-token table
    lambda n: rules.check_size(None, 16, 40, names=(n[0], n[1])),  # no config: the factor only
    lambda n: rules.edit_size((60, 80), None, None, 16, names=(n[0], n[1])),
    lambda n: rules.edit_size((64, 80), 64, None, 16, names=(n[0], n[1])),
    lambda n: rules.check_seed(2**64 - 2, 3, n[2]),
    lambda n: rules.check_seed(-1, 1, n[2]),
    lambda n: rules.check_steps(10**12, n[3]),
    lambda n: rules.check_strength(float("nan"), n[4]),
    lambda n: rules.check_strength_leaves_a_step(1e-20, 4, name=n[4], steps=n[3]),
])
def test_one_message_named_by_the_caller(rule):
    """The message with marks for the names is the template: the pipeline's and the CLI's messages are it
    with their own names put in, and nothing else differs."""
    template = message(lambda: rule(MARKS))
    for names in (PY, CLI):
        expected = template
        for mark, name in zip(MARKS, names, strict=True):
            expected = expected.replace(mark, name)
        assert message(lambda names=names: rule(names)) == expected


def test_slg_window_is_the_guidance_stage_rule():
    for start, stop in ((0.01, 0.2), (0.1, 0.6), (0.0, 1.0)):
        slg = SkipLayerGuidance(layers=(1,), start=start, stop=stop)
        for n in range(1, 60):
            assert rules.guided_steps(start, stop, n) == [i for i in range(n) if slg.active(i, n)]
    rules.check_slg_window(0.01, 0.2, 6)  # step 1 is guided
    assert "give num_steps >= 6," in message(lambda: rules.check_slg_window(0.01, 0.2, 5))
    # an edit runs the last steps: 8 steps at strength 0.5 run 4, none guided; 11 run 6
    assert "guides no step of 4 (the steps strength 0.5 runs of 8)" in message(
        lambda: rules.check_slg_window(0.01, 0.2, 8, 0.5))
    assert "give num_steps >= 11," in message(lambda: rules.check_slg_window(0.01, 0.2, 8, 0.5))
    rules.check_slg_window(0.01, 0.2, 11, 0.5)


def test_edit_start_is_diffusers_get_timesteps():
    # diffusers StableDiffusion3Img2ImgPipeline.get_timesteps: t_start = int(max(n - min(n * strength, n), 0))
    for n in (1, 4, 28):
        for strength in (1e-20, 0.01, 0.3, 0.5, 0.6, 1.0):
            assert rules.edit_start(n, strength) == int(max(n - min(n * strength, n), 0))
