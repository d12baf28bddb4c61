"""Prompt encoding and token checks shared by methods and attacks.

:func:`encode` goes through the pipeline's family (its own ``encode_prompt``) and returns a
:class:`~efface.models.families.Conditioning` (token states and, where the family has one, the
pooled embedding). The token helpers below (``tokenize``, ``framed_ids``, ``token_embedding``,
``replaced_token_embeddings``) work on the first (CLIP) tokenizer and text encoder (the last two
on any of them); :mod:`efface.models.slots` puts token slots in every encoder at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from efface.models.families import Conditioning, family_of
from efface.models.tokens import check_fits, fill, token_count, word_end  # noqa: F401  (re-exported)


def tokenize(pipe, prompts: list[str]) -> torch.Tensor:
    """Token ids, padded to the tokenizer's maximum length, as the pipeline pads them."""
    tok = pipe.tokenizer
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def encode(pipe, prompts: list[str] | str, *, grad: bool = False, trim: bool = False) -> Conditioning:
    """The conditioning the pipeline's denoiser reads for ``prompts`` (B rows), through the
    pipeline's own ``encode_prompt``; with ``grad``, gradients reach the text encoders; with
    ``trim``, on families whose text encoders are causal (CLIP: SD, SDXL), only as far as the
    longest prompt (the states of its tokens unchanged; :meth:`Family.encode`)."""
    return family_of(pipe).encode(pipe, prompts, grad=grad, trim=trim)


def check_prompt(pipe, text: str, what: str = "concept") -> None:
    """Refuse ``text`` if it is empty or any of the pipeline's tokenizers would truncate it."""
    family_of(pipe).check_fits(pipe, text, what)


def model_family(pipe) -> str:
    """The name of ``pipe``'s family (``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``)."""
    return family_of(pipe).name


def framed_ids(tokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """``[start, tokens..., end, pad...]`` (padded to the tokenizer's length) for each row of ``tokens``."""
    n, k = tokens.shape
    ids = torch.full((n, tokenizer.model_max_length), tokenizer.pad_token_id, dtype=torch.long)
    ids[:, 0], ids[:, 1 : k + 1], ids[:, k + 1] = tokenizer.bos_token_id, tokens, tokenizer.eos_token_id
    return ids


def token_embedding(text_encoder) -> torch.nn.Embedding:
    """The text encoder's token embedding table (CLIP, transformers 4.x and 5.x layouts; T5: the
    encoder stack's ``embed_tokens``, the module its forward reads, which need not be the tied
    ``shared`` that ``get_input_embeddings`` returns)."""
    clip = getattr(text_encoder, "text_model", text_encoder)
    if hasattr(clip, "embeddings"):
        return clip.embeddings.token_embedding
    stack = getattr(text_encoder, "encoder", None)
    if stack is not None and getattr(stack, "embed_tokens", None) is not None:
        return stack.embed_tokens
    return text_encoder.get_input_embeddings()


@contextmanager
def replaced_token_embeddings(text_encoder, positions: list[int], embeds: torch.Tensor) -> Iterator[None]:
    """Within the block, the token embeddings at ``positions`` of every sequence the text encoder
    reads are ``embeds`` (``len(positions) x D``, may carry gradients: relaxed or soft tokens);
    position embeddings, attention and the final norm run as usual. A forward hook, removed on exit."""

    def hook(module, args, output):
        output = output.clone()
        output[:, positions] = embeds.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return output

    handle = token_embedding(text_encoder).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
