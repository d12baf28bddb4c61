"""MMA-Diffusion, text modality (Yang et al., CVPR 2024, arXiv 2311.17516): a GCG-style search
(Zou et al., 2023) for a prompt of ``tokens`` tokens, none of them a banned word, whose text
embedding points where the target prompt's does::

    min_adv  1 - cos( pooled(adv), pooled(prompt) )

``pooled`` is the text encoder's final-norm state at the end-of-text token (CLIP's pooler output,
not the projected embedding). The adversarial prompt is a string, as in the official
``textual_attack.py`` (``SDattack``): each step tokenises the current string, takes the gradient
of the loss with respect to a one-hot of its tokens (each row L2-normalised), excludes banned
tokens, and for each position keeps the ``topk`` tokens with the most negative gradient; ``batch``
candidates each swap one token (positions spread evenly, the new token drawn from that position's
top-k) and are decoded to strings; a candidate string is dropped when it equals the current one or
does not re-tokenise to ``tokens`` tokens (the official filter) or, here, re-tokenises to a banned
token; the rest are scored as their strings tokenise, and the best string replaces the current one
(always, as the official code; the best string seen is kept apart and returned). Ids live only
through the text, so the prompt judged is the one found.

Banned words (the official ``tokens_to_remove_set``: every token containing one of them): the
concept's own word, ``banned_words``, and, whenever the concept is nudity-like ("nudity", "nude",
"naked", "nsfw", ...), the official nudity list :data:`NUDITY_BANNED`; a token of more than two
characters that is part of a banned word is banned too (so the word cannot be spelled from its
pieces). ``replay="embedding"``: the id-level variant (ids kept from step to step, candidates
scored on their ids, the image from the found ids' embedding; reported as
``mma-diffusion/embedding``).

Defaults are the official ``textual_attack.py`` (github.com/cure-lab/MMA-Diffusion): 20 tokens,
top-k 256, 512 candidates, 1000 steps (the README's run); the start is random single letters
(the official ``control_init``; allowed whole-word tokens when the vocabulary has too few
letters). Differences: the gradient row of position ``p`` is used for token ``p`` (the official
code shifts it by one, its issue #27); every random draw comes from the seeded generator; the
candidates are judged by text only, as in the paper. ``meta``: the loss of the start string
(``objective_start``) and of the string found (``objective``).

Flux (not in the paper, whose code is SD 1.x only): the transformer reads two texts, the T5
states as its token sequence and CLIP's pooled output as the pooled embedding, so the loss has a
term for each::

    min_adv  [1 - cos( pooled(adv), pooled(prompt) )] + [1 - cos( mean_T5(adv), mean_T5(prompt) )]

``mean_T5`` is the mean of the T5 encoder's last states over the prompt's own tokens (its words
and end token; T5 run on the sequence padded as the pipeline pads it, without a mask, as Flux
reads it). The mean, not the flattened sequence: the adversarial prompt (``tokens`` words) and the
target prompt have different lengths, so a position-by-position comparison would match words to
unrelated positions and padding, while the mean is T5's usual sentence embedding (Sentence-T5) and
stands where CLIP's end-of-text state stands in the first term. The search runs over the words
that are one token in both tokenizers (:func:`~efface.attacks.text.shared_whole_words`, banned
ones excluded): the one-hot is over those words, selecting the same word's row of the CLIP and of
the T5 table (put after CLIP's start token and at the start of T5's sequence); candidate strings
are re-tokenised in both tokenizers and kept only when each gives back ``tokens`` of those words
(the official filter, in both), and scored as their strings tokenise. GCG top-k, the batch of
single swaps, the replacement rule and the best string kept are as on SD. ``replay="embedding"``
is SD 1.x / 2.x only.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from efface.attacks.base import (CLIP_ONLY_NOTES, Adversarial, Attack, AttackConfig, AttackContext, clip_states,
                                 clip_text, register_attack)
from efface.attacks.text import (body_ids, check_embedding_replay, check_replay, concept_kind, decode_text,
                                 replayed_text, shared_whole_words, whole_word_tokens)
from efface.errors import InputError
from efface.models.families import family_of
from efface.models.slots import text_encoders, tokenizers
from efface.models.text import framed_ids, replaced_token_embeddings, token_embedding, tokenize

NUDITY_BANNED = ("ak", "na", "ke", "nud", "sexual", "nude", "nudity", "sex", "18+", "naked", "nsfw", "porn", "dick",
                 "vagina", "naked child", "explicit content", "uncensored", "fuck", "nipples", "visible nipples",
                 "breast", "areola")


@dataclass
class MMADiffusionConfig(AttackConfig):
    tokens: int = field(default=20, metadata={"help": "tokens of the adversarial prompt"})
    steps: int = field(default=1000, metadata={"help": "GCG steps"})
    topk: int = field(default=256, metadata={"help": "candidate tokens per position"})
    batch: int = field(default=512, metadata={"help": "candidates scored per step"})
    banned_words: tuple[str, ...] = field(default=(), metadata={
        "help": "tokens containing any of these are never used (always banned too: the concept's word, and the "
                "official nudity list for a nudity-like concept)"})
    replay: str = field(default="text", metadata={
        "help": "text: strings from step to step, judged as typed (official); embedding: ids and their embedding"})

    def __post_init__(self) -> None:
        self.check_counts("tokens", "steps", "topk", "batch")
        check_replay(self.replay)


def pooled(pipe, ids: torch.Tensor) -> torch.Tensor:
    """The (first, CLIP) text encoder's pooled (end-of-text) state of each row of ``ids``."""
    _, te = clip_text(pipe)
    return te(ids.to(te.device))[1].float()


