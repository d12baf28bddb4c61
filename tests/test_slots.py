"""Token slots before a prompt in every text encoder at once (efface.models.slots), on every family:
CLIP starts with a start token, T5 has none, and each encoder has its own table."""

from __future__ import annotations

import pytest
import torch

from efface.errors import InputError
from efface.models.slots import (check_prefix_fits, prefixed_condition, prefixed_prompt, slot_start, text_encoders,
                                 token_tables, tokenizers)
from efface.models.text import encode
from tests.families import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_slots_hold_the_placeholders_own_rows_and_move_the_conditioning(family, family_pipe):
    pipe = family_pipe(family)
    k = 2
    text = prefixed_prompt(pipe, "a red circle", k)
    own = []
    for tok, table in zip(tokenizers(pipe), token_tables(pipe)):
        s = slot_start(tok)
        assert s == (0 if "T5" in type(tok).__name__ else 1)
        ids = tok(text).input_ids
        own.append(table[torch.tensor(ids[s : s + k])].detach())
    with torch.no_grad():
        plain = encode(pipe, [text])
        same = prefixed_condition(pipe, text, own)
    torch.testing.assert_close(same.embeds, plain.embeds, rtol=0, atol=0)
    if plain.pooled is not None:
        torch.testing.assert_close(same.pooled, plain.pooled, rtol=0, atol=0)
    for e in range(len(own)):  # a perturbation in one encoder's slots alone reaches the conditioning
        moved = [o + 1.0 if j == e else o for j, o in enumerate(own)]
        with torch.no_grad():
            out = prefixed_condition(pipe, text, moved)
        changed = not torch.allclose(out.embeds, plain.embeds) or (
            plain.pooled is not None and not torch.allclose(out.pooled, plain.pooled))
        assert changed, (family, type(text_encoders(pipe)[e]).__name__)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_slots_are_differentiable_and_refuse_prompts_that_would_not_fit(family, family_pipe):
    pipe = family_pipe(family)
    text = prefixed_prompt(pipe, "a circle", 3)
    adv = [t[:3].detach().clone().requires_grad_(True) for t in token_tables(pipe)]
    cond = prefixed_condition(pipe, text, adv)
    (cond.embeds.square().sum() + (cond.pooled.square().sum() if cond.pooled is not None else 0)).backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in adv)
    long = " ".join(["circle"] * 20)
    with pytest.raises(InputError, match="lower tokens"):
        check_prefix_fits(pipe, long, 10, "tokens")
