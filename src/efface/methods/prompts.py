"""Prompt templates shared by methods that put a concept into context.

A template is a string with one ``{}`` for the concept (``"a picture of a {}"``). Methods that use
them (``uce`` with ``expand_prompts``, ``ca``) take a ``templates`` option; the ``toy`` presets
fill it with :data:`TOY_CONTEXTS`, the toy world's own training caption contexts, as the official
codes use phrasings of the captions their models were trained on ("image of {}", ChatGPT captions).
"""

from __future__ import annotations

import torch

from efface.toy.world import COLOURS, STYLES

# toy-sd's training captions with the shape slot left open: "a red {}", "a striped picture of a red {}"
TOY_CONTEXTS: tuple[str, ...] = (
    "{}", "a {}", *(f"a {c} {{}}" for c in COLOURS),
    *(f"a {t} picture of a {c} {{}}" for c in COLOURS for t in STYLES),
)


def fill(template: str, word: str) -> str:
    """``template`` with ``word`` in its slot, spaces collapsed (``fill("a {}", "") == "a"``)."""
    return " ".join(template.format(word).split()).strip(" ,")


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


def word_end(tokenizer, template: str, word: str) -> int:
    """Index, in the tokenized :func:`fill` (start token included), of the last token of ``word``;
    for an empty word, of the last token before its slot (the start token if there is none)."""
    head = fill(template[: template.index("{}")] + "{}", word)
    return len(tokenizer(head).input_ids) - 2
