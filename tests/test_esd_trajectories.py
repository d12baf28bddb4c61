"""ESD's reused trajectories (``reuse_trajectories``, not the official schedule): a fifth of the
denoiser evaluations per iteration or less, the ESD objective still falls, and with the option off
(the default) the seeded draws are those of the official schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efface.errors import InputError
from efface.methods import erase
from efface.methods.esd import esd_target
from efface.models.diffusion import (count_denoiser_evaluations, frozen_copy, predict, sample_to, sample_trajectory,
                                     sampler)
from efface.models.families import Conditioning, family_of
from efface.models.text import encode

# the official schedule's step count and batch: 2 x 24.5 sampling evaluations per iteration on average;
# reused: one trajectory for all 20 iterations, each iteration one of its x_t
OFFICIAL = {"iterations": 20, "lr": 1e-3, "ddim_steps": 50, "batch_size": 1}


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    from efface import load_pipeline

    return load_pipeline(tiny_sd_dir)


def test_sample_trajectory_holds_every_partial_sample(pipe):
    c, empty = encode(pipe, ["a cat", "a dog"]), encode(pipe, [""])
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    path = sample_trajectory(pipe, c, empty, 3, 5, 3.0, torch.Generator(), x_T)
    assert path.shape == (4, *x_T.shape) and torch.equal(path[0], x_T)
    for k in range(4):
        assert torch.equal(path[k], sample_to(pipe, c, empty, k, 5, 3.0, torch.Generator(), x_T))


def _objective(pipe, frozen, x, steps, c, empty, timesteps) -> float:
    """ESD's loss of the pipeline's denoiser on fixed x_t (a trajectory no run saw)."""
    total = 0.0
    with torch.no_grad():
        for s in steps:
            n = len(x[s])
            e_0, e_p = predict(pipe, torch.cat([x[s], x[s]]), timesteps[s],
                               Conditioning.cat([empty.expand(n), c.expand(n)]), denoiser=frozen).chunk(2)
            total += F.mse_loss(predict(pipe, x[s], timesteps[s], c.expand(n)), esd_target(e_0, e_p, 1.0)).item()
    return total / len(steps)


def test_reused_trajectories_cost_a_fifth_and_the_loss_still_falls(pipe):
    with count_denoiser_evaluations() as official:
        erase(pipe, "esd-x", ["a cat"], seed=0, progress=False, **OFFICIAL)
    with count_denoiser_evaluations() as reused:
        erased = erase(pipe, "esd-x", ["a cat"], seed=0, progress=False, reuse_trajectories=20, **OFFICIAL)
    # one 49-step guided trajectory (98 evaluations) for all 20 iterations, then 3 per iteration
    assert reused.value == 2 * 49 + 3 * 20 == erased.manifest["unet_evaluations"]
    assert reused.value / OFFICIAL["iterations"] <= official.value / OFFICIAL["iterations"] / 5
    frozen = frozen_copy(family_of(pipe).denoiser(pipe))
    c, empty = encode(pipe, ["a cat"]), encode(pipe, [""])
    x = sample_trajectory(pipe, c.expand(4), empty, 49, 50, 3.0, torch.Generator().manual_seed(123), denoiser=frozen)
    steps, timesteps = [0, 10, 25, 40, 49], sampler(pipe, 50).timesteps
    before = _objective(pipe, frozen, x, steps, c, empty, timesteps)
    with erased.applied(pipe):
        after = _objective(pipe, frozen, x, steps, c, empty, timesteps)
    assert after < 0.5 * before


def test_the_default_keeps_the_official_draws_and_the_pool_is_checked(pipe):
    fast = {"iterations": 3, "lr": 1e-2, "ddim_steps": 4, "batch_size": 2, "templates": ("a {}", "the {}")}
    default = erase(pipe, "esd-u", ["cat"], seed=3, progress=False, **fast)
    off = erase(pipe, "esd-u", ["cat"], seed=3, progress=False, reuse_trajectories=0, trajectory_pool=3, **fast)
    pooled = erase(pipe, "esd-u", ["cat"], seed=3, progress=False, reuse_trajectories=2, trajectory_pool=3, **fast)
    assert default.tensors.keys() == off.tensors.keys() == pooled.tensors.keys()
    assert all(torch.equal(default.tensors[k], off.tensors[k]) for k in default.tensors)
    assert not all(torch.equal(default.tensors[k], pooled.tensors[k]) for k in default.tensors)
    assert default.manifest["unet_evaluations"] == off.manifest["unet_evaluations"]
    # refills at iterations 0 and 2: 3 trajectories of 3 guided steps each, then 3 evaluations per row
    assert pooled.manifest["unet_evaluations"] == 2 * (3 * 2 * 3) + 3 * 2 * 3
    race = erase(pipe, "race", ["cat"], seed=3, progress=False, esd_iterations=1, pgd_steps=1,
                 reuse_trajectories=2, **{**fast, "iterations": 2})
    assert race.tensors
    with pytest.raises(InputError, match=r"draws batch_size \(2\) distinct x_t from trajectory_pool x ddim_steps = 1"):
        erase(pipe, "esd-x", ["cat"], progress=False, reuse_trajectories=2, **{**fast, "ddim_steps": 1})
    with pytest.raises(InputError, match="trajectory_pool must be at least 1"):
        erase(pipe, "esd-x", ["cat"], progress=False, reuse_trajectories=2, trajectory_pool=0, **fast)
    with pytest.raises(InputError, match="reuse_trajectories must be >= 0"):
        erase(pipe, "esd-x", ["cat"], progress=False, reuse_trajectories=-1, **fast)
