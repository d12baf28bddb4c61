"""SDXL (``StableDiffusionXLPipeline``): two CLIP text encoders whose penultimate states are
concatenated (2048-d context); the second encoder's pooled output and the six ``time_ids``
(original size, crop, target size) enter through ``add_embedding`` (``added_cond_kwargs``).

``noxattn`` leaves ``add_embedding`` out with the time embedding (it is the pooled-text path);
UCE edits only cross-attention, as the official ``uce_sd_erase.py`` does for SDXL (the pooled path
stays unedited)."""

from __future__ import annotations

import torch

from efface.models.families.base import Conditioning
from efface.models.families.unet import UNetFamily


class SDXL(UNetFamily):
    name = "sdxl"
    description = "SDXL (StableDiffusionXLPipeline: UNet, CLIP-L + bigG, pooled embedding and time ids)"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    not_noxattn = ("time_embedding.", "add_embedding.", "conv_norm_out.", "conv_out.")

    @classmethod
    def pipeline_classes(cls) -> tuple[type, ...]:
        from diffusers import StableDiffusionXLPipeline

        return (StableDiffusionXLPipeline,)

    def _conditioning(self, out) -> Conditioning:
        return Conditioning(out[0], out[2])  # (prompt_embeds, negative, pooled, negative pooled)

    def _call(self, pipe, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        scale = getattr(pipe, "vae_scale_factor", 8)
        h, w = x.shape[-2] * scale, x.shape[-1] * scale
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=x.device, dtype=x.dtype).expand(x.shape[0], 6)
        added = {"text_embeds": cond.pooled, "time_ids": time_ids}
        return denoiser(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample
