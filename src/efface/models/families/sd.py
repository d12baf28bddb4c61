"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``; toy-sd): one CLIP text encoder whose
hidden states are the cross-attention context; epsilon (1.x, 2-base) or v-prediction (2.x 768)."""

from __future__ import annotations

import torch

from efface.models.families.base import Conditioning
from efface.models.families.unet import UNetFamily


class SD(UNetFamily):
    name = "sd"
    description = "Stable Diffusion 1.x / 2.x (StableDiffusionPipeline: UNet, one CLIP text encoder; epsilon or v)"

    @classmethod
    def pipeline_classes(cls) -> tuple[type, ...]:
        from diffusers import StableDiffusionPipeline

        return (StableDiffusionPipeline,)

    def _call(self, pipe, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return denoiser(x, t, encoder_hidden_states=cond.embeds).sample
