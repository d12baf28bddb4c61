"""Token slots before a prompt, in every text encoder of a pipeline at once.

The soft-prompt attacks (AdvUnlearn's inner attack, UnlearnDiffAtk) put ``k`` tokens before the
prompt and replace their token embeddings. A pipeline may read several encoders (SD: one CLIP;
SDXL: two CLIPs; SD3: two CLIPs and T5; Flux: CLIP for the pooled state and T5 for the sequence),
each with its own vocabulary, embedding table and positions (CLIP starts with a start token, T5 has
none). :func:`prefixed_prompt` writes a prompt with ``k`` placeholder words that are one token each in
every tokenizer, right after its start token where it has one; :func:`prefixed_condition` encodes it
through the pipeline's own ``encode_prompt`` with one ``k x D_i`` tensor of embeddings per encoder
put into those slots. Tokens that mean the same in every encoder (the same word) are the rows
:func:`token_tables` holds of each encoder's table.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch

from efface.errors import InputError
from efface.models.families import Conditioning, family_of
from efface.models.text import encode, replaced_token_embeddings, token_embedding

PLACEHOLDERS = ("a", "x", "!")  # slot words tried in turn: one token each in every tokenizer


def text_encoders(pipe) -> list[torch.nn.Module]:
    """Every text encoder of the pipeline, in the family's order (SD: one; SDXL: both CLIPs; SD3:
    CLIP-L, CLIP-G, T5; Flux: CLIP, T5)."""
    return [getattr(pipe, n) for n in family_of(pipe).text_encoders if getattr(pipe, n, None) is not None]


def tokenizers(pipe) -> list:
    """The tokenizer of each of :func:`text_encoders`, in the same order."""
    return [getattr(pipe, n) for n in family_of(pipe).tokenizers if getattr(pipe, n, None) is not None]


def slot_start(tokenizer) -> int:
    """The position of the first token after the start token: 1 where the tokenizer starts every
    sequence with one (CLIP), 0 where it has none (T5)."""
    bos = tokenizer.bos_token_id
    return int(bos is not None and tokenizer("x", truncation=False).input_ids[0] == bos)


def _slots_at_start(tokenizer, text: str, prompt: str, k: int) -> bool:
    ids, own = tokenizer(text, truncation=False).input_ids, tokenizer(prompt, truncation=False).input_ids
    s = slot_start(tokenizer)
    slot = ids[s] if len(ids) > s else None
    return (len(ids) == len(own) + k and ids[:s] == own[:s] and ids[s + k :] == own[s:]
            and all(i == slot for i in ids[s : s + k]) and slot not in (tokenizer.eos_token_id, tokenizer.bos_token_id))


def prefixed_prompt(pipe, prompt: str, k: int) -> str:
    """``prompt`` with ``k`` placeholder words before it: in every tokenizer of the pipeline, the
    prompt's own tokens with ``k`` slots right after the start token (or first, without one), which
    :func:`prefixed_condition` fills. A slot is a single token that is neither the start nor the end
    token (CLIP pools its output at the first end token)."""
    for word in PLACEHOLDERS:
        text = " ".join([word] * k + [prompt])
        if all(_slots_at_start(tok, text, prompt, k) for tok in tokenizers(pipe)):
            return text
    raise InputError(f"no placeholder word is a single token before {prompt!r} in every tokenizer of this pipeline")


def check_prefix_fits(pipe, prompt: str, k: int, option: str) -> None:
    """Refuse ``prompt`` when ``k`` more tokens would not fit one of the pipeline's tokenizers."""
    for tok in tokenizers(pipe):
        n = len(tok(prompt, truncation=False).input_ids)
        if n + k > tok.model_max_length:
            raise InputError(f"{prompt!r} takes {n} tokens; with {k} adversarial tokens it exceeds the "
                             f"tokenizer's {tok.model_max_length}: shorten it or lower {option}")


