"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``): CLIP-L and
CLIP-G penultimate states (concatenated, padded to the T5 width) followed by T5's along the
sequence; pooled = CLIP-L || CLIP-G; flow matching. The word sits twice in the sequence: in the
CLIP part and in the T5 part."""

from __future__ import annotations

from typing import ClassVar

import torch

from efface.models.families.base import Conditioning
from efface.models.families.flow import FlowFamily
from efface.models.tokens import word_end


class SD3(FlowFamily):
    name = "sd3"
    description = "SD3 / SD3.5 (StableDiffusion3Pipeline: joint-attention transformer, CLIP-L + G + T5, flow matching)"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    default_max_sequence_length: ClassVar[int] = 256

    @classmethod
    def pipeline_classes(cls) -> tuple[type, ...]:
        from diffusers import StableDiffusion3Pipeline

        return (StableDiffusion3Pipeline,)

    @classmethod
    def denoiser_classes(cls) -> tuple[type, ...]:
        from diffusers import SD3Transformer2DModel

        return (SD3Transformer2DModel,)

    def kv_modules(self, pipe) -> dict[str, tuple[str, str]]:
        return {n: ("add_k_proj", "add_v_proj") for n, m in self.denoiser(pipe).named_modules()
                if getattr(m, "add_k_proj", None) is not None}

    def latent_shape(self, pipe) -> tuple[int, int, int]:
        cfg = self.denoiser(pipe).config
        return int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size)

    def _encode(self, pipe, prompts: list[str]) -> Conditioning:
        device = self.denoiser(pipe).device
        out = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                 num_images_per_prompt=1, do_classifier_free_guidance=False,
                                 max_sequence_length=self.max_sequence_length(pipe))
        return Conditioning(out[0], out[2])

    def sequence_tokenizer(self, pipe):
        return None  # CLIP's tokens, then T5's, along one sequence

    def word_positions(self, pipe, template: str, word: str) -> list[int]:
        clip = word_end(self.tokenizer(pipe), template, word)
        offset = int(pipe.tokenizer.model_max_length)
        return [clip, offset + self.t5_position(pipe, template, word)] if getattr(pipe, "text_encoder_3", None) \
            is not None else [clip]

    def _call(self, pipe, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return denoiser(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                        pooled_projections=cond.pooled, return_dict=False)[0]

    def image_patch(self, pipe) -> int:
        return int(self.denoiser(pipe).config.patch_size)
