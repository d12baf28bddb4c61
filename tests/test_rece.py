"""RECE keeps its promises: the derived embedding, passed through the current (edited) K/V
projections, reproduces the original model's outputs for the concept (to the tolerance the ridge
term allows), and an epoch of erasure moves that embedding's outputs onto the guide's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from efface.errors import InputError
from efface.methods import ErasureRequest
from efface.methods.rece import RECE, adversarial_embedding, derivation_map, prompt_embeddings, sequence_sites
from efface.methods.uce import Grams, edit_maps, uce_solve
from efface.models.families import family_of
from efface.models.params import get_parameter, select

D_IN = 8


def _layers(g: torch.Generator, n_layers: int) -> list[torch.Tensor]:
    """K and V projections of ``n_layers`` cross-attention layers, of varied widths."""
    widths = torch.randint(4, 13, (n_layers,), generator=g).tolist()
    return [torch.randn(w, D_IN, generator=g, dtype=torch.float64) for w in widths for _ in ("k", "v")]


def _ridge_objective(x, weights, targets, lamb):
    return sum((x @ w.T - y).pow(2).sum() for w, y in zip(weights, targets)) + lamb * x.pow(2).sum()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_layers=st.integers(1, 4), n_tokens=st.integers(1, 5),
       n_pres=st.integers(0, 3))
def test_derived_embedding_reproduces_original_outputs_after_a_uce_edit(seed, n_layers, n_tokens, n_pres):
    """A UCE edit with guide / preserved values from the same weights is W = W_orig M, one M for every
    layer: the system is consistent, so with a tiny lambda c' W^T = c W_orig^T for all layers at once."""
    g = torch.Generator().manual_seed(seed)
    originals = _layers(g, n_layers)
    erase, guide = torch.randn(2, n_tokens, D_IN, generator=g, dtype=torch.float64)
    keep = torch.randn(n_pres, D_IN, generator=g, dtype=torch.float64)
    edited = [uce_solve(w, [erase], [guide @ w.T], [keep], erase_scale=1.0, preserve_scale=1.0, lamb=0.5)
              for w in originals]
    concept = torch.randn(n_tokens, D_IN, generator=g, dtype=torch.float64)
    targets = [concept @ w.T for w in originals]
    derived = adversarial_embedding(edited, targets, 1e-12)
    for w, y in zip(edited, targets):
        # M may be ill-conditioned (about 1 example in 100: then ||c'|| is 1e4 .. 1e6): the residual
        # is rounding of the terms that cancel, relative to ||c'|| ||W||, not to ||y||
        assert (derived @ w.T - y).norm() <= 1e-6 * y.norm() + 1e-7 * derived.norm() * w.norm()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_layers=st.integers(1, 4), n_tokens=st.integers(1, 5),
       lamb=st.sampled_from([1e-3, 0.1, 1.0]))
def test_derived_embedding_minimises_the_ridge_objective(seed, n_layers, n_tokens, lamb):
    """With unrelated current weights no embedding reproduces the original outputs; the solution is
    the ridge minimiser: the objective's gradient vanishes there."""
    g = torch.Generator().manual_seed(seed)
    originals = _layers(g, n_layers)
    current = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in originals]
    concept = torch.randn(n_tokens, D_IN, generator=g, dtype=torch.float64)
    targets = [concept @ w.T for w in originals]
    derived = adversarial_embedding(current, targets, lamb).requires_grad_(True)
    _ridge_objective(derived, current, targets, lamb).backward()
    assert derived.grad.abs().max() < 1e-8 * max(1.0, sum(y.norm() for y in targets))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_layers=st.integers(1, 4), n_concepts=st.integers(1, 4),
       n_pres=st.integers(0, 3), lamb=st.sampled_from([1e-3, 0.1, 1.0]), original_guides=st.booleans())
def test_the_batched_round_is_the_per_concept_one(seed, n_layers, n_concepts, n_pres, lamb, original_guides):
    """A RECE round for all concepts at once (one derivation map R, the edit from the Gram matrices
    R^T C^T C R and G^T C R) equals deriving each concept's embedding on its own
    (adversarial_embedding) and erasing the stacked derived rows with UCE's per-concept sums."""
    g = torch.Generator().manual_seed(seed)
    originals = _layers(g, n_layers)
    current = [w + 0.3 * torch.randn(w.shape, generator=g, dtype=torch.float64) for w in originals]
    n_rows = torch.randint(1, 5, (n_concepts,), generator=g).tolist()
    concepts = [torch.randn(n, D_IN, generator=g, dtype=torch.float64) for n in n_rows]
    guides = [torch.randn(n, D_IN, generator=g, dtype=torch.float64) for n in n_rows]
    keep = torch.randn(n_pres, D_IN, generator=g, dtype=torch.float64)
    derived = [adversarial_embedding(current, [c @ w.T for w in originals], lamb) for c in concepts]
    r = derivation_map(current, originals, lamb)
    torch.testing.assert_close(torch.cat(concepts) @ r, torch.cat(derived), atol=1e-9, rtol=1e-9)
    c, gd = torch.cat(concepts), torch.cat(guides)
    grams = Grams(r.T @ (c.T @ c) @ r, (gd.T @ c) @ r, keep.T @ keep)
    keep_map, guide_map = edit_maps(grams, erase_scale=1.0, preserve_scale=0.1, lamb=0.1, device=c.device)
    for w, w_orig in zip(current, originals):
        w_guide = w_orig if original_guides else w
        ref = uce_solve(w, derived, [gi @ w_guide.T for gi in guides], [keep], erase_scale=1.0,
                        preserve_scale=0.1, lamb=0.1)
        torch.testing.assert_close(w @ keep_map + w_guide @ guide_map, ref, atol=1e-8, rtol=1e-8)