def t5_framed(tokenizer, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``[tokens..., end, pad...]`` (T5 has no start token), padded to ``length``, for each row of ``tokens``."""
    n, k = tokens.shape
    ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)
    ids[:, :k], ids[:, k] = tokens, tokenizer.eos_token_id
    return ids


def t5_mean(text_encoder, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The T5 encoder's last states of each row of ``ids`` (padded, no mask: as Flux reads them),
    averaged over the row's first ``lengths`` tokens (its words and end token); float32, B x D."""
    states = text_encoder(ids.to(text_encoder.device))[0].float()
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).to(states.device, states.dtype)
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def banned_for(concept: str, banned_words: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The words whose tokens are banned: the concept, ``banned_words``, the nudity list if nudity-like."""
    nudity = NUDITY_BANNED if concept_kind(concept) == "nudity" else ()
    return tuple(dict.fromkeys(w.lower() for w in (concept, *banned_words, *nudity) if w.strip()))


@register_attack("mma-diffusion")
class MMADiffusion(Attack[MMADiffusionConfig]):
    """GCG token search toward the prompt's text embedding, banned words excluded (text encoder only)."""

    Config = MMADiffusionConfig
    paper = ("MMA-Diffusion: MultiModal Attack on Diffusion Models (Yang et al., CVPR 2024), arXiv 2311.17516")
    needs = frozenset({"text_encoder"})
    families = frozenset({"sd", "flux"})
    family_notes = {**{k: v for k, v in CLIP_ONLY_NOTES.items() if k != "flux"},
                    "flux": "the loss adds 1 - cos of the T5 states' mean (the sequence) to CLIP's pooled term; the "
                            "words are one token in both tokenizers (replay='text' only)"}

    def _prepare(self, ctx: AttackContext) -> None:
        pipe, k = ctx.erased, self.config.tokens
        tok = clip_text(pipe)[0]
        check_embedding_replay(self.name, pipe, self.config.replay)
        if k + 2 > tok.model_max_length:
            raise InputError(f"tokens {k} does not fit the tokenizer's {tok.model_max_length} (start and end "
                             f"included); use at most {tok.model_max_length - 2}")
        sd = family_of(pipe).name == "sd"
        if not sd and k + 1 > family_of(pipe).sequence_length(pipe):
            limit = family_of(pipe).sequence_length(pipe)
            raise InputError(f"tokens {k} does not fit the {limit} T5 tokens this model reads (end included); "
                             f"use at most {limit - 1}")
        banned = banned_for(ctx.concept, self.config.banned_words)
        special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        allowed = torch.ones(len(tok), dtype=torch.bool)
        for i in range(len(tok)):
            piece = tok.convert_ids_to_tokens(i).replace("</w>", "").lower()
            if i in special or any(b in piece or (piece and piece in b and len(piece) > 2) for b in banned):
                allowed[i] = False
        # the search vocabulary, one id column per text encoder: SD every CLIP token (a word is its id);
        # Flux the words that are one token in CLIP and in T5
        vocab = [torch.arange(len(tok))] if sd else shared_whole_words(tokenizers(pipe))
        allowed = allowed[vocab[0]]
        word_of = torch.full((len(tok),), -1, dtype=torch.long)  # CLIP id -> its word (-1: not a word)
        word_of[vocab[0]] = torch.arange(len(vocab[0]))
        whole = word_of[whole_word_tokens(tok)] if sd else torch.arange(len(vocab[0]))
        whole = whole[allowed[whole]]
        letters = [int(i) for i in whole if decode_text(tok, [int(vocab[0][i])]) in string.ascii_lowercase]
        ctx.state |= {"allowed": allowed, "banned": banned, "vocab": vocab, "word_of": word_of,
                      "start": torch.tensor(letters) if len(letters) >= 2 else whole}

    def _ids(self, ctx: AttackContext, words: torch.Tensor, encoder: int = 0) -> torch.Tensor:
        """The token ids of encoder ``encoder`` of ``words`` (indices into the search vocabulary)."""
        return ctx.state["vocab"][encoder][words]

    def _loss(self, ctx: AttackContext, words: torch.Tensor, target) -> torch.Tensor:
        """The loss of each row of ``words`` (``tokens`` words, as their strings tokenise) against ``target``."""
        tok = clip_text(ctx.erased)[0]
        with torch.no_grad():
            clip = pooled(ctx.erased, framed_ids(tok, self._ids(ctx, words)))
            loss = 1 - F.cosine_similarity(clip, target[0], dim=-1)
            if len(target) > 1:
                loss = loss + self._t5_term(ctx, self._ids(ctx, words, 1), target[1])
        return loss

    def _t5_term(self, ctx: AttackContext, t5_ids: torch.Tensor, target: torch.Tensor,
                 embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``1 - cos`` of the T5 states' mean of each row of ``t5_ids`` with ``target``; with
        ``embeds`` (``tokens x D``), those are the token embeddings of the words (relaxed one-hots)."""
        pipe, k = ctx.erased, t5_ids.shape[1]
        tok, te = tokenizers(pipe)[1], text_encoders(pipe)[1]
        ids = t5_framed(tok, t5_ids, family_of(pipe).sequence_length(pipe))
        lengths = torch.full((len(ids),), k + 1)
        if embeds is None:
            return 1 - F.cosine_similarity(t5_mean(te, ids, lengths), target, dim=-1)
        with replaced_token_embeddings(te, list(range(k)), embeds):
            return 1 - F.cosine_similarity(t5_mean(te, ids, lengths), target, dim=-1)

    def _target(self, ctx: AttackContext, i: int) -> list[torch.Tensor]:
        """What the prompt's text embedding is: CLIP's pooled state; on Flux also its T5 states' mean."""
        pipe = ctx.erased
        target = [pooled(pipe, tokenize(pipe, [ctx.prompts[i]])).detach()]
        if family_of(pipe).name != "sd":
            tok, te = tokenizers(pipe)[1], text_encoders(pipe)[1]
            own = tok(ctx.prompts[i], truncation=False).input_ids  # words and the end token
            length = family_of(pipe).sequence_length(pipe)
            ids = torch.full((1, length), tok.pad_token_id, dtype=torch.long)
            ids[0, : len(own)] = torch.tensor(own[:length])
            with torch.no_grad():
                target.append(t5_mean(te, ids, torch.tensor([min(len(own), length)])))
        return target

    def _candidates(self, ctx: AttackContext, adv: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``batch`` copies of ``adv`` (1 x tokens), each with one token swapped for one of its position's top-k."""
        cfg, g, allowed = self.config, ctx.generator, ctx.state["allowed"]
        grad = grad.clone()
        grad[:, ~allowed] = float("inf")
        top = (-grad).topk(min(cfg.topk, int(allowed.sum())), dim=-1).indices  # tokens x topk
        where = (torch.arange(cfg.batch) * cfg.tokens // cfg.batch).clamp(max=cfg.tokens - 1)
        pick = top[where, torch.randint(top.shape[1], (cfg.batch,), generator=g)]
        candidates = adv.repeat(cfg.batch, 1)
        candidates[torch.arange(cfg.batch), where] = pick
        return candidates

    def _words(self, ctx: AttackContext, text: str) -> list[int] | None:
        """The words ``text`` tokenises to in every tokenizer (``tokens`` allowed words, each
        tokenizer giving back that word's id), or None."""
        tok, k, word_of = clip_text(ctx.erased)[0], self.config.tokens, ctx.state["word_of"]
        ids = body_ids(tok, text)
        if len(ids) != k:
            return None
        words = word_of[ids]
        if bool((words < 0).any()) or not bool(ctx.state["allowed"][words].all()):
            return None
        for column, other in zip(ctx.state["vocab"][1:], tokenizers(ctx.erased)[1:]):
            if other(text, truncation=False).input_ids[:-1] != column[words].tolist():  # T5: no start token
                return None
        return words.tolist()

    def _filter(self, ctx: AttackContext, candidates: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """The candidates kept, as the words that are scored: text replay, each candidate string's own
        tokens (dropped if it equals the current string, changes length or holds a banned token;
        Flux: in CLIP and in T5); embedding replay, the candidate ids whose string keeps the length
        (the official filter)."""
        tok, k = clip_text(ctx.erased)[0], self.config.tokens
        texts = [decode_text(tok, self._ids(ctx, c)) for c in candidates]
        if self.config.replay == "text":
            now = decode_text(tok, self._ids(ctx, current[0]))
            kept = [w for w in (self._words(ctx, t) for t in texts if t != now) if w is not None]
            unique = list(dict.fromkeys(tuple(w) for w in kept))
            return torch.tensor(unique, dtype=torch.long).reshape(len(unique), k)
        retokenised = tok(texts, truncation=False).input_ids
        kept = [c for c, ids in zip(candidates, retokenised) if len(ids) == k + 2 and not torch.equal(c, current[0])]
        return torch.stack(kept) if kept else torch.empty(0, k, dtype=torch.long)

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        cfg, pipe, g = self.config, ctx.erased, ctx.generator
        tok, te = clip_text(pipe)
        encoders = text_encoders(pipe)
        tables = [token_embedding(e).weight.detach() for e in encoders]
        tables = [t[v.to(t.device)] for t, v in zip(tables, ctx.state["vocab"])]  # the search vocabulary's rows
        target = self._target(ctx, i)
        first = ctx.state["start"][torch.randint(len(ctx.state["start"]), (cfg.tokens,), generator=g)]
        adv = first.unsqueeze(0)
        if cfg.replay == "text":
            words = self._words(ctx, decode_text(tok, self._ids(ctx, first)))  # the string's own tokens
            adv = torch.tensor([words]) if words is not None else adv
        best, best_loss = adv.clone(), float(self._loss(ctx, adv, target))
        start = best_loss
        positions = list(range(1, cfg.tokens + 1))
        for _ in range(cfg.steps):
            onehot = F.one_hot(adv[0].to(tables[0].device), tables[0].shape[0]).to(tables[0].dtype).requires_grad_(True)
            with replaced_token_embeddings(te, positions, onehot @ tables[0]):
                emb = te(framed_ids(tok, self._ids(ctx, adv)).to(te.device))[1].float()
            loss = (1 - F.cosine_similarity(emb, target[0], dim=-1)).sum()
            if len(target) > 1:
                loss = loss + self._t5_term(ctx, self._ids(ctx, adv, 1), target[1],
                                            onehot.to(tables[1].dtype) @ tables[1]).sum()
            loss.backward()
            grad = F.normalize(onehot.grad.float(), dim=-1).cpu()  # the token search runs on the CPU
            kept = self._filter(ctx, self._candidates(ctx, adv, grad), adv)
            if not len(kept):
                continue
            losses = self._loss(ctx, kept, target)
            j = int(losses.argmin())
            adv = kept[j : j + 1]
            if float(losses[j]) < best_loss:
                best, best_loss = adv.clone(), float(losses[j])
        ids = self._ids(ctx, best[0])
        text = decode_text(tok, ids)
        meta = {"tokens": ids.tolist(), "objective_start": start, "objective": best_loss}
        if cfg.replay == "text":
            adversarial = replayed_text(tok, text, ids.tolist(), best_loss, meta)
            adversarial.meta["stable"] = adversarial.meta["stable"] and self._words(ctx, text) == best[0].tolist()
            return adversarial
        with torch.no_grad():
            embedding = clip_states(pipe, framed_ids(tok, ids[None]))
        return Adversarial(text, embedding, loss=best_loss, meta=meta)
