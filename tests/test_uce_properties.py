"""UCE's closed form keeps its promise: erased keys map to the guide's values, preserved keys to
their old values, to the tolerance the regularised least-squares solution allows."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import build_tiny_pipeline

from efface.methods.base import ErasureRequest
from efface.methods.uce import UCE, SiteKeys, edit_maps, normal_matrices, uce_solve
from efface.methods.uce_keys import in_context
from efface.models.families import family_of
from efface.models.params import get_parameter, select
from efface.models.text import encode


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


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_concepts=st.integers(1, 4), n_pres=st.integers(0, 3),
       scales=st.sampled_from([(1.0, 1.0, 0.5), (1.0, 0.1, 0.1), (2.0, 0.0, 1e-3)]))
def test_the_stacked_solve_is_the_per_concept_one(seed, n_concepts, n_pres, scales):
    """UCE.edit stacks every concept's keys into one solve per layer (shared normal matrices):
    the same closed form as summing the concepts' terms one by one (uce_solve), guide values
    from other weights (RECE's originals) included."""
    g = torch.Generator().manual_seed(seed)
    se, sp, lamb = scales
    d_in, d_out = 12, 7
    w, w_guide = torch.randn(2, d_out, d_in, generator=g, dtype=torch.float64)
    n_rows = torch.randint(1, 4, (n_concepts,), generator=g).tolist()
    cs = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for n in n_rows]
    gs = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for n in n_rows]
    ps = [torch.randn(1, d_in, generator=g, dtype=torch.float64) for _ in range(n_pres)]
    ref = uce_solve(w, cs, [c @ w_guide.T for c in gs], ps, erase_scale=se, preserve_scale=sp, lamb=lamb)
    keys = SiteKeys(torch.cat(cs), torch.cat(gs), torch.cat(ps) if ps else torch.zeros(0, d_in, dtype=torch.float64))
    mat2, guide_erase, pp = normal_matrices(keys, erase_scale=se, preserve_scale=sp, lamb=lamb, device=w.device)
    new = torch.linalg.solve(mat2, lamb * w + se * w_guide @ guide_erase + w @ pp, left=False)  # pp: s_p P^T P
    torch.testing.assert_close(new, ref, atol=1e-9, rtol=1e-9)
    # the solve done once for every layer (edit_maps): W_new = W M_keep + W_guide M_guide, from the
    # keys or from their Gram matrices alone
    for k in (keys, keys.grams(w.device, torch.float64)):
        keep, guide = edit_maps(k, erase_scale=se, preserve_scale=sp, lamb=lamb, device=w.device)
        torch.testing.assert_close(w @ keep + w_guide @ guide, ref, atol=1e-9, rtol=1e-9)


def test_uce_without_concepts_is_the_identity():
    w_old = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(uce_solve(w_old, [], [], [], erase_scale=1, preserve_scale=1, lamb=0.5), w_old)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_pipeline()


def test_expanded_keys_sit_at_the_concept_in_every_template(tiny):
    tok = tiny.tokenizer
    templates = ("a {} on a red background", "a red {}", "{}, a picture")
    prompts, ends, guides, g_ends = in_context(tiny, ["circle"], templates, ["square"])
    last = tok("circle").input_ids[-2]
    assert prompts == ["circle", "a circle on a red background", "a red circle", "circle, a picture"]
    assert all(tok(p).input_ids[i] == last for p, [i] in zip(prompts, ends))
    assert guides == ["square", "a square on a red background", "a red square", "square, a picture"]
    assert all(tok(g).input_ids[i] == tok("square").input_ids[-2] for g, [i] in zip(guides, g_ends))
    _, _, empty, e_ends = in_context(tiny, ["circle"], ("a red {}",), [""])
    assert empty == ["", "a red"] and e_ends == [[0], [len(tok("a red").input_ids) - 2]]
    _, _, bare, _ = in_context(tiny, ["circle"], templates, ["square"], guide_template=False)
    assert bare == ["square"] * 4


