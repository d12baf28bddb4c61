"""ESD's defaults and target against the official scripts: the newer diffusers scripts anchor the
target on the concept's prediction (their eta is efface's negative_guidance + 1), and esd-x-strict,
which only ``esd_sd.py`` has, takes that script's defaults."""

from __future__ import annotations

import torch

import efface.methods  # noqa: F401  (registers the methods)
from efface.methods.esd import ESDConfig, esd_target
from efface.registry import METHODS


def test_esd_sd_target_with_its_eta_2_is_effaces_negative_guidance_1():
    """``esd_sd.py``: ``e_from - eta' (e_p - e_0)`` with ``e_from = e_p``; its eta' = efface's eta + 1."""
    g = torch.Generator().manual_seed(0)
    e_0, e_p = torch.randn(2, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    for eta in (0.0, 1.0, 2.5):
        official = e_p - (eta + 1) * (e_p - e_0)
        torch.testing.assert_close(esd_target(e_0, e_p, eta), official)
    torch.testing.assert_close(esd_target(e_0, e_p, 0.0), e_0)  # esd_sdxl.py's eta 1: the empty prompt's prediction


def test_esd_x_strict_defaults_are_esd_sd_py_and_the_others_the_papers():
    strict = METHODS.get("esd-x-strict")().config
    assert (strict.iterations, strict.lr, strict.sample_with, strict.negative_guidance) == (200, 5e-5, "frozen", 1.0)
    assert (strict.start_guidance, strict.ddim_steps, strict.batch_size) == (3.0, 50, 1)
    for name in ("esd-x", "esd-u", "esd-all"):
        cfg = METHODS.get(name)().config
        assert type(cfg) is ESDConfig
        assert (cfg.iterations, cfg.lr, cfg.sample_with, cfg.negative_guidance) == (1000, 1e-5, "trained", 1.0)


def test_esd_x_strict_options_still_override_its_defaults():
    cfg = METHODS.get("esd-x-strict")(iterations=7, lr=1e-3, sample_with="trained").config
    assert (cfg.iterations, cfg.lr, cfg.sample_with) == (7, 1e-3, "trained")
