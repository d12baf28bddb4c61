"""toy-flux's sequence encoder: a small ``T5EncoderModel`` pre-trained on every toy caption.

Like toy-sd's CLIP encoder (:mod:`efface.toy.text`) it stands in for web-scale pre-training and sees
train *and* held-out words, then is frozen. T5 is bidirectional and has no pooled state, so its
targets differ: the token that ends a named word predicts that word's concept (every other token
predicts "not named" for that axis), and the mean of the real tokens predicts the whole caption's
labels. A concept therefore lives at its own word's token, as in a real T5, which is what Flux
erasures that edit token states (UCE's ``context_embedder`` at the last real token) rely on.
"""

from __future__ import annotations

import random

import torch
from transformers import T5Config, T5EncoderModel

from efface.toy.loop import StepRandom
from efface.toy.text import labelled_caption
from efface.toy.world import AXES

D_MODEL = 64


def t5_config(tokenizer) -> T5Config:
    return T5Config(
        vocab_size=len(tokenizer), d_model=D_MODEL, d_kv=16, d_ff=4 * D_MODEL, num_layers=3, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=tokenizer.model_max_length,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )


class T5Pretrainer(torch.nn.Module):
    """The T5 encoder plus the label heads used only during pre-training."""

    def __init__(self, encoder: T5EncoderModel, tokenizer, batch: int = 256):
        super().__init__()
        self.encoder, self.tokenizer, self.batch = encoder, tokenizer, batch
        self.heads = torch.nn.ModuleList(torch.nn.Linear(D_MODEL, len(n) + 1) for n in AXES.values())

    def loss(self, r: StepRandom) -> torch.Tensor:
        """Cross-entropy of the caption's labels from the mean real-token state, and at every token of
        the label of the word that token ends ("not named" elsewhere)."""
        rng = random.Random(int(r.np.integers(2**62)))
        texts, labels, ends = zip(*(labelled_caption(rng) for _ in range(self.batch)))
        enc = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt", return_offsets_mapping=True)
        mask = enc.attention_mask
        states = self.encoder(input_ids=enc.input_ids).last_hidden_state  # no mask: FluxPipeline passes none
        mean = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        target = torch.tensor(labels)  # B x axes
        none = torch.tensor([len(n) for n in AXES.values()])
        start, stop = enc.offset_mapping[..., 0], enc.offset_mapping[..., 1]  # B x T (0, 0 for specials)
        loss = torch.zeros(())
        for i, head in enumerate(self.heads):
            end = torch.tensor([row[i] for row in ends])[:, None]  # -1 when the axis is not named
            at_word = (start < end) & (stop >= end) & (end > 0)
            per_token = torch.where(at_word, target[:, i, None], none[i])
            loss = loss + torch.nn.functional.cross_entropy(head(mean), target[:, i])
            logits = head(states)
            loss = loss + torch.nn.functional.cross_entropy(logits[mask.bool()], per_token[mask.bool()])
        return loss
