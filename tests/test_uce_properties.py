"""UCE's closed form keeps its promise: erased keys map to the guide's values, preserved keys to
their old values, to the tolerance the regularised least-squares solution allows."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from efface.methods.uce import uce_solve


def _objective(w, w_old, ck, vk, cp, lamb, se, sp):
    return (lamb * (w - w_old).pow(2).sum() + se * (ck @ w.T - vk).pow(2).sum()
            + sp * (cp @ w.T - cp @ w_old.T).pow(2).sum())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_erase=st.integers(1, 3), n_pres=st.integers(0, 4))
def test_uce_maps_erased_key_to_guide_value_and_keeps_preserved(seed, n_erase, n_pres):
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = 16, 12
    w_old = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    ck = torch.randn(n_erase, d_in, generator=g, dtype=torch.float64)
    guide = torch.randn(n_erase, d_in, generator=g, dtype=torch.float64)
    vk = guide @ w_old.T
    cp = torch.randn(n_pres, d_in, generator=g, dtype=torch.float64)
    # a tiny lambda: the constraints are nearly exact (n_erase + n_pres <= d_in)
    w = uce_solve(w_old, [ck], [vk], [cp], erase_scale=1.0, preserve_scale=1.0, lamb=1e-6)
    torch.testing.assert_close(ck @ w.T, vk, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cp @ w.T, cp @ w_old.T, atol=1e-4, rtol=1e-4)
    # with the default lambda the solution is the minimiser: the gradient of the objective is zero
    w = uce_solve(w_old, [ck], [vk], [cp], erase_scale=1.0, preserve_scale=1.0, lamb=0.5).requires_grad_(True)
    _objective(w, w_old, ck, vk, cp, 0.5, 1.0, 1.0).backward()
    assert w.grad.abs().max() < 1e-8


def test_uce_without_concepts_is_the_identity():
    w_old = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(uce_solve(w_old, [], [], [], erase_scale=1, preserve_scale=1, lamb=0.5), w_old)
