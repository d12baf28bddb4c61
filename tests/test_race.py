"""RACE's PGD step: the perturbation stays in its L-inf ball and brings the target closer; on SDXL it
perturbs the token sequence and keeps the pooled embedding; v-prediction outputs are turned into noise;
SD3 / Flux are refused before any work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efface.errors import InputError
from efface.methods import erase
from efface.models.families import family_of
from efface.methods.race import RACEConfig, pgd_embedding
from efface.models.diffusion import add_noise, predict
from efface.models.params import select
from efface.models.text import encode

from conftest import build_tiny_pipeline
from families import build

FAST_RACE = {"esd_iterations": 1, "iterations": 2, "pgd_steps": 2, "lr": 1e-2, "ddim_steps": 3, "batch_size": 2}


def _pgd_case(pipe, eps=0.5, steps=20, units="absolute"):
    from efface.models.families import family_of

    c = encode(pipe, ["a circle"])
    g = torch.Generator().manual_seed(0)
    shape = (1, *family_of(pipe).latent_shape(pipe))
    x_t, target = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor(500)

    def loss(cond):
        with torch.no_grad():
            return float(F.mse_loss(predict(pipe, x_t, t, cond), target))

    adv = pgd_embedding(pipe, c, x_t, t, target, eps, steps, torch.Generator().manual_seed(1), units=units)
    return c, adv, loss


def test_pgd_embedding_stays_in_the_ball_and_lowers_the_loss():
    pipe = build_tiny_pipeline()
    eps = 0.5
    c, adv, loss = _pgd_case(pipe, eps)
    assert (adv.embeds - c.embeds).abs().max() <= eps + 1e-6
    assert loss(adv) < loss(c)
    assert all(p.grad is None for p in pipe.unet.parameters())  # the model gets no gradient


def test_pgd_on_sdxl_perturbs_the_token_sequence_and_keeps_the_pooled_embedding():
    pipe = build("sdxl")
    eps = 0.5
    c, adv, loss = _pgd_case(pipe, eps)
    assert c.pooled is not None and torch.equal(adv.pooled, c.pooled)
    assert 0 < (adv.embeds - c.embeds).abs().max() <= eps + 1e-6
    assert loss(adv) < loss(c)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pgd_in_token_rms_units_gives_each_token_its_own_radius(family):
    pipe = build(family)
    eps = 0.05
    c, adv, loss = _pgd_case(pipe, eps, units="token_rms")
    rms = c.embeds.float().square().mean(-1, keepdim=True).sqrt()
    step = (adv.embeds - c.embeds).abs()
    assert (step <= eps * rms + 1e-6).all() and (step.amax(-1) > 0).any()
    assert torch.equal(adv.pooled, c.pooled)  # the pooled embedding stays clean, as on SDXL
    assert loss(adv) < loss(c)


def test_race_trains_its_parameter_set_on_sdxl():
    pipe = build("sdxl")
    pipe.set_progress_bar_config(disable=True)
    erased = erase(pipe, "race", ["circle"], seed=0, progress=False, train_method="xattn", **FAST_RACE)
    assert erased.tensors and set(erased.tensors) <= set(select(pipe, "xattn"))
    assert erased.manifest["base"]["family"] == "sdxl"


def test_predicted_noise_is_the_noise_on_v_prediction_models():
    pipe = build("sd2-v")
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    x_t, v = add_noise(pipe, x0, t, torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))  # add_noise's own draw
    family = family_of(pipe)
    torch.testing.assert_close(family.predicted_noise(pipe, x_t, t, v), noise, rtol=1e-4, atol=1e-5)
    eps_pipe = build_tiny_pipeline()
    out = torch.randn(1, 4, 16, 16)
    assert family.predicted_noise(eps_pipe, x_t[:1], 500, out) is out  # epsilon models: the output itself


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_race_on_joint_attention_families_perturbs_in_the_units_asked(family, monkeypatch):
    import efface.methods.race as race_module

    seen, pgd = [], race_module.pgd_embedding
    monkeypatch.setattr(race_module, "pgd_embedding", lambda *a, **k: seen.append(k["units"]) or pgd(*a, **k))
    pipe = build(family)
    pipe.set_progress_bar_config(disable=True)
    erased = erase(pipe, "race", ["circle"], seed=0, progress=False, epsilon_units="token_rms", **FAST_RACE)
    assert seen and set(seen) == {"token_rms"} and erased.manifest["config"]["epsilon_units"] == "token_rms"


def test_race_config_refuses_bad_values():
    with pytest.raises(InputError, match="epsilon"):
        RACEConfig(epsilon=0)
    with pytest.raises(InputError, match="epsilon_units"):
        RACEConfig(epsilon_units="relative")
    with pytest.raises(InputError, match="train_method"):
        RACEConfig(train_method="attn1")
