"""Prompt encoding and token checks shared by methods and attacks."""

from __future__ import annotations

import torch

from efface.errors import InputError


def tokenize(pipe, prompts: list[str]) -> torch.Tensor:
    """Token ids, padded to the tokenizer's maximum length, as the pipeline pads them."""
    tok = pipe.tokenizer
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def encode(pipe, prompts: list[str] | str, *, grad: bool = False) -> torch.Tensor:
    """Text-encoder hidden states (B x T x D), as the pipeline conditions the UNet on them."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = tokenize(pipe, prompts).to(pipe.text_encoder.device)
    with torch.set_grad_enabled(grad):
        return pipe.text_encoder(ids)[0]


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


def model_family(pipe) -> str:
    """``"sd"`` for Stable Diffusion 1.x/2.x-style pipelines (toy-sd included), ``"sdxl"`` for SDXL."""
    name = type(pipe).__name__
    if "XL" in name:
        return "sdxl"
    if name.startswith("StableDiffusion") and hasattr(pipe, "unet"):
        return "sd"
    return name
