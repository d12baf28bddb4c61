"""toy-sd's text encoder: a small ``CLIPTextModel`` pre-trained on every toy caption.

It stands in for CLIP's web-scale pre-training, so it sees train *and* held-out words: heads on the
pooled (end-of-text) state and on the mean token state predict the caption's shape, colour and
style (or "not named"), which makes synonyms land close to their concept. It is then frozen.
"""

from __future__ import annotations

import random
import re

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from efface.toy.loop import StepRandom
from efface.toy.world import AXES, SPLITS, SYNONYMS, axis_of, caption, random_scene

HIDDEN = 64


def text_config(vocab_size: int, max_length: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        projection_dim=HIDDEN,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def labelled_caption(rng: random.Random) -> tuple[str, list[int], list[int]]:
    """A caption from any split (or a bare concept phrase, or ""), its labels and where they end.

    Labels index each axis' concepts; the extra last index means "this axis is not named". Ends are
    the character offsets at which each named axis' word ends (-1 when not named).
    """
    none = [len(names) for names in AXES.values()]
    ends = [-1] * len(AXES)
    r = rng.random()
    if r < 0.05:
        return "", none, ends
    if r < 0.25:  # a bare concept word or phrase, as erasure methods prompt with
        concept = rng.choice(list(SYNONYMS))
        axis = list(AXES).index(axis_of(concept))
        labels = list(none)
        labels[axis] = AXES[axis_of(concept)].index(concept)
        phrase = rng.choice(SYNONYMS[concept][rng.randrange(2)])
        ends[axis] = len(phrase)
        return phrase, labels, ends
    scene = random_scene(rng)
    text, named, words = caption(scene, rng, rng.choice(SPLITS), with_words=True)
    labels = []
    for i, (axis, lab) in enumerate(zip(AXES, scene.labels())):
        labels.append(lab if named[axis] else none[i])
        if named[axis]:
            ends[i] = re.search(rf"\b{re.escape(words[axis])}\b", text).end()
    return text, labels, ends


class TextPretrainer(torch.nn.Module):
    """The text encoder plus the label heads used only during pre-training."""

    def __init__(self, encoder: CLIPTextModel, tokenizer: CLIPTokenizer, batch: int = 256):
        super().__init__()
        self.encoder, self.tokenizer, self.batch = encoder, tokenizer, batch
        self.heads = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, len(n) + 1) for n in AXES.values())

    def loss(self, r: StepRandom) -> torch.Tensor:
        """Cross-entropy of the labels from the pooled state, and, at every token, of the labels
        named up to that token (the encoder is causal, so later tokens can know more)."""
        rng = random.Random(int(r.np.integers(2**62)))
        texts, labels, ends = zip(*(labelled_caption(rng) for _ in range(self.batch)))
        enc = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt", return_offsets_mapping=True)
        out = self.encoder(enc.input_ids)
        target = torch.tensor(labels)  # B x axes
        none = torch.tensor([len(n) for n in AXES.values()])
        # token index from which each axis is known: the first token whose span reaches the word's end
        tok_end = enc.offset_mapping[..., 1]  # B x T (0 for special tokens)
        known_from = torch.full(target.shape, 10**6)
        for b, row in enumerate(ends):
            for i, e in enumerate(row):
                if e >= 0:
                    known_from[b, i] = int((tok_end[b] >= e).nonzero()[0])
        pos = torch.arange(tok_end.shape[1])
        loss = torch.zeros(())
        for i, head in enumerate(self.heads):
            loss = loss + torch.nn.functional.cross_entropy(head(out.pooler_output), target[:, i])
            per_token = torch.where(pos[None] >= known_from[:, i, None], target[:, i, None], none[i])
            logits = head(out.last_hidden_state)
            loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1), per_token.flatten())
        return loss
