"""UCE's keys: the prompts encoded once per batch (only as far as the longest prompt where that is
exact), and the rows each prompt gives at its concept's tokens, per part of the token sequence.
Shared by the closed forms built on UCE (RECE, MACE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from efface.models.families import Conditioning, family_of
from efface.models.text import encode, fill, token_count


ENCODE_BATCH = 32  # prompts per text-encoder call when collecting keys


@dataclass(frozen=True)
class PromptKeys:
    """The keys one prompt gives: per part of the token sequence (one per text encoder it carries,
    :func:`part_starts`), its rows (n_j x d); and its pooled embedding (1 x P), if the family has one."""

    parts: tuple[torch.Tensor, ...]
    pooled: torch.Tensor | None


def part_starts(pipe) -> list[int]:
    """Where each text encoder's part of :attr:`Conditioning.embeds` begins, in the order of
    ``family.word_positions`` (SD, SDXL, Flux: ``[0]``; SD3: the CLIP part and the T5 part): the
    positions of the empty word, the first token of each part."""
    return family_of(pipe).word_positions(pipe, "{}", "")


def fits(pipe, text: str) -> bool:
    """Whether every tokenizer of the pipeline keeps all of ``text``."""
    toks = [getattr(pipe, name, None) for name in family_of(pipe).tokenizers]
    return all(token_count(t, text) <= t.model_max_length for t in toks if t is not None)


Encodings = dict[tuple[str, bool], Conditioning]  # (prompt, trimmed) -> its conditioning (one row)


@torch.no_grad()
def encode_each(pipe, prompts: list[str], *, trim: bool = False, cache: Encodings | None = None) -> list[Conditioning]:
    """Each prompt's conditioning (one row, float32), every distinct prompt not yet in ``cache``
    encoded once, in batches (:func:`_batches`). ``trim``: each batch only as far as its longest
    prompt where the family's text encoders are causal (``Family.encode``; rows of different
    batches may then differ in length). ``cache`` (filled here) shares encodings between calls
    (RECE: its UCE stage and its rounds)."""
    cache = {} if cache is None else cache
    todo = list(dict.fromkeys(p for p in prompts if (p, trim) not in cache))
    for chunk in _batches(pipe, todo, trim):
        cond = encode(pipe, chunk, trim=trim).float()
        for r, prompt in enumerate(chunk):
            cache[prompt, trim] = cond[r]
    return [cache[p, trim] for p in prompts]


def _batches(pipe, prompts: list[str], trim: bool) -> list[list[str]]:
    """:data:`ENCODE_BATCH` prompts per batch; trimmed on a causal family, prompts of one token
    count per batch (no padding at all), as many as fill the tokens of a full-length batch (the
    same memory; each encoder call reads all the encoder's weights, so few, full calls)."""
    family = family_of(pipe)
    if not (trim and family.causal_text):
        return [prompts[b : b + ENCODE_BATCH] for b in range(0, len(prompts), ENCODE_BATCH)]
    tok = family.tokenizer(pipe)
    budget = ENCODE_BATCH * tok.model_max_length
    batches: list[list[str]] = []
    last = None
    for n, prompt in sorted((token_count(tok, p), p) for p in prompts):
        if n != last or (len(batches[-1]) + 1) * n > budget:
            batches.append([])
            last = n
        batches[-1].append(prompt)
    return batches


@torch.no_grad()
def concept_keys(pipe, prompts: list[str], tokens: str, positions: list[list[int]],
                 cache: Encodings | None = None) -> list[PromptKeys]:
    """UCE's keys of ``prompts`` (float32, on the text encoders' device), through :func:`encode_each`
    (every distinct prompt once; ``"last"``: encoded only as far as the longest prompt of its
    batch where the encoders are causal).

    ``positions[i]``: the rows of prompt ``i`` that hold the concept's last token, one per part of
    the sequence (``family.word_positions``, as :func:`in_context` gives them). ``"last"``: those
    rows; ``"all"``: in each part, that row and every later one to the part's end (the padded
    length: SD 77 CLIP tokens, Flux the T5 sequence, SD3 each of both).
    """
    starts = part_starts(pipe)
    out = []
    for prompt, cond, pos in zip(prompts, encode_each(pipe, prompts, trim=tokens == "last", cache=cache), positions,
                                 strict=True):
        seq = cond.embeds[0]
        ends = [*starts[1:], len(seq)]
        if len(pos) != len(starts) or not all(s <= q < e for q, s, e in zip(pos, starts, ends)):
            raise ValueError(f"positions {pos} of {prompt!r} do not lie in the sequence's parts "
                             f"{list(zip(starts, ends))}")
        parts = tuple(seq[q : q + 1] if tokens == "last" else seq[q:e] for q, e in zip(pos, ends))
        out.append(PromptKeys(parts, cond.pooled))
    return out


def in_context(pipe, words: list[str], templates: tuple[str, ...],
               guides: list[str] | None = None, guide_template: bool = True) -> tuple[list, list, list, list]:
    """Each word alone and in every template (pairs a tokenizer would truncate are left out), with
    the positions of the word's last token in each prompt (``family.word_positions``: one per part
    of the sequence); with ``guides`` (one per word), the row-aligned guide prompts and their
    positions: the guide in the same template, or bare (``guide_template=False``)."""
    family = family_of(pipe)
    prompts, ends, g_prompts, g_ends = [], [], [], []
    for i, w in enumerate(words):
        for t in ("{}", *templates):
            gt = t if guide_template else "{}"
            texts = [fill(t, w)] + ([fill(gt, guides[i])] if guides is not None else [])
            if not all(fits(pipe, x) for x in texts):
                continue
            prompts.append(texts[0]), ends.append(family.word_positions(pipe, t, w))
            if guides is not None:
                g_prompts.append(texts[1]), g_ends.append(family.word_positions(pipe, gt, guides[i]))
    return prompts, ends, g_prompts, g_ends


@torch.no_grad()
def empty_keys(pipe, cache: Encodings | None = None) -> dict[str, torch.Tensor]:
    """The empty prompt's keys as the paper-era code preserved them: ``"sequence"``, every token of
    the padded sequence (start, end and padding tokens; SD3: both parts), and ``"pooled"``, its
    pooled embedding, where the family has one."""
    (cond,) = encode_each(pipe, [""], cache=cache)
    keys = {"sequence": cond.embeds[0]}
    if cond.pooled is not None:
        keys["pooled"] = cond.pooled
    return keys
