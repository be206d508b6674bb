"""The call counter (flashsd3/training/flash/cost.py) on hand-made modules, then on one Flash iteration whose
model calls are known by hand: K - k teacher CFG calls for the target, DMD's teacher CFG + student, the GAN's
features pass with a backward through it, the discriminator pass."""
import pytest
import torch
from torch import nn

from flashsd3.training.flash import DiscriminatorHead, FlashBatch, FlashModels, FlashRecipe, flash_step, named_recipe
from flashsd3.training.flash.cost import CallCounter
from flashsd3.training.loop import OptimizerStep


def test_counts_forwards_with_batch_sizes_and_backwards_through_them():
    torch.manual_seed(0)
    lin, c = nn.Linear(3, 2), CallCounter()
    f = c.wrap(lin, "lin")
    with torch.no_grad():
        f(torch.randn(5, 3))  # no graph: a forward, no backward possible
    y1, y2 = f(torch.randn(4, 3)), f(torch.randn(2, 3))
    unused = f(torch.randn(7, 3))  # its output reaches no loss: no backward through it
    loss = y1.sum() + 2 * y1.pow(2).sum() + y2.sum()  # y1 used twice: still one backward pass through it
    loss.backward(retain_graph=True)
    y2.sum().backward()  # a second backward pass, through y2 only
    assert [(k.batch, k.grad, k.backward) for k in c.calls] == [(5, False, 0), (4, True, 1), (2, True, 2),
                                                                 (7, True, 0)]
    t = c.tally()["lin"]
    assert (t.calls, t.forward, t.backward) == (4, 18, 4 + 2 * 2)
    assert c.per_sample(6)["lin"] == (3.0, 8 / 6)
    assert unused.requires_grad
    c.reset()
    assert c.tally() == {}
    with pytest.raises(ValueError, match="positive"):
        c.per_sample(0)


def test_backward_is_counted_through_frozen_weights_to_the_input():
    """A frozen module (the teacher) still counts a backward when the gradient flows through it to its input
    (the GAN generator term); with nothing requiring grad upstream it counts none."""
    lin, c = nn.Linear(3, 3).requires_grad_(False), CallCounter()
    f = c.wrap(lin, "frozen")
    x = torch.randn(2, 3, requires_grad=True)
    f(x).sum().backward()
    f(torch.randn(2, 3))  # nothing needs grad: the output has no graph
    assert [(k.grad, k.backward) for k in c.calls] == [(True, 1), (False, 0)]
    with pytest.raises(TypeError, match="one tensor"):
        c.wrap(lambda x: (x, x), "pair")(x)


class Velocity(nn.Module):
    """A hand-made model callable v(x, t, context, pooled) with the MMDiT call signature."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x, t, context, pooled):
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1) / 1000) + pooled.mean(1).view(-1, 1, 1, 1)


def _iteration(recipe: FlashRecipe, B: int = 3):
    torch.manual_seed(0)
    teacher, student = Velocity().requires_grad_(False), Velocity()
    student.load_state_dict(teacher.state_dict())
    head = DiscriminatorHead(4, n_down=1, width=8)
    c = CallCounter()
    models = FlashModels(student=c.wrap(student, "student"), teacher=c.wrap(teacher, "teacher"),
                         features=c.wrap(teacher, "features"), head=head)
    g = torch.Generator().manual_seed(1)
    cond = (torch.randn(B, 2, 5, generator=g), torch.randn(B, 7, generator=g))
    batch = FlashBatch(torch.randn(B, 4, 8, 8, generator=g), cond, tuple(torch.zeros_like(x) for x in cond),
                       list(range(B)))
    update = OptimizerStep(torch.optim.AdamW([*student.parameters(), *head.parameters()]), clip=0.0)
    return c, head, lambda step: flash_step(models, recipe, batch, step, 0, update)


@pytest.mark.parametrize("d_pass", ["fresh", "reuse"])
def test_one_flash_iteration_makes_the_calls_the_recipe_implies(d_pass):
    B, K = 3, 6
    recipe = FlashRecipe(teacher_steps=K, phase_batches=(1, 1, 1), guidance_min=2.0, guidance_max=3.0, d_pass=d_pass)
    c, _, run = _iteration(recipe, B)
    fresh = d_pass == "fresh"
    for step in range(4):  # phase 0: distillation only; phases 1-3: DMD and GAN on
        c.reset()
        k = run(step)["k"]
        on = step > 0
        per = c.per_sample(B)
        assert per["teacher"] == (2 * (K - k) + 2 * on, 0.0), step  # CFG: one call on [neg, cond] = 2B rows
        assert per["student"] == (1 + on + fresh, 1.0), step  # G forward (+ DMD fake) (+ fresh D pass)
        assert per["features"] == (2 + on, 1.0 * on), step  # GAN term (grads to x0_hat), D's fake and real
        assert c.calls[0].name == "student" and c.calls[0].grad  # the student's x0 first, then the target solve


@pytest.mark.parametrize("target_steps", [0, 3])
def test_the_distill_recipe_calls_the_teacher_for_its_target_only(target_steps):
    """distill on noised-data starts (--chain-starts 0; its chain starts: test_flash_chain): one student forward
    and its backward, the teacher's CFG solve over recipe.target_sigmas(k), no
    DMD, no GAN, no discriminator pass: the features and the head are never called."""
    B = 3
    recipe = named_recipe("distill", chain_starts=0.0, teacher_steps=6, target_steps=target_steps,
                          phase_batches=(1, 1, 1),
                          guidance_min=2.0, guidance_max=3.0)
    c, head, run = _iteration(recipe, B)
    before = [p.clone() for p in head.parameters()]
    for step in range(4):
        c.reset()
        logs = run(step)
        solve = len(recipe.target_sigmas(logs["k"])) - 1
        if target_steps == 0:
            assert solve == 6 - logs["k"]  # the K-grid from sigma_k to 0
        per = c.per_sample(B)
        assert per == {"student": (1.0, 1.0), "teacher": (2.0 * solve, 0.0)}, step
        assert "d" not in logs and "grad_norm_d" not in logs and "dmd" not in logs and "adv" not in logs
    assert all(torch.equal(a, b) for a, b in zip(before, head.parameters(), strict=True))
