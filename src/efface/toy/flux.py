"""toy-flux's transformer: a small ``FluxTransformer2DModel`` (double + single stream blocks) trained
by flow matching on toy-sd's latents.

Shaped like FLUX.1: 2 x 2 packed latents (toy-sd's 4 x 8 x 8 latents become 16 tokens of 16
channels), T5 token states through ``context_embedder``, the CLIP pooled state through
``time_text_embed``, 3-axis RoPE over (text = 0, row, column) ids, no guidance embedding (toy-flux is
not guidance-distilled: classifier-free guidance is real, FluxPipeline's ``true_cfg_scale``, and the
pipeline's ``guidance_scale`` input is ignored). The scheduler is FLUX.1-dev's (resolution-dependent
shift). The loss is rectified flow as in SD3 / FLUX: ``x_t = (1 - s) x_0 + s noise`` with ``s`` drawn
logit-normal, velocity target ``noise - x_0``, ``p_empty`` of the captions dropped to "" for both
encoders so that classifier-free guidance works.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from efface.toy.loop import StepRandom
from efface.toy.world import COLOURS, SHAPES, STYLES, Scene, caption


def build_transformer(*, layers: int = 2, single_layers: int = 2, heads: int = 4, head_dim: int = 32,
                      latent_channels: int = 4, text_dim: int = 64, pooled_dim: int = 64) -> FluxTransformer2DModel:
    r = head_dim * 7 // 16 // 2 * 2  # FLUX.1's split of a head over (text, row, column): 16, 56, 56 of 128
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim, guidance_embeds=False,
        axes_dims_rope=(head_dim - 2 * r, r, r),
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler configuration (dynamic, resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B x C x H x W latents -> (B x (H/2 * W/2) x 4C tokens, their (0, row, column) ids), as FluxPipeline."""
    b, c, h, w = x.shape
    tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return tokens, ids.reshape(-1, 3)


class FluxTrainer(torch.nn.Module):
    """Flow-matching loss on cached latents with train-split captions (``p_empty`` of them empty)."""

    def __init__(self, transformer: FluxTransformer2DModel, latents: torch.Tensor, labels: np.ndarray,
                 clip, clip_tokenizer, t5, t5_tokenizer, batch: int = 64, p_empty: float = 0.1):
        super().__init__()
        self.transformer, self.latents, self.labels = transformer, latents, labels
        self.clip, self.clip_tokenizer = clip.requires_grad_(False).eval(), clip_tokenizer
        self.t5, self.t5_tokenizer = t5.requires_grad_(False).eval(), t5_tokenizer
        self.batch, self.p_empty = batch, p_empty

    @torch.no_grad()
    def embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 token states, CLIP pooled state), encoded as FluxPipeline.encode_prompt does."""
        clip_ids = self.clip_tokenizer(texts, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids
        t5_ids = self.t5_tokenizer(texts, padding="max_length", max_length=self.t5_tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids
        return self.t5(t5_ids)[0], self.clip(clip_ids).pooler_output

    def loss(self, r: StepRandom) -> torch.Tensor:
        idx = r.np.integers(len(self.latents), size=self.batch)
        rng = random.Random(int(r.np.integers(2**62)))
        texts = ["" if rng.random() < self.p_empty else
                 caption(Scene(SHAPES[s], COLOURS[c], STYLES[t]), rng, "train")[0] for s, c, t in self.labels[idx]]
        x0 = self.latents[idx]
        noise = torch.randn(x0.shape, generator=r.torch)
        sigma = torch.sigmoid(torch.randn(self.batch, generator=r.torch))  # logit-normal(0, 1), as SD3 / FLUX
        s = sigma.view(-1, 1, 1, 1)
        tokens, img_ids = pack((1 - s) * x0 + s * noise)
        embeds, pooled = self.embed(texts)
        pred = self.transformer(hidden_states=tokens, timestep=sigma, pooled_projections=pooled,
                                encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3),
                                img_ids=img_ids, return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred, pack(noise - x0)[0])
