"""MACE's preservation recipes: the official CFR weighs the preserved prompts with
train_preserve_scale squared (once in its cache, once in the solve), both closed forms with the
domain weight; the default ("paper", weight 1) is the closed form as before."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_pipeline

from efface.errors import InputError
from efface.methods.mace import MACE
from efface.methods.mace_closed_forms import ClosedFormStats, cfr_map, fuse
from efface.models.params import select

F64 = torch.float64


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_pipeline()


def test_recipe_weights():
    default = MACE(train_preserve_scale=0.3, fuse_preserve_scale=0.7).config
    assert (default.cfr_recipe, default.domain_weight) == ("paper", 1.0)
    assert default.cfr_preserve_weight() == 0.3 and default.fuse_preserve_weight() == 0.7  # exactly as before
    official = MACE(cfr_recipe="official", train_preserve_scale=1e-4, fuse_preserve_scale=1e-4,
                    domain_weight=8e3).config  # configs/celebrity/erase_cele_1.yaml
    assert official.cfr_preserve_weight() == pytest.approx(1e-8 * 8e3)
    assert official.fuse_preserve_weight() == pytest.approx(1e-4 * 8e3)
    paper = MACE(train_preserve_scale=1e-4, domain_weight=8e3).config
    assert paper.cfr_preserve_weight() == pytest.approx(1e-4 * 8e3)
    with pytest.raises(InputError, match="cfr_recipe"):
        MACE(cfr_recipe="cached")
    with pytest.raises(InputError, match="domain_weight"):
        MACE(domain_weight=-1.0)


def _stats(d: int, seed: int = 0) -> tuple[ClosedFormStats, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    k, s = torch.randn(2, 12, d, generator=g, dtype=F64)  # co-occurring keys, the anchor's at their positions
    p = torch.randn(5, d, generator=g, dtype=F64)  # preserved prompts' tokens
    e = torch.randn(2, 6, d, generator=g, dtype=F64)  # two concepts' prompt tokens
    return ClosedFormStats(k.T @ k, s.T @ k, e.transpose(1, 2) @ e, p.T @ p), (k, s, p, e)


@pytest.mark.parametrize("recipe", ["paper", "official"])
def test_refine_minimises_the_cfr_objective_of_its_recipe(tiny, recipe):
    """lamb ||W' - W||^2 + ||K W'^T - S W^T||^2 + c ||P (W' - W)^T||^2, c = s_p w (paper) or s_p^2 w
    (official), has zero gradient at every refined layer."""
    s_p, w_d, lamb = 0.5, 3.0, 2.0
    mace = MACE(cfr_recipe=recipe, train_preserve_scale=s_p, domain_weight=w_d, lamb=lamb)
    weights = select(tiny, "xattn_kv")
    old = {n: p.detach().clone() for n, p in weights.items()}
    stats, (k, s, p, _) = _stats(next(iter(old.values())).shape[1])
    c = s_p * s_p * w_d if recipe == "official" else s_p * w_d
    try:
        mace.refine(tiny, {"sequence": stats})
        for name, param in weights.items():
            w0 = old[name].double()
            want = w0 @ cfr_map(stats, lamb=lamb, preserve_scale=c)
            torch.testing.assert_close(param.detach().double(), want.float().double())
            grads = []
            for w in (w0.clone(), param.detach().double()):
                w.requires_grad_(True)
                objective = (lamb * (w - w0).pow(2).sum() + (k @ w.T - s @ w0.T).pow(2).sum()
                             + c * (p @ (w - w0).T).pow(2).sum())
                objective.backward()
                grads.append(w.grad.norm())
            assert grads[1] < 1e-4 * grads[0], name
    finally:
        with torch.no_grad():
            for name, param in weights.items():
                param.copy_(old[name])


@pytest.mark.parametrize("recipe", ["paper", "official"])
def test_fusion_weighs_preservation_with_the_domain_weight_once(tiny, recipe):
    """The fusion with either recipe is the closed form :func:`fuse` with preserve scale s_f w."""
    s_f, w_d, lamb = 0.2, 4.0, 1.5
    mace = MACE(cfr_recipe=recipe, fuse_preserve_scale=s_f, train_preserve_scale=0.5, domain_weight=w_d, lamb=lamb)
    weights = select(tiny, "xattn_kv")
    old = {n: p.detach().clone() for n, p in weights.items()}
    stats, (_, _, p, e) = _stats(next(iter(old.values())).shape[1], seed=1)
    g = torch.Generator().manual_seed(2)
    refined = {n: w + 0.1 * torch.randn(w.shape, generator=g) for n, w in old.items()}
    factors = [{n: (torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w.shape[1], generator=g))
                for n, w in old.items()} for _ in range(2)]
    try:
        with torch.no_grad():
            for name, param in weights.items():
                param.copy_(refined[name])
        mace.fuse_loras(tiny, {"sequence": stats}, old, refined, factors)
        for name, param in weights.items():
            w_ref, w_orig = refined[name].double(), old[name].double()
            values = [e_i @ (w_ref + b.double() @ a.double()).T for e_i, (b, a) in zip(e, (f[name] for f in factors))]
            want = fuse(w_ref, list(e), values, p, p @ w_orig.T, lamb=lamb, preserve_scale=s_f * w_d)
            torch.testing.assert_close(param.detach().double(), want, atol=1e-5, rtol=1e-5)
    finally:
        with torch.no_grad():
            for name, param in weights.items():
                param.copy_(old[name])
