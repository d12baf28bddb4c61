"""Prompt templates shared by methods (and attacks) that put a concept into context.

A template is a string with one ``{}`` for the concept (``"a picture of a {}"``). Methods that use
them (``uce`` with ``expand_prompts``, ``ca``) take a ``templates`` option; on toy-sd the toy
presets (:mod:`efface.toy.presets`) fill it with the toy world's own training caption contexts
(:data:`efface.toy.world.TOY_CONTEXTS`).
"""

from __future__ import annotations

import torch

from efface.models.text import fill, word_end  # noqa: F401  (the templates' helpers, re-exported)


def filled(templates: tuple[str, ...], words) -> list[str]:
    """Every word in every template, row ``k * len(templates) + j`` = word ``k`` in template ``j``:
    the prompt table of methods that train a concept in context (ESD, Receler, AdvUnlearn)."""
    return [fill(t, w) for w in words for t in templates]


def draw_row(n_words: int, n_templates: int, generator: torch.Generator) -> int:
    """A uniform row of a :func:`filled` table: the word first, then (with several templates) the template."""
    row = int(torch.randint(n_words, (1,), generator=generator)) * n_templates
    if n_templates > 1:
        row += int(torch.randint(n_templates, (1,), generator=generator))
    return row