def test_uce_in_context_maps_each_expanded_key_onto_its_guide(tiny):
    """The promise of the closed form, through the pipeline: with a tiny lambda every expanded
    concept key lands on the original value of its guide in the same context."""
    uce = UCE(expand_prompts=True, templates=("a red {}", "a {} on a blue background"), guide_context="template",
              lamb=1e-4)
    request = ErasureRequest.build(["circle"], None, ["square"], default_anchor="")
    keys = uce.keys(tiny, request)["sequence"]
    assert len(keys.erase) == len(keys.guide) == 3 and len(keys.preserve) == 3  # bare + two templates
    weights = select(tiny, "text_input")
    assert set(weights) == set(select(tiny, "xattn_kv"))  # on UNets: exactly the cross-attention K / V
    key = next(iter(weights))
    w_old = weights[key].detach().clone().double()
    with torch.no_grad():
        uce.edit(tiny, {"sequence": keys})
        w_new = weights[key].detach().double()
        torch.testing.assert_close(keys.erase.double() @ w_new.T, keys.guide.double() @ w_old.T, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(keys.preserve.double() @ w_new.T, keys.preserve.double() @ w_old.T,
                                   atol=2e-2, rtol=2e-2)
        weights[key].copy_(w_old.float())


def test_uce_options_are_checked_before_work():
    from efface.errors import InputError

    with pytest.raises(InputError, match="tokens must be one of last, all"):
        UCE(tokens="first")
    with pytest.raises(InputError, match=r"exactly one '\{\}'"):
        UCE(templates=("a red circle",))


# --- every family UCE declares, on the tiny pipelines of tests/families.py -------------------------

UCE_FAMILIES = ("sd", "sd2-v", "sdxl", "sd3", "flux")
REQUEST = ErasureRequest.build(["circle"], None, ["square"], default_anchor="")


@pytest.fixture(scope="module", params=UCE_FAMILIES)
def built(request):
    from families import build

    pipe = build(request.param)
    assert family_of(pipe).name in UCE.families
    return pipe


def _rows(seq: torch.Tensor, positions: list[int]) -> torch.Tensor:
    return torch.stack([seq[q] for q in positions])


def _module(pipe, key: str) -> torch.nn.Module:
    component, _, name = key.partition(".")
    return getattr(pipe, component).get_submodule(name.removesuffix(".weight"))


def test_uce_keys_are_the_concepts_states_at_its_positions_on_every_family(built):
    """Sequence keys: the token states at ``word_positions`` (SD3: a CLIP and a T5 row per prompt);
    pooled keys (SD3, Flux): one pooled embedding per prompt."""
    family = family_of(built)
    keys = UCE().keys(built, REQUEST)
    cond = encode(built, ["circle", "", "square"]).float()
    pos = [family.word_positions(built, "{}", w) for w in ("circle", "", "square")]
    assert len(pos[0]) == (2 if family.name == "sd3" else 1)
    for part, (k, i) in (("erase", (0, 0)), ("guide", (1, 1)), ("preserve", (2, 2))):
        torch.testing.assert_close(getattr(keys["sequence"], part), _rows(cond.embeds[k], pos[i]))
    reads = {s.reads for s in family.edit_sites(built)}
    assert reads == ({"sequence", "pooled"} if family.name in ("sd3", "flux") else {"sequence"})
    if "pooled" in reads:
        for part, k in (("erase", 0), ("guide", 1), ("preserve", 2)):
            torch.testing.assert_close(getattr(keys["pooled"], part), cond.pooled[k : k + 1])


def test_uce_all_tokens_run_from_the_word_to_the_end_of_each_part(built):
    family = family_of(built)
    keys = UCE(tokens="all").keys(built, REQUEST)["sequence"]
    seq = encode(built, ["circle", ""]).float().embeds
    starts = family.word_positions(built, "{}", "")
    ends = [*starts[1:], seq.shape[1]]
    erase, guide = [], []
    for q, g, e in zip(family.word_positions(built, "{}", "circle"), starts, ends):
        n = min(e - q, e - g)  # the erased prompt's rows and its guide's, trimmed to the shorter
        erase.append(seq[0, q : q + n]), guide.append(seq[1, g : g + n])
    torch.testing.assert_close(keys.erase, torch.cat(erase))
    torch.testing.assert_close(keys.guide, torch.cat(guide))


def _site_objective(w, w_old, keys: SiteKeys, lamb, se, sp):
    c, g, p = (k.double() for k in (keys.erase, keys.guide, keys.preserve))
    return (lamb * (w - w_old).pow(2).sum() + se * (c @ w.T - g @ w_old.T).pow(2).sum()
            + sp * (p @ w.T - p @ w_old.T).pow(2).sum())


def test_uce_edit_zeroes_the_gradient_of_its_objective_at_every_site(built):
    """At every edit site (Flux / SD3: the sequence and the pooled one) the edited weight is the
    minimiser of lamb ||W - W_old||^2 + ||C W^T - G W_old^T||^2 + ||P W^T - P W_old^T||^2."""
    uce = UCE()
    keys = uce.keys(built, REQUEST)
    sites = family_of(built).edit_sites(built)
    old = {s.key: get_parameter(built, s.key).detach().clone() for s in sites}
    try:
        uce.edit(built, keys)
        for site in sites:
            w_old = old[site.key].double()
            grads = []
            for w in (w_old.clone(), get_parameter(built, site.key).detach().double()):
                w.requires_grad_(True)
                _site_objective(w, w_old, keys[site.reads], 0.5, 1.0, 1.0).backward()
                grads.append(w.grad.norm())
            assert grads[1] < 1e-4 * grads[0], site.key
    finally:
        with torch.no_grad():
            for k, w in old.items():
                get_parameter(built, k).copy_(w)


def test_the_edited_layer_maps_the_erased_key_onto_the_guides_output(built):
    """Through fit() and the layers themselves (bias included): with a small lambda the erased
    concept's key gives the guide's original output and the preserved key its own; only the edit
    sites' weights change."""
    family = family_of(built)
    sites = family.edit_sites(built)
    keys = UCE().keys(built, REQUEST)
    originals = {s.key: copy.deepcopy(_module(built, s.key)) for s in sites}
    erased = UCE(lamb=1e-4).fit(built, REQUEST, progress=False)
    assert set(erased.tensors) == {s.key for s in sites}
    with erased.applied(built), torch.no_grad():
        for site in sites:
            k, layer, orig = keys[site.reads], _module(built, site.key), originals[site.key]
            for got, want in ((layer(k.erase), orig(k.guide)), (layer(k.preserve), orig(k.preserve))):
                assert (got - want).norm() < 1e-3 * want.norm(), site.key
            assert (layer(k.erase) - orig(k.erase)).norm() > 1e-2 * orig(k.erase).norm()  # it did change
