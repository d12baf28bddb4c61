"""toy-sd's VAE: a small ``AutoencoderKL``, 32x32 RGB <-> 4 x 8 x 8 latents."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL

from efface.toy.loop import StepRandom


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


class VAETrainer(torch.nn.Module):
    """Reconstruction (L1 + L2) plus a small KL term, as in latent diffusion's autoencoder."""

    def __init__(self, vae: AutoencoderKL, images: np.ndarray, batch: int = 32, kl_weight: float = 1e-6):
        super().__init__()
        self.vae, self.images, self.batch, self.kl_weight = vae, images, batch, kl_weight

    def loss(self, r: StepRandom) -> torch.Tensor:
        x = to_tensor(self.images[r.np.integers(len(self.images), size=self.batch)])
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample(generator=r.torch)).sample
        return (rec - x).abs().mean() + (rec - x).pow(2).mean() + self.kl_weight * post.kl().mean()


@torch.no_grad()
def encode(vae: AutoencoderKL, images: np.ndarray, batch: int = 500) -> torch.Tensor:
    """Posterior means of ``images`` (unscaled latents)."""
    return torch.cat([vae.encode(to_tensor(images[i : i + batch])).latent_dist.mean
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """uint8 reconstructions of uint8 ``images``."""
    out = []
    for i in range(0, len(images), batch):
        rec = vae.decode(vae.encode(to_tensor(images[i : i + batch])).latent_dist.mean).sample
        out.append(rec.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)
