"""Flux (``FluxPipeline``, ``FluxTransformer2DModel``): T5 states are the token sequence (through
``context_embedder``), the CLIP pooler output the pooled embedding (through
``time_text_embed.text_embedder``); double blocks keep a text stream (``add_*_proj``), single
blocks run text and image tokens through shared projections. Flow matching with the dynamic shift;
latents are packed into 2 x 2 patches, done here inside :meth:`Flux._call` (methods see
``B x C x H x W``).

Guidance: efface's classifier-free guidance on Flux is real CFG (``true_cfg_scale`` with the
empty prompt as the negative, two transformer calls); checkpoints with a guidance embedding
(FLUX.1-dev) also get ``distilled_guidance`` (3.5, the pipeline's default) as that input.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from efface.models.families.base import Conditioning
from efface.models.families.flow import FlowFamily


class Flux(FlowFamily):
    name = "flux"
    description = "Flux (FluxPipeline: double + single block transformer, CLIP pooled + T5, flow matching)"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    default_max_sequence_length: ClassVar[int] = 512
    distilled_guidance: ClassVar[float] = 3.5

    @classmethod
    def pipeline_classes(cls) -> tuple[type, ...]:
        from diffusers import FluxPipeline

        return (FluxPipeline,)

    @classmethod
    def denoiser_classes(cls) -> tuple[type, ...]:
        from diffusers import FluxTransformer2DModel

        return (FluxTransformer2DModel,)

    def kv_modules(self, pipe) -> dict[str, tuple[str, str]]:
        from diffusers.models.transformers.transformer_flux import FluxAttention

        return {n: ("add_k_proj", "add_v_proj") if m.added_kv_proj_dim is not None else ("to_k", "to_v")
                for n, m in self.denoiser(pipe).named_modules() if isinstance(m, FluxAttention)}

    def latent_shape(self, pipe) -> tuple[int, int, int]:
        size = pipe.vae.config.sample_size // pipe.vae_scale_factor
        size = max(2, size - size % 2)  # packing needs even sides
        return int(self.denoiser(pipe).config.in_channels) // 4, size, size

    def _encode(self, pipe, prompts: list[str]) -> Conditioning:
        device = self.denoiser(pipe).device
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                               max_sequence_length=self.max_sequence_length(pipe))
        return Conditioning(embeds, pooled)

    def sequence_tokenizer(self, pipe):
        return getattr(pipe, self.tokenizers[-1])  # the token sequence is T5's

    def sequence_length(self, pipe) -> int:
        return self.max_sequence_length(pipe)

    def word_positions(self, pipe, template: str, word: str) -> list[int]:
        return [self.t5_position(pipe, template, word)]

    def _call(self, pipe, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, c, h, w = x.shape
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = (torch.full((b,), self.distilled_guidance, device=x.device, dtype=torch.float32)
                    if denoiser.config.guidance_embeds else None)
        out = denoiser(hidden_states=packed, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                       pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=txt_ids,
                       img_ids=img_ids.reshape(-1, 3), return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def timestep_kwargs(self, pipe, scheduler, num_steps: int) -> dict:
        import numpy as np

        kwargs = super().timestep_kwargs(pipe, scheduler, num_steps)
        kwargs.pop("num_inference_steps")
        kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps).tolist()  # as FluxPipeline
        return kwargs

    def generation_kwargs(self, pipe, guidance: float, negative_prompt: str | None) -> dict:
        return {**super().generation_kwargs(pipe, guidance, negative_prompt), "true_cfg_scale": guidance,
                "negative_prompt": negative_prompt or "", "guidance_scale": self.distilled_guidance}

    def image_patch(self, pipe) -> int:
        return 2  # latents packed 2 x 2
