"""flashsd3/rng.py: keyed generators (what every training draw comes from) and seeded constructors."""
import pytest
import torch

from flashsd3 import rng, rules


def draws(g: torch.Generator) -> torch.Tensor:
    return torch.rand(4, generator=g)


def test_keys_give_independent_reproducible_streams():
    assert torch.equal(draws(rng.generator(7, 3, 0, -1)), draws(rng.generator(7, 3, 0, -1)))
    keys = [(7, 3, 0, -1), (7, 3, 1, -1), (7, 4, 0, -1), (8, 3, 0, -1), (7, 3, 0, 0)]
    streams = [draws(rng.generator(*k)) for k in keys]
    assert all(not torch.equal(a, b) for i, a in enumerate(streams) for b in streams[i + 1:])
    per_sample = rng.sample_generators(7, 3, 0, ids=[5, 2])
    assert torch.equal(draws(per_sample[1]), draws(rng.generator(7, 3, 0, 2)))  # sample 2's stream, anywhere


def test_every_seed_flashsd3_sample_takes_works():
    for seed in (0, 4294, 4295, 2**63, 2**64 - 1):
        draws(rng.generator(seed, 1)), draws(rng.step_generator(seed, 10, 1)), draws(rng.offset_generator(seed, 5))
    rules.check_seed(2**64 - 1, 1, "--seed")  # the one seed rule, shared with sampling
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="--sample-seed"):
            rules.check_seed(bad, 1, "--sample-seed")


def test_loop_streams_keep_their_layout_where_it_fits():
    """Seeds up to 4294 keep the loop's (seed * 1000003 + stream) << 32 | step layout (runs made before the keyed
    module reproduce); beyond it, where that overflows 64 bits, the key is hashed."""
    assert torch.equal(draws(rng.step_generator(4294, 9, 1)),
                       draws(torch.Generator().manual_seed(((4294 * 1_000_003 + 1) << 32) + 9)))
    assert torch.equal(draws(rng.step_generator(4295, 9, 1)), draws(rng.generator(4295, 1, 9)))
    assert torch.equal(draws(rng.offset_generator(2**64 - 1, 2)), draws(torch.Generator().manual_seed(1)))


def test_seeded_constructors_leave_the_global_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with rng.seeded(5):
        a = torch.nn.Linear(3, 2).weight.detach().clone()
    assert torch.equal(torch.rand(3), expected)  # the caller's stream continues as if nothing happened
    with rng.seeded(5):
        assert torch.equal(torch.nn.Linear(3, 2).weight, a)
    torch.manual_seed(5)
    assert torch.equal(torch.nn.Linear(3, 2).weight, a)  # the same draws as a global reseed gave
