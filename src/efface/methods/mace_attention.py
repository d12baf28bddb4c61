"""Attention pieces of MACE (:mod:`efface.methods.mace`): rank-r LoRAs on the closed-form sites,
the attention-map loss, masks from attention maps, timestep importance sampling.

The LoRAs sit on the family's ``"sequence"`` edit sites (``Family.edit_sites``: SD's
``attn2.to_k`` / ``attn2.to_v``; Flux's ``context_embedder``), added to their output by forward
hooks (:func:`lora_hooks`). The attention probabilities of the image positions on the text tokens
are read by :func:`attention_processors`, a context manager that swaps the processor of every
attention module the text goes through and puts the original processors back on exit:

* UNets: every cross-attention module (``...attn2``) runs :class:`MaceProcessor`, diffusers'
  plain attention computation exposing its (text-only) softmax;
* Flux (the joint-attention form; not in the paper): every double- and single-stream attention
  keeps its own processor for the output (:class:`JointMapProcessor`), and the image-to-text part
  of its joint softmax (over text *and* image keys, RoPE applied as the processor applies it:
  :func:`efface.methods.receler_maps.joint_probabilities`) is computed beside it for the recorder,
  gradient-checkpointed while training so a layer's full map is not kept for the backward pass.

Processors and hooks are plain callables, not ``nn.Module``s: the LoRA parameters never become
parameters of the denoiser.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from efface.methods.receler_maps import joint_probabilities
from efface.models.families import family_of
from efface.models.params import cross_attention_modules, select


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
    """diffusers' plain cross-attention computation, with an optional ``recorder(name,
    attention_probs, heads)`` called with the (batch*heads x pixels x tokens) attention probabilities."""

    def __init__(self, name: str, recorder=None):
        self.name, self.recorder = name, recorder

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


class JointMapProcessor:
    """A Flux attention's own processor for the output, and beside it ``recorder(name, probs, heads)``
    with the image tokens' softmax probabilities on the text tokens ((batch*heads) x image tokens x
    text tokens; the softmax runs over every key). ``text`` holds the current text length (single-
    stream blocks get text and image tokens as one sequence)."""

    def __init__(self, original, name: str, recorder, text: dict[str, int]):
        self.original, self.name, self.recorder, self.text = original, name, recorder, text

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        t = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.text["length"]

        def text_part(hidden, context):
            return joint_probabilities(attn, hidden, context, image_rotary_emb, text_len=t)[..., :t]

        context = encoder_hidden_states
        if torch.is_grad_enabled():
            probs = torch.utils.checkpoint.checkpoint(text_part, hidden_states, context, use_reentrant=False)
        else:
            probs = text_part(hidden_states, context)
        self.recorder(self.name, probs.flatten(0, 1), probs.shape[1])
        return out


@contextmanager
def attention_processors(pipe, recorder) -> Iterator[None]:
    """Within the block every attention module the text goes through (UNets: cross-attention,
    ``...attn2``; Flux: every double- and single-stream attention) reports its image-to-text
    attention probabilities to ``recorder`` (module doc); the original processors are restored on exit."""
    family = family_of(pipe)
    den = family.denoiser(pipe)
    original = dict(den.attn_processors)
    joint = family.denoiser_name == "transformer"
    modules = family.cross_attention(pipe) if joint else cross_attention_modules(pipe)
    text: dict[str, int] = {}
    chosen = {}
    for key, proc in original.items():
        name = key.removesuffix(".processor")
        if name not in modules:
            chosen[key] = proc
        else:
            chosen[key] = JointMapProcessor(proc, name, recorder, text) if joint else MaceProcessor(name, recorder)
    handles = []
    if joint:  # single-stream blocks see one sequence: the text length is the denoiser's input's
        def remember(module, args, kwargs):
            text["length"] = kwargs["encoder_hidden_states"].shape[1]

        handles.append(den.register_forward_pre_hook(remember, with_kwargs=True))
    den.set_attn_processor(chosen)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        den.set_attn_processor(original)


def lora_sites(pipe) -> dict[str, torch.nn.Module]:
    """Parameter key of every ``"sequence"`` edit site's weight -> its linear module (module doc)."""
    family = family_of(pipe)
    weights = select(pipe, "text_input")
    out = {}
    for site in family.edit_sites(pipe):
        if site.reads == "sequence" and site.key in weights:
            component, _, name = site.key.removesuffix(".weight").partition(".")
            out[site.key] = getattr(pipe, component).get_submodule(name)
    return out


def make_loras(pipe, rank: int, generator: torch.Generator) -> dict[str, LoRA]:
    """A LoRA for every ``"sequence"`` edit site of ``pipe`` (:func:`lora_sites`, in site order), on
    its device, float32, keyed by the site's weight key."""
    return {key: LoRA(lin.in_features, lin.out_features, rank, generator).to(lin.weight.device)
            for key, lin in lora_sites(pipe).items()}


@contextmanager
def lora_hooks(pipe, loras: dict[str, LoRA]) -> Iterator[None]:
    """Within the block each site's output gets its LoRA's ``x A^T B^T`` added (forward hooks,
    removed on exit)."""
    sites = lora_sites(pipe)
    handles = [sites[key].register_forward_hook(lambda m, args, out, _l=lora: out + _l(args[0]))
               for key, lora in loras.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def importance_weights(num_timesteps: int, temperature: float = 0.05) -> torch.Tensor:
    """The official timestep distribution: ``p(t) ~ sigmoid(T (t - 200)) - sigmoid(T (t - 400))``,
    which puts most draws between t = 200 and 400 (``cfr_utils.importance_sampling_fn``)."""
    t = torch.arange(num_timesteps, dtype=torch.float64)
    p = torch.sigmoid(temperature * (t - 200)) - torch.sigmoid(temperature * (t - 400))
    return p / p.sum()
