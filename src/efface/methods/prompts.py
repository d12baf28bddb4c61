"""Prompt templates shared by methods that put a concept into context.

A template is a string with one ``{}`` for the concept (``"a picture of a {}"``). Methods that use
them (``uce`` with ``expand_prompts``, ``ca``) take a ``templates`` option; the ``toy`` presets
fill it with :data:`TOY_CONTEXTS`, the toy world's own training caption contexts, as the official
codes use phrasings of the captions their models were trained on ("image of {}", ChatGPT captions).
"""

from __future__ import annotations

from efface.toy.world import COLOURS, STYLES

# toy-sd's training captions with the shape slot left open: "a red {}", "a striped picture of a red {}"
TOY_CONTEXTS: tuple[str, ...] = (
    "{}", "a {}", *(f"a {c} {{}}" for c in COLOURS),
    *(f"a {t} picture of a {c} {{}}" for c in COLOURS for t in STYLES),
)


def fill(template: str, word: str) -> str:
    """``template`` with ``word`` in its slot, spaces collapsed (``fill("a {}", "") == "a"``)."""
    return " ".join(template.format(word).split()).strip(" ,")


def word_end(tokenizer, template: str, word: str) -> int:
    """Index, in the tokenized :func:`fill` (start token included), of the last token of ``word``;
    for an empty word, of the last token before its slot (the start token if there is none)."""
    head = fill(template[: template.index("{}")] + "{}", word)
    return len(tokenizer(head).input_ids) - 2
