"""UCE's closed form keeps its promise: erased keys map to the guide's values, preserved keys to
their old values, to the tolerance the regularised least-squares solution allows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import build_tiny_pipeline

from efface.methods.base import ErasureRequest
from efface.methods.uce import UCE, in_context, uce_solve
from efface.models.params import select


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


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_pipeline()


def test_expanded_keys_sit_at_the_concept_in_every_template(tiny):
    tok = tiny.tokenizer
    templates = ("a {} on a red background", "a red {}", "{}, a picture")
    prompts, ends, guides, g_ends = in_context(tok, ["circle"], templates, ["square"])
    last = tok("circle").input_ids[-2]
    assert prompts == ["circle", "a circle on a red background", "a red circle", "circle, a picture"]
    assert all(tok(p).input_ids[i] == last for p, i in zip(prompts, ends))
    assert guides == ["square", "a square on a red background", "a red square", "square, a picture"]
    assert all(tok(g).input_ids[i] == tok("square").input_ids[-2] for g, i in zip(guides, g_ends))
    _, _, empty, e_ends = in_context(tok, ["circle"], ("a red {}",), [""])
    assert empty == ["", "a red"] and e_ends == [0, len(tok("a red").input_ids) - 2]
    _, _, bare, _ = in_context(tok, ["circle"], templates, ["square"], guide_template=False)
    assert bare == ["square"] * 4


def test_uce_in_context_maps_each_expanded_key_onto_its_guide(tiny):
    """The promise of the closed form, through the pipeline: with a tiny lambda every expanded
    concept key lands on the original value of its guide in the same context."""
    uce = UCE(expand_prompts=True, templates=("a red {}", "a {} on a blue background"), guide_context="template",
              lamb=1e-4)
    request = ErasureRequest.build(["circle"], None, ["square"], default_anchor="")
    erase_keys, guide_keys, preserve_keys = uce.keys(tiny, request)
    weights = select(tiny, "xattn_kv")
    key = next(iter(weights))
    w_old = weights[key].detach().clone().double()
    with torch.no_grad():
        uce.edit(tiny, erase_keys, guide_keys, preserve_keys)
        w_new = weights[key].detach().double()
        for c, g in zip(erase_keys, guide_keys):
            torch.testing.assert_close(c.double() @ w_new.T, g.double() @ w_old.T, atol=2e-2, rtol=2e-2)
        for c in preserve_keys:
            torch.testing.assert_close(c.double() @ w_new.T, c.double() @ w_old.T, atol=2e-2, rtol=2e-2)
        weights[key].copy_(w_old.float())


def test_uce_options_are_checked_before_work():
    from efface.errors import InputError

    with pytest.raises(InputError, match="tokens must be one of last, all"):
        UCE(tokens="first")
    with pytest.raises(InputError, match=r"exactly one '\{\}'"):
        UCE(templates=("a red circle",))
