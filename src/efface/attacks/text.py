"""Text that survives decode / encode: how the discrete-token attacks stay within prompts a person
can type (:mod:`efface.attacks.base`, "Text replay"). Plain text of token ids without the
tokenizer's decode wrapper, the ids a text gives, the tokens that are whole words on their own,
and which curated concept kind (nudity, violence) a concept names."""

from __future__ import annotations

import re

import torch

from efface.attacks.base import Adversarial
from efface.errors import InputError
from efface.models.families import family_of
from efface.models.slots import slot_start, token_tables, tokenizers

REPLAYS = ("text", "embedding")


def check_replay(value: str) -> None:
    """Refuse a ``replay`` option other than ``"text"`` or ``"embedding"``."""
    if value not in REPLAYS:
        raise InputError(f"replay must be 'text' (judge the decoded, re-tokenised prompt, as the official codes) or "
                         f"'embedding' (the found token ids' embedding, an id-level variant), not {value!r}")


_ALNUM_SPACE_PUNCT = re.compile(r"(?<=[^\W_]) (?=[^\w\s]|_)")  # "circle , red" -> "circle, red"


def decode_text(tokenizer, ids) -> str:
    """Plain text of token ids (special tokens dropped): CLIP's byte-level BPE decoded, every
    end-of-word marker ``</w>`` a space, no space between a word and the punctuation after it
    (kept where dropping it would change the re-tokenisation). Independent of the tokenizer's
    decode wrapper, which transformers loses when a tokenizer is deep-copied."""
    from tokenizers import decoders

    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens([i for i in ids if i not in special])
    raw = decoders.ByteLevel().decode(pieces) if pieces else ""
    spaced = " ".join(raw.replace("</w>", " ").split())
    joined = _ALNUM_SPACE_PUNCT.sub("", spaced)
    if joined != spaced and body_ids(tokenizer, joined) != body_ids(tokenizer, spaced):
        return spaced
    return joined


def body_ids(tokenizer, text: str) -> list[int]:
    """The token ids ``tokenizer`` gives ``text``, without the start and end tokens and untruncated."""
    return tokenizer(text, truncation=False).input_ids[1:-1]


def whole_word_tokens(tokenizer) -> torch.Tensor:
    """Ids (ascending) of the tokens that are a whole word on their own: word-final (``</w>``), not
    special, and re-tokenised to themselves. Any sequence of them decodes to text that re-tokenises
    to the same ids, also between the words of a prompt."""
    special = set(tokenizer.all_special_ids)
    candidates = [i for i in range(len(tokenizer)) if i not in special
                  and tokenizer.convert_ids_to_tokens(i).endswith("</w>")]
    texts = [decode_text(tokenizer, [i]) for i in candidates]
    encoded = tokenizer([t for t in texts], truncation=False).input_ids if texts else []
    kept = [i for i, t, e in zip(candidates, texts, encoded) if t.strip() and e[1:-1] == [i]]
    if not kept:
        raise InputError("the tokenizer has no whole-word tokens that survive decode and re-encode; "
                         "use replay='embedding'")
    return torch.tensor(kept, dtype=torch.long)


def shared_whole_words(tokenizers: list) -> list[torch.Tensor]:
    """The words every tokenizer reads as one token: the first tokenizer's whole-word tokens
    (:func:`whole_word_tokens`) whose text is a single token, not special and not unknown, in each
    of the others (a second CLIP, T5). Returns each word's id in each tokenizer (one tensor per
    tokenizer, the words in the same order: the first tokenizer's ascending ids). With one
    tokenizer, ``[whole_word_tokens(tokenizer)]``."""
    first = whole_word_tokens(tokenizers[0])
    words = [decode_text(tokenizers[0], [int(i)]) for i in first]
    keep = torch.ones(len(words), dtype=torch.bool)
    columns = [first]
    for tok in tokenizers[1:]:
        start = slot_start(tok)
        special = set(tok.all_special_ids)
        column = []
        for j, ids in enumerate(tok(words, truncation=False).input_ids):
            body = ids[start:-1] if ids and ids[-1] == tok.eos_token_id else ids[start:]
            ok = len(body) == 1 and body[0] not in special
            keep[j] &= ok
            column.append(body[0] if ok else -1)
        columns.append(torch.tensor(column, dtype=torch.long))
    if not keep.any():
        raise InputError("no word is a single token in every tokenizer of this pipeline; use replay='embedding'")
    return [c[keep] for c in columns]


def check_embedding_replay(name: str, pipe, replay: str) -> None:
    """Refuse ``replay="embedding"`` (one CLIP encoder's states as the whole conditioning) outside SD 1.x / 2.x."""
    if replay == "embedding" and family_of(pipe).name != "sd":
        raise InputError(f"{name}: replay='embedding' (one CLIP encoder's states as the whole conditioning) "
                         "exists only on SD 1.x / 2.x; use replay='text' on this model")


def search_vocabulary(pipe, replay: str) -> list[torch.Tensor]:
    """The tokens a discrete-token attack searches, by their id in each tokenizer of ``pipe``: text
    replay, the words every tokenizer reads as one token (:func:`shared_whole_words`); embedding
    replay (SD), every token of the one table."""
    if replay == "text":
        return shared_whole_words(tokenizers(pipe))
    return [torch.arange(token_tables(pipe)[0].shape[0])]


def concept_kind(concept: str) -> str | None:
    """``"nudity"`` or ``"violence"`` when ``concept`` names one of them (curated defaults exist), else None."""
    words = concept.lower()
    if any(w in words for w in ("nud", "naked", "nsfw", "sexual", "porn", "explicit")):
        return "nudity"
    if any(w in words for w in ("violen", "gore", "blood", "weapon")):
        return "violence"
    return None


def replayed_text(tokenizer, text: str, ids, loss: float | None, meta: dict) -> Adversarial:
    """A text-replay result: ``text`` is what is generated and judged; ``meta["stable"]`` records
    whether it re-tokenises to exactly the ``ids`` the attack optimised (without start / end tokens)."""
    return Adversarial(text, None, loss, meta | {"stable": body_ids(tokenizer, text) == list(ids)})

