"""RACE's PGD step: the perturbation stays in its L-inf ball and brings the target closer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efface.errors import InputError
from efface.methods.race import RACEConfig, pgd_embedding
from efface.models.diffusion import predict_noise
from efface.models.text import encode

from conftest import build_tiny_pipeline


def test_pgd_embedding_stays_in_the_ball_and_lowers_the_loss():
    pipe = build_tiny_pipeline()
    c = encode(pipe, ["a circle"])
    g = torch.Generator().manual_seed(0)
    x_t, target = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    t = torch.tensor(500)

    def loss(emb):
        with torch.no_grad():
            return float(F.mse_loss(predict_noise(pipe.unet, x_t, t, emb), target))

    eps = 0.5
    adv = pgd_embedding(pipe.unet, c, x_t, t, target, eps, 20, torch.Generator().manual_seed(1))
    assert (adv - c).abs().max() <= eps + 1e-6
    assert loss(adv) < loss(c)
    assert all(p.grad is None for p in pipe.unet.parameters())  # the model gets no gradient


def test_race_config_refuses_bad_values():
    with pytest.raises(InputError, match="epsilon"):
        RACEConfig(epsilon=0)
    with pytest.raises(InputError, match="train_method"):
        RACEConfig(train_method="attn1")
