"""AdvUnlearn's attack gradients: 'fresh' (default) feeds Adam each step's own gradient;
'accumulate' feeds it the official code's uncleared gradient (the running sum; with fast_at the
in-place sign of the previous sign plus the new gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_pipeline

from efface.errors import InputError
from efface.methods.advunlearn import AdvUnlearnConfig, prefix_attack
from efface.models.slots import prefixed_condition, prefixed_prompt
from efface.models.diffusion import predict
from efface.models.text import encode, token_embedding

STEPS = 5


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def problem(pipe):
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500)
    with torch.no_grad():
        e_p = predict(pipe, x_t, t, encode(pipe, ["a circle"])) + 0.1 * torch.randn(2, 4, 16, 16, generator=g)
    text = prefixed_prompt(pipe, "a circle", 2)
    start = [token_embedding(pipe.text_encoder).weight[torch.tensor([5, 9])].detach()]
    return text, start, (x_t, t, e_p)


def _run(pipe, problem, monkeypatch, signed: bool, accumulate: bool):
    """The attack's own gradients g_i and what Adam read at each step, G_i."""
    text, start, draw = problem
    raw, seen = [], []
    grad = torch.autograd.grad

    def spy(*args, **kwargs):
        out = grad(*args, **kwargs)
        raw.append(out[0].detach().clone())
        return out

    class Recording(torch.optim.Adam):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["params"][0].grad.detach().clone())
            return super().step(closure)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    monkeypatch.setattr(torch.optim, "Adam", Recording)
    adv, losses = prefix_attack(pipe, text, start, lambda: draw, STEPS, 0.05, signed, accumulate=accumulate)
    monkeypatch.undo()
    return raw, seen, adv, losses


@pytest.mark.parametrize("signed", [False, True])
def test_fresh_gradients_are_each_steps_own(pipe, problem, monkeypatch, signed):
    raw, seen, _, _ = _run(pipe, problem, monkeypatch, signed, accumulate=False)
    assert len(raw) == len(seen) == STEPS
    for g, got in zip(raw, seen):
        torch.testing.assert_close(got, g.sign() if signed else g, rtol=0, atol=0)


def test_accumulated_pgd_gradient_is_the_running_sum(pipe, problem, monkeypatch):
    raw, seen, _, _ = _run(pipe, problem, monkeypatch, False, accumulate=True)
    for i, got in enumerate(seen):
        torch.testing.assert_close(got, torch.stack(raw[: i + 1]).sum(0), rtol=1e-6, atol=1e-9)


def test_accumulated_fast_at_gradient_is_the_sign_of_previous_sign_plus_new(pipe, problem, monkeypatch):
    raw, seen, _, _ = _run(pipe, problem, monkeypatch, True, accumulate=True)
    previous = torch.zeros_like(raw[0])
    for g, got in zip(raw, seen):
        previous = (previous + g).sign()
        torch.testing.assert_close(got, previous, rtol=0, atol=0)
    # the official in-place sign freezes: the tiny model's gradients are far below 1
    assert max(float(g.abs().max()) for g in raw) < 1
    assert all(torch.equal(s, seen[0]) for s in seen)


def test_accumulated_attack_still_lowers_its_objective(pipe, problem, monkeypatch):
    text, start, (x_t, t, e_p) = problem

    def attack_loss(adv):
        with torch.no_grad():
            return float(F.mse_loss(predict(pipe, x_t, t, prefixed_condition(pipe, text, adv)), e_p))

    _, _, adv, _ = _run(pipe, problem, monkeypatch, False, accumulate=True)
    assert attack_loss(adv) < attack_loss(start)


def test_attack_grad_defaults_to_fresh_and_is_checked():
    assert AdvUnlearnConfig().attack_grad == "fresh"
    assert AdvUnlearnConfig(attack_grad="accumulate").attack_grad == "accumulate"
    with pytest.raises(InputError, match="attack_grad"):
        AdvUnlearnConfig(attack_grad="sum")