def test_adversarial_embedding_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="one target per weight"):
        adversarial_embedding([torch.eye(3)], [], 0.1)


@pytest.fixture(scope="module", params=sorted(RECE.families))
def tiny(request):
    """A tiny pipeline of each family RECE supports (tests/families.py), the original weights of the
    maps that read the token sequence (UNets: the K/V; SD3 / Flux: context_embedder), and RECE
    fitted with 0 and 1 epochs."""
    from families import build

    pipe = build(request.param)
    request = ErasureRequest.build(["circle"], preserve=["square"])
    originals = {k: get_parameter(pipe, k).detach().clone() for k in sequence_sites(pipe)}
    if family_of(pipe).name in ("sd", "sdxl"):
        assert set(originals) == set(select(pipe, "xattn_kv")) == set(select(pipe, "text_input"))
    else:
        assert [k.split(".")[1] for k in originals] == ["context_embedder"]  # transformer.context_embedder.weight
    uce_only = RECE(epochs=0).fit(pipe, request, progress=False)
    one_epoch = RECE(epochs=1).fit(pipe, request, progress=False)
    return pipe, request, originals, uce_only, one_epoch


def _weights(pipe, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: get_parameter(pipe, k).detach().clone() for k in like}


def _distance(weights: dict[str, torch.Tensor], x: torch.Tensor, targets: dict[str, torch.Tensor]) -> float:
    return sum(float((x @ weights[k].double().T - targets[k]).norm() ** 2) for k in targets) ** 0.5


def test_derived_embedding_reproduces_the_original_model_on_the_uce_edited_pipeline(tiny):
    pipe, request, originals, uce_only, _ = tiny
    concept = prompt_embeddings(pipe, list(request.concepts))
    with uce_only.applied(pipe):
        current = _weights(pipe, originals)
        exact = RECE(regular_scale=1e-12).derive(pipe, concept, originals)[0]
        default = RECE().derive(pipe, concept, originals)[0]
    targets = {k: concept[0].double() @ w.double().T for k, w in originals.items()}
    scale = sum(float(t.norm() ** 2) for t in targets.values()) ** 0.5
    # the concept itself no longer gives the original outputs: UCE changed them
    assert _distance(current, concept[0].double(), targets) > 1e-2 * scale
    # the derived one does, exactly with a tiny lambda (up to the float32 weights)
    assert _distance(current, exact, targets) < 1e-4 * scale
    # with the default lambda it is the minimiser of the ridge objective over all K/V layers
    weights = [w.double() for w in current.values()]
    default = default.clone().requires_grad_(True)
    _ridge_objective(default, weights, list(targets.values()), RECE().config.regular_scale).backward()
    assert default.grad.abs().max() < 1e-8 * scale


def test_an_epoch_moves_the_derived_embedding_onto_the_guide(tiny):
    pipe, request, originals, uce_only, one_epoch = tiny
    concept = prompt_embeddings(pipe, list(request.concepts))
    guide = prompt_embeddings(pipe, list(request.anchors))[0].double()
    with uce_only.applied(pipe):
        before = _weights(pipe, originals)
        derived = RECE().derive(pipe, concept, originals)[0]
    with one_epoch.applied(pipe):
        after = _weights(pipe, originals)
    guide_values = {k: guide @ w.double().T for k, w in before.items()}  # v* = W_current c_guide
    original_values = {k: concept[0].double() @ w.double().T for k, w in originals.items()}
    assert _distance(after, derived, guide_values) < 0.5 * _distance(before, derived, guide_values)
    assert _distance(after, derived, original_values) > _distance(before, derived, original_values)


def test_rece_changes_only_its_parameter_set_and_the_rounds_only_the_sequence_maps(tiny):
    pipe, _, originals, uce_only, one_epoch = tiny
    assert set(originals) <= set(uce_only.tensors) == set(one_epoch.tensors) <= set(select(pipe, "text_input"))
    changed = {k for k in one_epoch.tensors if not torch.equal(one_epoch.tensors[k], uce_only.tensors[k])}
    assert changed and changed <= set(originals)  # a round edits only what reads the token sequence


def test_options_are_checked():
    with pytest.raises(InputError, match="regular_scale"):
        RECE(regular_scale=0.0)
    with pytest.raises(InputError, match="guide_values"):
        RECE(guide_values="anchor")
    with pytest.raises(InputError, match="epochs"):
        RECE(epochs=-1)
