"""UCE's ``preserve_empty`` (the paper-era code's preservation of "" over every token): the edited
layers keep the empty prompt's outputs, the edit is still the minimiser of its objective, and the
default (off) leaves the keys as they were."""

from __future__ import annotations

import pytest
import torch

from efface.errors import InputError
from efface.methods.base import ErasureRequest
from efface.methods.uce import UCE
from efface.methods.uce_keys import empty_keys
from efface.models.families import family_of
from efface.models.params import get_parameter
from efface.models.text import encode

REQUEST = ErasureRequest.build(["circle"], None, ["square"], default_anchor="")


def _drift(pipe, sites, old: dict[str, torch.Tensor], keys: dict[str, torch.Tensor]) -> float:
    """How far the edited layers move the "" keys' outputs from their old values (relative, summed over sites)."""
    total = 0.0
    for site in sites:
        k = keys[site.reads].double()
        w_new, w_old = get_parameter(pipe, site.key).detach().double(), old[site.key].double()
        total += float((k @ (w_new - w_old).T).norm() / (k @ w_old.T).norm())
    return total


@pytest.mark.parametrize("family", ["sd", "flux"])  # flux: the pooled site keeps "" too
def test_preserve_empty_keeps_the_empty_prompts_outputs_closer(family_pipe, family):
    pipe = family_pipe(family)
    sites = family_of(pipe).edit_sites(pipe)
    old = {s.key: get_parameter(pipe, s.key).detach().clone() for s in sites}
    empty = empty_keys(pipe)
    assert empty["sequence"].shape[0] == encode(pipe, [""]).embeds.shape[1]  # every token of the padded sequence
    drift = {}
    for on in (False, True):
        erased = UCE(preserve_empty=on).fit(pipe, REQUEST, progress=False)
        with erased.applied(pipe):
            drift[on] = _drift(pipe, sites, old, empty)
    assert drift[True] < 0.5 * drift[False], drift


def test_preserve_empty_edit_minimises_the_objective_with_the_empty_term(family_pipe):
    """lamb ||W - W_old||^2 + s_e ||C W^T - G W_old^T||^2 + s_p ||P (W - W_old)^T||^2 + s_0 ||E (W - W_old)^T||^2
    has zero gradient at the edited weight (E: every token of "", s_0 the empty scale)."""
    pipe = family_pipe("sd")
    uce = UCE(preserve_empty=True, empty_preserve_scale=2.0)
    keys = uce.keys(pipe, REQUEST)["sequence"]
    ((e, s_0),) = keys.weighted
    assert s_0 == 2.0
    site = family_of(pipe).edit_sites(pipe)[0]
    w_old = get_parameter(pipe, site.key).detach().clone()
    uce.edit(pipe, {"sequence": keys})
    c, g, p, e = (k.double() for k in (keys.erase, keys.guide, keys.preserve, e))
    w0 = w_old.double()
    grads = []
    for w in (w0.clone(), get_parameter(pipe, site.key).detach().double()):
        w.requires_grad_(True)
        objective = (0.5 * (w - w0).pow(2).sum() + (c @ w.T - g @ w0.T).pow(2).sum()
                     + (p @ (w - w0).T).pow(2).sum() + s_0 * (e @ (w - w0).T).pow(2).sum())
        objective.backward()
        grads.append(w.grad.norm())
    assert grads[1] < 1e-4 * grads[0]


def test_empty_scale_is_the_paper_era_default_unless_given():
    uce = UCE(preserve_empty=True).config
    assert [uce.empty_scale(n) for n in (0, 1, 3, 9, 50)] == [1.0, 0.5, 0.25, 0.1, 0.1]
    assert UCE(preserve_empty=True, empty_preserve_scale=0.3).config.empty_scale(50) == 0.3
    with pytest.raises(InputError, match="empty_preserve_scale"):
        UCE(empty_preserve_scale=-1.0)


def test_preserve_empty_is_off_by_default_and_adds_no_keys(family_pipe):
    pipe = family_pipe("sd")
    assert UCE().config.preserve_empty is False
    keys = UCE().keys(pipe, REQUEST)
    assert all(k.weighted == () for k in keys.values())
    assert all(k.grams(torch.device("cpu"), torch.float64).weighted is None for k in keys.values())
