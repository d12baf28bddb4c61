"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024, arXiv 2308.14761).

A closed-form edit of every cross-attention key and value projection ``W`` (``attn2.to_k`` and
``attn2.to_v``). With ``c_i`` the text embedding of an erased concept, ``v_i* = W_old c_guide`` the
old projection of its guide (anchor) and ``c_j`` the embeddings of preserved concepts, UCE solves
(paper, eq. 7)::

    W = (lamb W_old + s_e sum_i v_i* c_i^T + s_p sum_j W_old c_j c_j^T)
        (lamb I     + s_e sum_i c_i c_i^T  + s_p sum_j c_j c_j^T)^-1

all concepts in one solve, per layer, in float64 (``solve_dtype``) whatever the model's dtype.

Defaults are those of the official code (``trainscripts/uce_sd_erase.py``): ``erase_scale=1``,
``preserve_scale=1``, ``lamb=0.5``, one embedding per concept taken at its last token; the guide
defaults to "" (objects; use "art" for artists). ``tokens="all"`` instead uses every token from the
concept's last word to the end of the padded sequence, as the paper's first code release did.
``expand_prompts`` adds the official code's template prompts ("image of {c}", ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from efface.errors import InputError
from efface.methods.base import ErasureMethod, ErasureRequest, MethodConfig, register_method
from efface.models.params import select
from efface.models.text import encode

OBJECT_TEMPLATES = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")


@dataclass
class UCEConfig(MethodConfig):
    erase_scale: float = field(default=1.0, metadata={"help": "weight s_e of the erase terms"})
    preserve_scale: float = field(default=1.0, metadata={"help": "weight s_p of the preserve terms"})
    lamb: float = field(default=0.5, metadata={"help": "weight of the stay-close-to-W_old term (lambda)"})
    tokens: str = field(default="last", metadata={"help": "'last' concept token (official code) or 'all' "
                                                           "tokens from it to the end of the sequence"})
    expand_prompts: bool = field(default=False, metadata={"help": "also edit template prompts of each concept"})
    solve_dtype: str = field(default="float64", metadata={"help": "float32 or float64 for the solve"})

    def __post_init__(self) -> None:
        if self.tokens not in ("last", "all"):
            raise InputError(f"tokens must be 'last' or 'all', not {self.tokens!r}")
        if self.solve_dtype not in ("float32", "float64"):
            raise InputError(f"solve_dtype must be float32 or float64, not {self.solve_dtype!r}")
        if self.lamb < 0 or self.erase_scale < 0 or self.preserve_scale < 0:
            raise InputError("lamb, erase_scale and preserve_scale must be >= 0")


def concept_keys(pipe, prompts: list[str], tokens: str) -> list[torch.Tensor]:
    """Text embeddings used as UCE keys: per prompt, an (n x d) matrix of token embeddings.

    ``"last"``: the last token before the end-of-text token (for "" that is the start token);
    ``"all"``: that token and every later one up to the padded length.
    """
    if not prompts:
        return []
    emb = encode(pipe, prompts).float()
    lengths = [len(pipe.tokenizer(p).input_ids) for p in prompts]  # with start and end tokens
    out = []
    for e, n in zip(emb, lengths):
        last = n - 2
        out.append(e[last : last + 1] if tokens == "last" else e[last:])
    return out


def _pairs(request: ErasureRequest, expand: bool) -> tuple[list[str], list[str]]:
    erase, guide = list(request.concepts), list(request.anchors)
    if expand:
        for c, g in zip(request.concepts, request.anchors):
            erase += [t.format(c) for t in OBJECT_TEMPLATES]
            guide += [t.format(g).strip() if g else "" for t in OBJECT_TEMPLATES]
    return erase, guide


@torch.no_grad()
def uce_solve(w_old: torch.Tensor, erase_keys: list[torch.Tensor], guide_values: list[torch.Tensor],
              preserve_keys: list[torch.Tensor], *, erase_scale: float, preserve_scale: float, lamb: float,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The closed form above. Keys are (n x d_in) matrices; guide values (n x d_out), row-aligned."""
    w = w_old.to(dtype)
    mat1 = lamb * w
    mat2 = lamb * torch.eye(w.shape[1], dtype=dtype, device=w.device)
    for c, v in zip(erase_keys, guide_values):
        c, v = c.to(dtype), v.to(dtype)
        mat1 = mat1 + erase_scale * v.T @ c
        mat2 = mat2 + erase_scale * c.T @ c
    for c in preserve_keys:
        c = c.to(dtype)
        mat1 = mat1 + preserve_scale * (c @ w.T).T @ c
        mat2 = mat2 + preserve_scale * c.T @ c
    return torch.linalg.solve(mat2, mat1, left=False)  # mat1 @ mat2^-1


def _align(erase: torch.Tensor, guide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(len(erase), len(guide))  # "all" tokens: trim the longer to the shorter, as the paper's code
    return erase[:n], guide[:n]


@register_method("uce")
class UCE(ErasureMethod[UCEConfig]):
    """Unified Concept Editing: closed-form edit of cross-attention K/V (arXiv 2308.14761)."""

    Config = UCEConfig
    paper = "Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024), arXiv 2308.14761"
    parameter_set = "xattn_kv"
    preserves = True

    def edit(self, pipe, erase_keys: list[torch.Tensor], guide_keys: list[torch.Tensor],
             preserve_keys: list[torch.Tensor], originals: dict[str, torch.Tensor] | None = None) -> None:
        """Solve and write every K/V projection in place. Guide values are computed with
        ``originals`` (default: the current weights), so that later edits (RECE) can keep mapping
        onto the original model's values; preserved keys keep their current values."""
        cfg = self.config
        weights = select(pipe, self.parameter_set)
        dtype = getattr(torch, cfg.solve_dtype)
        for key, param in weights.items():
            w_orig = (originals[key] if originals is not None else param.detach()).to(param.device)
            keys, values = [], []
            for c, g in zip(erase_keys, guide_keys):
                c, g = _align(c.to(param.device), g.to(param.device))
                keys.append(c)
                values.append(g.to(dtype) @ w_orig.to(dtype).T)
            # preserved concepts keep their *current* output (W_old in the paper's notation)
            new = uce_solve(param.detach(), keys, values, [p.to(param.device) for p in preserve_keys],
                            erase_scale=cfg.erase_scale, preserve_scale=cfg.preserve_scale, lamb=cfg.lamb,
                            dtype=dtype)
            param.data.copy_(new.to(param.dtype))

    def _fit(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool) -> None:
        erase, guide = _pairs(request, self.config.expand_prompts)
        tokens = self.config.tokens
        self.edit(pipe, concept_keys(pipe, erase, tokens), concept_keys(pipe, guide, tokens),
                  concept_keys(pipe, list(request.preserve), tokens))
