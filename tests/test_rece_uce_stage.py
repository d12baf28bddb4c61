"""RECE's UCE stage is the first UCE release's edit: with ``uce_preserve_empty`` (default, as the
official checkpoints) "" is kept over every token at ``uce_preserve_scale``; off, it is efface
``uce`` without it."""

from __future__ import annotations

import pytest
import torch

from efface.methods.base import ErasureRequest
from efface.methods.rece import RECE
from efface.methods.uce import UCE

REQUEST = ErasureRequest.build(["circle"], None, ["square"], default_anchor="")


@pytest.fixture(scope="module")
def pipe(family_pipe):
    return family_pipe("sd")


@pytest.mark.parametrize("empty, scale", [(True, 1.0), (True, 0.1), (False, 1.0)])
def test_rece_uce_stage_is_uce_all_tokens_with_or_without_the_empty_prompt(pipe, empty, scale):
    rece = RECE(epochs=0, uce_preserve_empty=empty, uce_preserve_scale=scale).fit(pipe, REQUEST, progress=False)
    uce = UCE(tokens="all", preserve_scale=scale, preserve_empty=empty,
              empty_preserve_scale=scale).fit(pipe, REQUEST, progress=False)
    assert set(rece.tensors) == set(uce.tensors)
    for key, value in rece.tensors.items():
        torch.testing.assert_close(value, uce.tensors[key])


def test_rece_preserves_the_empty_prompt_in_its_uce_stage_by_default(pipe):
    assert RECE().config.uce_preserve_empty is True
    on = RECE(epochs=0).fit(pipe, REQUEST, progress=False)
    off = RECE(epochs=0, uce_preserve_empty=False).fit(pipe, REQUEST, progress=False)
    assert any(not torch.equal(on.tensors[k], off.tensors[k]) for k in on.tensors)