def token_tables(pipe) -> list[torch.Tensor]:
    """The token embedding table of each of :func:`text_encoders`."""
    return [token_embedding(te).weight for te in text_encoders(pipe)]


def prefixed_condition(pipe, text: str, adv: Sequence[torch.Tensor]) -> Conditioning:
    """The conditioning of ``text`` (from :func:`prefixed_prompt`) whose ``k`` slot embeddings are
    ``adv`` (one ``k x D_i`` tensor per :func:`text_encoders` entry), through the pipeline's own
    prompt encoding; differentiable in ``adv`` and in the encoders' parameters where gradients are
    enabled. Every other position keeps its own token embedding."""
    k = adv[0].shape[0] if len(adv) else 0
    starts = [slot_start(t) for t in tokenizers(pipe)]
    return condition_at(pipe, text, [list(range(s, s + k)) for s in starts], adv)


def slot_positions(pipe, text: str, positions: Sequence[int]) -> list[list[int]]:
    """Where the tokens at ``positions`` of the first tokenizer's encoding of ``text`` are in every
    tokenizer's encoding of it (first: ``positions`` themselves): each must be a whole word that
    every tokenizer reads as one token (found by its characters, the tokenizers' offset mappings)."""
    toks = tokenizers(pipe)
    spans = [tuple(toks[0](text, truncation=False, return_offsets_mapping=True).offset_mapping[j]) for j in positions]
    out = [list(positions)]
    for tok in toks[1:]:
        offsets = [tuple(o) for o in tok(text, truncation=False, return_offsets_mapping=True).offset_mapping]
        where = []
        for span in spans:
            hits = [j for j, o in enumerate(offsets) if o == span]
            if len(hits) != 1:
                raise InputError(f"the slot {text[span[0]:span[1]]!r} of {text!r} is not one token in every tokenizer "
                                 "of this pipeline")
            where.append(hits[0])
        out.append(where)
    return out


def word_slot(pipe, before: str, after: str) -> tuple[str, list[list[int]]]:
    """``before``, a placeholder word, ``after`` (spaces normalised) as one text, and the placeholder's
    position in every tokenizer's encoding of it (one ``[j]`` per :func:`tokenizers` entry, for
    :func:`condition_at`): the first of :data:`PLACEHOLDERS` that every tokenizer reads as one token
    there (found by its characters, the tokenizers' offset mappings)."""
    before, after = " ".join(before.split()), " ".join(after.split())
    for word in PLACEHOLDERS:
        text = " ".join(part for part in (before, word, after) if part)
        start = len(before) + bool(before)
        where = []
        for tok in tokenizers(pipe):
            offsets = [tuple(o) for o in tok(text, truncation=False, return_offsets_mapping=True).offset_mapping]
            hits = [j for j, o in enumerate(offsets) if o == (start, start + len(word))]
            if len(hits) != 1:
                break
            where.append(hits)
        else:
            return text, where
    raise InputError(f"no placeholder word is a single token between {before!r} and {after!r} in every tokenizer "
                     "of this pipeline")


def condition_at(pipe, text: str, positions: Sequence[Sequence[int]], adv: Sequence[torch.Tensor]) -> Conditioning:
    """The conditioning of ``text`` with the token embeddings at ``positions[i]`` of encoder ``i``
    (:func:`slot_positions`) replaced by ``adv[i]`` (``len(positions[i]) x D_i``), through the
    pipeline's own prompt encoding; differentiable as :func:`prefixed_condition`."""
    encoders = text_encoders(pipe)
    if len(adv) != len(encoders):
        raise ValueError(f"{len(adv)} adversarial embeddings for {len(encoders)} text encoders")
    with ExitStack() as stack:
        for te, where, embeds in zip(encoders, positions, adv):
            stack.enter_context(replaced_token_embeddings(te, list(where), embeds))
        return encode(pipe, [text], grad=torch.is_grad_enabled())
