"""Cross-attention pieces of MACE (:mod:`efface.methods.mace`): rank-r LoRAs on ``attn2.to_k`` /
``attn2.to_v``, the attention-map loss, masks from cross-attention maps, timestep importance sampling.

Everything attaches to a pipeline's UNet (through the family seam) with :func:`attention_processors`,
a context manager that swaps the processor of every cross-attention module (SD: ``...attn2``; found
by :func:`efface.models.params.cross_attention_modules`) for :class:`MaceProcessor` and puts the
original processors back on exit. The processor is a plain callable (not an ``nn.Module``), so the
LoRA parameters never become parameters of the UNet. :class:`MaceProcessor` is the computation of
a UNet cross-attention (text keys only); the joint attention of SD3 / Flux is not covered.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from efface.models.families import family_of
from efface.models.params import cross_attention_modules


class LoRA(torch.nn.Module):
    """``x -> x A^T B^T`` with ``A`` (rank x d_in) drawn N(0, 1/rank^2) and ``B`` (d_out x rank) zero,
    as diffusers' ``LoRALinearLayer`` that the official code trains (``network_alpha=None``: scale 1)."""

    def __init__(self, d_in: int, d_out: int, rank: int, generator: torch.Generator):
        super().__init__()
        self.down = torch.nn.Parameter(torch.randn(rank, d_in, generator=generator) / rank)
        self.up = torch.nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.down.dtype) @ self.down.T @ self.up.T).to(x.dtype)

    def delta(self) -> torch.Tensor:
        """The weight update ``Delta W = B A`` (d_out x d_in) this LoRA adds to its projection."""
        return (self.up @ self.down).detach()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)``, ``Delta W = B A``: d_out x rank and rank x d_in (what MACE's fusion reads)."""
        return self.up.detach().clone(), self.down.detach().clone()


class AttentionLoss:
    """The MACE LoRA loss: for every cross-attention layer, the Frobenius norm of the attention
    probabilities of the concept's tokens at the pixels inside the concept's mask, summed over
    layers (official ``AttnController.loss``).

    Call :meth:`set` before each UNet call with ``positions`` (B x T bool: the concept tokens, and
    with ``use_pooler`` the end-of-text tokens), ``masks`` (B x 1 x H x W, or None for every pixel)
    and the latent size; :meth:`value` then returns the loss and clears the record.
    """

    def __init__(self) -> None:
        self.terms: list[torch.Tensor] = []
        self.positions: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        self.latent_hw: tuple[int, int] = (1, 1)

    def set(self, positions: torch.Tensor, masks: torch.Tensor | None, latent_hw: tuple[int, int]) -> None:
        self.positions, self.masks, self.latent_hw, self.terms = positions, masks, latent_hw, []

    def __call__(self, name: str, probs: torch.Tensor, heads: int) -> None:
        b = self.positions.shape[0]
        probs = probs.view(probs.shape[0] // heads, heads, *probs.shape[1:])[:b]  # B x heads x N x T
        pixels = self._pixels(probs.shape[2], probs.device)  # B x N bool
        chosen = [probs[i][:, pixels[i]][:, :, self.positions[i].to(probs.device)] for i in range(b)]
        selected = torch.cat([c.reshape(-1) for c in chosen])
        if selected.numel():  # an empty mask adds nothing (and no NaN gradient of the norm at 0)
            self.terms.append(torch.linalg.vector_norm(selected.float()))

    def _pixels(self, n: int, device) -> torch.Tensor:
        b = self.positions.shape[0]
        if self.masks is None:
            return torch.ones(b, n, dtype=torch.bool, device=device)
        h, w = layer_size(self.latent_hw, n)
        resized = F.interpolate(self.masks.float(), size=(h, w), mode="nearest")  # as the official code
        return (resized > 0.5).view(b, -1).to(device)

    def value(self) -> torch.Tensor:
        total = sum(self.terms) if self.terms else torch.zeros(())
        self.terms = []
        return total


class MapRecorder:
    """Accumulates, per image, the cross-attention map of the concept's tokens (mean over heads and
    tokens, every layer upsampled to the latent size, summed over layers and calls): the default
    source of masks. With classifier-free guidance only the conditioned half of the batch counts."""

    def __init__(self, positions: torch.Tensor, latent_hw: tuple[int, int]):
        self.positions, self.latent_hw = positions, latent_hw
        self.maps = torch.zeros(positions.shape[0], 1, *latent_hw)

    def __call__(self, name: str, probs: torch.Tensor, heads: int) -> None:
        n = self.positions.shape[0]
        probs = probs.detach().float().view(probs.shape[0] // heads, heads, *probs.shape[1:])[-n:]  # B x heads x N x T
        h, w = layer_size(self.latent_hw, probs.shape[2])
        pos = self.positions.to(probs.device, torch.float32)  # n x T
        m = (probs.mean(1) * pos[:, None, :]).sum(-1) / pos.sum(-1, keepdim=True).clamp(min=1)  # n x N
        m = F.interpolate(m.view(n, 1, h, w), size=self.latent_hw, mode="bilinear", align_corners=False)
        self.maps += m.cpu()

    def masks(self, threshold: float) -> torch.Tensor:
        """Boolean masks (n x 1 x H x W): where the map reaches ``threshold`` of its maximum."""
        peak = self.maps.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1, 1)
        return self.maps / peak >= threshold


def layer_size(latent_hw: tuple[int, int], n: int) -> tuple[int, int]:
    """Height and width of a layer with ``n`` pixels, downsampled from the latent by a power of 2."""
    h, w = latent_hw
    factor = round(math.sqrt(h * w / n))
    return max(1, h // factor), max(1, w // factor)


class MaceProcessor:
    """diffusers' plain attention computation, with optional LoRAs added to ``to_k`` / ``to_v``
    and an optional ``recorder(name, attention_probs, heads)`` called with the (batch*heads x pixels
    x tokens) attention probabilities."""

    def __init__(self, name: str, lora_k: LoRA | None = None, lora_v: LoRA | None = None, recorder=None):
        self.name, self.lora_k, self.lora_v, self.recorder = name, lora_k, lora_v, recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        if self.lora_k is not None:
            key = key + self.lora_k(context)
        if self.lora_v is not None:
            value = value + self.lora_v(context)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)
        if self.recorder is not None:
            self.recorder(self.name, probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def attention_processors(pipe, loras: dict[str, tuple[LoRA, LoRA]] | None = None, recorder=None) -> Iterator[None]:
    """Within the block every cross-attention module (SD: ``...attn2``) of ``pipe``'s UNet runs
    :class:`MaceProcessor` with its LoRA pair from ``loras`` (keyed by module name) and
    ``recorder``; the original processors are restored on exit."""
    unet, cross = family_of(pipe).denoiser(pipe), cross_attention_modules(pipe)
    original = dict(unet.attn_processors)
    loras = loras or {}
    chosen = {}
    for key, proc in original.items():
        name = key.removesuffix(".processor")
        if name in cross:
            k, v = loras.get(name, (None, None))
            chosen[key] = MaceProcessor(name, k, v, recorder)
        else:
            chosen[key] = proc
    unet.set_attn_processor(chosen)
    try:
        yield
    finally:
        unet.set_attn_processor(original)


def make_loras(pipe, rank: int, generator: torch.Generator) -> dict[str, tuple[LoRA, LoRA]]:
    """A (to_k, to_v) LoRA pair for every cross-attention module of ``pipe``'s UNet (in module
    order), on its device, float32."""
    device = family_of(pipe).denoiser(pipe).device
    out = {}
    for name, module in cross_attention_modules(pipe).items():
        pair = tuple(LoRA(lin.in_features, lin.out_features, rank, generator) for lin in (module.to_k, module.to_v))
        out[name] = tuple(lora.to(device) for lora in pair)
    return out


def importance_weights(num_timesteps: int, temperature: float = 0.05) -> torch.Tensor:
    """The official timestep distribution: ``p(t) ~ sigmoid(T (t - 200)) - sigmoid(T (t - 400))``,
    which puts most draws between t = 200 and 400 (``cfr_utils.importance_sampling_fn``)."""
    t = torch.arange(num_timesteps, dtype=torch.float64)
    p = torch.sigmoid(temperature * (t - 200)) - torch.sigmoid(temperature * (t - 400))
    return p / p.sum()
