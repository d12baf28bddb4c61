"""Tokenizer helpers that need no model: prompt templates, token counts, the truncation check, where
a word's last token sits. Below the family seam (families use them for word positions and prompt
checks); :mod:`efface.models.text` re-exports them."""

from __future__ import annotations

from efface.errors import InputError


def fill(template: str, word: str) -> str:
    """``template`` with ``word`` in its slot, spaces collapsed (``fill("a {}", "") == "a"``)."""
    return " ".join(template.format(word).split()).strip(" ,")


def word_end(tokenizer, template: str, word: str) -> int:
    """Index, in the tokenized :func:`fill` (start token included), of the last token of ``word``;
    for an empty word, of the last token before its slot (the start token if there is none)."""
    head = fill(template[: template.index("{}")] + "{}", word)
    return len(tokenizer(head).input_ids) - 2


def token_count(tokenizer, text: str) -> int:
    """Tokens ``text`` takes, start and end tokens included, before any truncation."""
    return len(tokenizer(text, truncation=False).input_ids)


def check_fits(tokenizer, text: str, what: str = "concept") -> None:
    """Refuse ``text`` if it is empty or the tokenizer would truncate it."""
    if not text or not text.strip():
        raise InputError(f"empty {what}: give a word or phrase, e.g. 'circle'")
    n, limit = token_count(tokenizer, text), tokenizer.model_max_length
    if n > limit:
        raise InputError(f"{what} {text!r} takes {n} tokens but the tokenizer keeps {limit}; shorten it")
