"""Where Receler's erasers sit and what its concept-localised mask reads, per kind of denoiser.

UNets (SD 1.x / 2.x, SDXL): after every cross-attention module (``attn2``, its output after
``to_out``); the mask reads its text-only attention probabilities of the concept's tokens.

Flux (the joint-attention form; not in the paper): after the joint attention of every
double-stream block, on its *image* stream's output (after ``to_out``): the part of a block where
image tokens have read the text and have their own output, as a UNet's cross-attention output;
the single-stream blocks, which run text and image tokens through one projection, get none. The
mask reads the image-to-text part of that joint attention: the softmax over all keys (text and
image, RoPE applied as the processor applies it) of each image token's query, at the concept's
text tokens, averaged over heads and tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from efface.models.families import family_of
from efface.models.params import cross_attention_modules


def eraser_sites(pipe) -> dict[str, int]:
    """Attention processor key -> width of the output an eraser follows (module doc)."""
    family = family_of(pipe)
    if family.denoiser_name == "transformer":
        return {f"{n}.processor": m.to_out[0].out_features for n, m in family.cross_attention(pipe).items()
                if is_joint(m)}  # Flux's double-stream blocks (single-stream ones have no text projections)
    return {f"{name}.processor": m.to_out[0].out_features for name, m in cross_attention_modules(pipe).items()}


def is_joint(attn) -> bool:
    """Whether ``attn`` is a joint (text + image) attention whose processor returns (image, text) outputs."""
    return getattr(attn, "added_kv_proj_dim", None) is not None and hasattr(attn, "norm_added_k")


def concept_attention(attn, hidden: torch.Tensor, context: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The cross-attention probabilities softmax(q k^T / sqrt(d)) of ``attn`` on the text positions
    ``tokens``, averaged over heads and those tokens: (B, N) for ``hidden`` of shape (B, N, C)."""
    with torch.no_grad():
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.head_to_batch_dim(attn.to_q(hidden))
        k = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(q, k, None)  # (B * heads, N, T)
        return probs.view(hidden.shape[0], attn.heads, *probs.shape[1:])[..., tokens].mean(-1).mean(1).float()


def joint_probabilities(attn, hidden: torch.Tensor, context: torch.Tensor | None, rotary=None,
                        text_len: int | None = None) -> torch.Tensor:
    """A Flux attention's probabilities from each image token to every key (text first, then
    image), RoPE applied as the processor applies it: (B, heads, N, T + N). Double-stream blocks
    get the text as ``context``; single-stream ones (``context`` None) one sequence ``hidden`` of
    ``text_len`` text tokens, then the image's, through shared projections."""
    from diffusers.models.embeddings import apply_rotary_emb

    d = attn.head_dim

    def heads(x):
        return x.unflatten(-1, (-1, d))

    if context is None:
        q, k = attn.norm_q(heads(attn.to_q(hidden))), attn.norm_k(heads(attn.to_k(hidden)))
        t = text_len
    else:
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(context))), attn.norm_q(heads(attn.to_q(hidden)))], 1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(context))), attn.norm_k(heads(attn.to_k(hidden)))], 1)
        t = context.shape[1]
    if rotary is not None:
        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    q = q[:, t:]  # the image tokens' queries
    return (torch.einsum("bnhd,bmhd->bhnm", q.float(), k.float()) / math.sqrt(d)).softmax(-1)


def joint_concept_attention(attn, hidden: torch.Tensor, context: torch.Tensor, tokens: torch.Tensor,
                            rotary=None) -> torch.Tensor:
    """:func:`joint_probabilities` at the text positions ``tokens``, averaged over heads and those
    tokens: (B, N) for image ``hidden`` of shape (B, N, C)."""
    with torch.no_grad():
        probs = joint_probabilities(attn, hidden, context, rotary)
        return probs[..., tokens.to(probs.device)].mean(-1).mean(1)


def concept_masks(maps: dict[str, torch.Tensor], latent: tuple[int, int], resolution: int,
                  threshold: float) -> dict[str, torch.Tensor]:
    """Binary masks (B, N) per layer: the maps whose side is ``resolution`` averaged, min-max
    normalised per image, ``>= threshold`` -> 1, nearest-resized to every layer's positions."""
    sides = {k: _side(m.shape[1], latent) for k, m in maps.items()}
    chosen = [m.view(m.shape[0], *sides[k]) for k, m in maps.items() if sides[k][0] == resolution]
    avg = torch.stack(chosen, 1).mean(1)  # (B, h, w)
    lo, hi = avg.amin((1, 2), keepdim=True), avg.amax((1, 2), keepdim=True)
    mask = ((avg - lo) / (hi - lo).clamp_min(1e-12) >= threshold).float()
    return {k: F.interpolate(mask[:, None], size=sides[k], mode="nearest").flatten(1) for k in maps}


def _side(n: int, latent: tuple[int, int]) -> tuple[int, int]:
    f = math.sqrt(latent[0] * latent[1] / n)  # the layer's downsampling factor
    return round(latent[0] / f), round(latent[1] / f)


def localisation_loss(outputs: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """L_reg: per layer, the channel-mean of the squared eraser output outside the mask, summed over
    positions and divided by the number of positions outside; averaged over layers."""
    terms = []
    for key, e in outputs.items():
        outside = 1 - masks[key].to(e.dtype)  # (B, N)
        terms.append(((e * outside[..., None]) ** 2).mean(-1).sum() / (outside.sum() + 1e-9))
    return torch.stack(terms).mean()


def attention_sides(pipe) -> set[int]:
    """Sides of the attention maps the mask can be made of at ``pipe``'s native latent size: a
    diffusers UNet2DConditionModel's cross-attention levels; Flux: its 2 x 2-packed image tokens."""
    family = family_of(pipe)
    size = family.latent_shape(pipe)[1]
    config = family.denoiser(pipe).config
    if getattr(config, "down_block_types", None) is None:  # Flux: one token per 2 x 2 latent patch
        return {size // 2}
    depth, sides = len(config.down_block_types), set()
    for name in cross_attention_modules(pipe):
        block, _, rest = name.partition(".")
        index = int(rest.split(".")[0]) if block != "mid_block" else depth - 1
        level = index if block == "down_blocks" else depth - 1 - index if block == "up_blocks" else depth - 1
        sides.add(size // 2**level)
    return sides
