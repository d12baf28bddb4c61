"""toy-sd's UNet: a small ``UNet2DConditionModel`` with cross-attention at every level but the lowest.

Shaped like SD 1.x (CrossAttnDown x2 + Down, mid-block with cross-attention, Up + CrossAttnUp x2),
so erasure methods find ``attn2.to_k`` / ``attn2.to_v`` where they look for them on real models.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from efface.toy.loop import StepRandom
from efface.toy.world import COLOURS, SHAPES, STYLES, Scene, caption


def build_unet(channels: tuple[int, int, int] = (64, 128, 128), cross_dim: int = 64) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=cross_dim,
        attention_head_dim=8,  # diffusers' legacy name: the number of heads
        norm_num_groups=16,
    )


def build_scheduler() -> DDIMScheduler:
    """SD 1.x's noise schedule and DDIM settings."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


class UNetTrainer(torch.nn.Module):
    """Epsilon-prediction loss on cached latents with train-split captions (``p_empty`` of them empty)."""

    def __init__(self, unet: UNet2DConditionModel, latents: torch.Tensor, labels: np.ndarray,
                 text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, batch: int = 64, p_empty: float = 0.1):
        super().__init__()
        self.unet, self.latents, self.labels = unet, latents, labels
        self.text_encoder, self.tokenizer = text_encoder.requires_grad_(False).eval(), tokenizer
        self.batch, self.p_empty = batch, p_empty
        self.scheduler = build_scheduler()

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]

    def loss(self, r: StepRandom) -> torch.Tensor:
        idx = r.np.integers(len(self.latents), size=self.batch)
        rng = random.Random(int(r.np.integers(2**62)))
        texts = []
        for s, c, t in self.labels[idx]:
            if rng.random() < self.p_empty:
                texts.append("")
            else:
                texts.append(caption(Scene(SHAPES[s], COLOURS[c], STYLES[t]), rng, "train")[0])
        x0 = self.latents[idx]
        noise = torch.randn(x0.shape, generator=r.torch)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.batch,), generator=r.torch)
        xt = self.scheduler.add_noise(x0, noise, t)
        pred = self.unet(xt, t, self.embed(texts)).sample
        return torch.nn.functional.mse_loss(pred, noise)
