"""MACE's closed forms (:mod:`efface.methods.mace`): the co-occurring-token alignment of the CFR,
the d x d statistics both closed forms read, the CFR map and the fusion, batched over concepts
and layers (one solve per input for every site)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from efface.methods.uce import uce_solve


def cooccurring_indices(tokenizer, old: str, new: str, length: int | None = None) -> tuple[list[int], list[int]]:
    """Row-aligned token positions of the words around the concept in ``old`` and around the anchor
    in ``new`` (official ``find_matching_indices``): the common prefix (start token included, where
    the tokenizer has one), then the common suffix (end-of-text included) continued through the
    padding, aligned from the end of each phrase, up to the padded ``length`` (default the
    tokenizer's ``model_max_length``)."""
    a, b = tokenizer(old).input_ids, tokenizer(new).input_ids
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(a), len(b)) - prefix and a[len(a) - 1 - suffix] == b[len(b) - 1 - suffix]:
        suffix += 1
    start_a, start_b = len(a) - suffix, len(b) - suffix
    n = (length or tokenizer.model_max_length) - max(start_a, start_b)
    return (list(range(prefix)) + list(range(start_a, start_a + n)),
            list(range(prefix)) + list(range(start_b, start_b + n)))


def fuse(w_refined: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], preserve_keys: torch.Tensor,
         preserve_values: torch.Tensor, *, lamb: float, preserve_scale: float, dtype=torch.float64) -> torch.Tensor:
    """The fusion closed form (stage 3): least squares onto each LoRA's values, preserved rows onto
    their original values, ``lamb`` towards the refined weights. Rows weighted by sqrt(scale) turn
    it into UCE's solve with the preserved pairs as extra (key, value) rows."""
    s = math.sqrt(preserve_scale)
    keys = [*keys, s * preserve_keys.to(dtype)] if len(preserve_keys) and s > 0 else keys
    values = [*values, s * preserve_values.to(dtype)] if len(preserve_keys) and s > 0 else values
    return uce_solve(w_refined, keys, values, [], erase_scale=1.0, preserve_scale=0.0, lamb=lamb, dtype=dtype)


@dataclass(frozen=True)
class ClosedFormStats:
    """All that MACE's two closed forms read of the prompts (``solve_dtype``): the CFR's ``cfr_keys``
    ``K^T K`` and ``cfr_sources`` ``S^T K`` (co-occurring keys ``K``, rows of the concept prompts;
    ``S``: the anchor prompts' states at the aligned positions), the fusion's ``concepts``
    ``E_i^T E_i`` per concept (every token of its prompts; n x d x d) and ``preserve`` ``P^T P``
    (every token of the preserved prompts; zero without preserved concepts). d x d each."""

    cfr_keys: torch.Tensor
    cfr_sources: torch.Tensor
    concepts: torch.Tensor
    preserve: torch.Tensor

    def to(self, device) -> ClosedFormStats:
        return ClosedFormStats(*(t.to(device) for t in (self.cfr_keys, self.cfr_sources, self.concepts,
                                                        self.preserve)))


def cfr_map(stats: ClosedFormStats, *, lamb: float, preserve_scale: float) -> torch.Tensor:
    """The CFR of every layer at once: ``W' = W M``, ``M = (lamb I + S^T K + s_p P^T P)(lamb I + K^T K
    + s_p P^T P)^-1`` (UCE's closed form with values ``W s``, erase scale 1)."""
    eye = torch.eye(stats.cfr_keys.shape[0], dtype=stats.cfr_keys.dtype, device=stats.cfr_keys.device)
    pp = preserve_scale * stats.preserve
    return torch.linalg.solve(lamb * eye + stats.cfr_keys + pp, lamb * eye + stats.cfr_sources + pp, left=False)


def fusion_maps(stats: ClosedFormStats, *, lamb: float, preserve_scale: float) -> tuple[torch.Tensor, ...]:
    """What the fusion of every layer shares, from one solve with ``mat2 = lamb I + sum_i G_i + s_f
    P^T P`` (``G_i``: ``stats.concepts``): ``M_ref = (lamb I + sum_i G_i) mat2^-1``, ``M_orig = s_f
    P^T P mat2^-1`` (None where that term is zero: the default scale 0, or nothing preserved) and
    ``mat2^-1`` (d x d each)."""
    g = stats.concepts
    d = stats.preserve.shape[0]
    eye = torch.eye(d, dtype=g.dtype, device=g.device)
    sum_g = g.sum(0) if len(g) else torch.zeros_like(eye)
    pp = preserve_scale * stats.preserve
    mat2 = lamb * eye + sum_g + pp
    maps = torch.linalg.solve(mat2, torch.cat([lamb * eye + sum_g, pp, eye]), left=False)  # X mat2 = [...]
    return maps[:d], maps[d : 2 * d] if pp.any() else None, maps[2 * d :]


def lora_keys(stats: ClosedFormStats, downs: torch.Tensor) -> torch.Tensor:
    """``A_i G_i`` for every concept ``i`` at once: ``downs`` (n x k x d_in) holds each concept's LoRA
    ``A`` matrices of any number of layers stacked (k rows); one batched product reads each ``G_i``
    once for all layers."""
    return torch.bmm(downs, stats.concepts.to(downs.device, downs.dtype))


def fused_weight(w_refined: torch.Tensor, w_original: torch.Tensor, ups: torch.Tensor | None,
                 a_g: torch.Tensor | None, maps: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The fusion closed form (:func:`fuse`) of one layer for all concepts at once: ``W* = W' M_ref +
    W M_orig + (sum_i B_i A_i G_i) mat2^-1`` (:func:`fusion_maps`), ``ups`` the LoRAs' ``B_i``
    (n x d_out x rank), ``a_g`` their ``A_i G_i`` (n x rank x d_in, :func:`lora_keys`)."""
    m_ref, m_orig, mat2_inv = maps
    fused = w_refined @ m_ref
    if ups is not None:  # None: a site without LoRAs (Flux's pooled one)
        b = ups.permute(1, 0, 2).reshape(ups.shape[1], -1)  # [B_1 ... B_n] (d_out x n rank)
        fused = fused + (b @ a_g.reshape(-1, a_g.shape[-1])) @ mat2_inv
    return fused if m_orig is None else fused + w_original @ m_orig
