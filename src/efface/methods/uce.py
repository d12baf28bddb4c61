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
``expand_prompts`` also edits each concept inside every template of ``templates`` (default the
official code's object templates, "image of {}", ...), the key taken at the concept's last token
in that context, and preserves each preserved concept in the same templates.

Differences from the official code (``--expand_prompts``), and why:

* the official code extends the *preserved* list with the *erased* concept's templates (it zips
  erased concepts with preserved ones), so that erase and preserve terms cancel; efface expands
  each preserved concept into the templates, the evident intent;
* expanded prompts map to the bare guide in the official code (``guide_context="bare"``, the
  default); ``guide_context="template"`` maps "image of circle" to "image of" instead, so that the
  context words keep their values;
* keys sit at the concept's last token in every template, not at the prompt's last token, so
  templates may continue after the concept ("a {} on a plain background").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from efface.errors import InputError
from efface.methods.base import ErasureMethod, ErasureRequest, MethodConfig, register_method
from efface.models.params import select
from efface.methods.prompts import TOY_CONTEXTS, fill, word_end
from efface.models.text import encode, token_count

OBJECT_TEMPLATES = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")


@dataclass
class UCEConfig(MethodConfig):
    erase_scale: float = field(default=1.0, metadata={"help": "weight s_e of the erase terms"})
    preserve_scale: float = field(default=1.0, metadata={"help": "weight s_p of the preserve terms"})
    lamb: float = field(default=0.5, metadata={"help": "weight of the stay-close-to-W_old term (lambda)"})
    tokens: str = field(default="last", metadata={"help": "'last' concept token (official code) or 'all' "
                                                           "tokens from it to the end of the sequence"})
    expand_prompts: bool = field(default=False, metadata={"help": "also edit (and preserve) each concept in "
                                                                   "every template of 'templates'"})
    templates: tuple[str, ...] = field(default=OBJECT_TEMPLATES, metadata={"help": "templates of expand_prompts, "
                                                                               "'{}' is the concept"})
    guide_context: str = field(default="bare", metadata={"help": "expanded prompts map to the 'bare' guide "
                                                                  "(official) or to the guide in the same 'template'"})
    solve_dtype: str = field(default="float64", metadata={"help": "float32 or float64 for the solve"})

    # toy-sd: each concept in the toy world's training contexts ("a red {}", ...), guided to the same
    # context without it, other concepts preserved in those contexts (docs/erasure.md, "UCE on toy-sd").
    PRESETS: ClassVar[dict[str, dict]] = {
        "toy": {"expand_prompts": True, "templates": TOY_CONTEXTS, "guide_context": "template"},
    }

    def __post_init__(self) -> None:
        self.check_choices(tokens=("last", "all"), guide_context=("bare", "template"),
                           solve_dtype=("float32", "float64"))
        self.check_templates("templates")
        if self.lamb < 0 or self.erase_scale < 0 or self.preserve_scale < 0:
            raise InputError("lamb, erase_scale and preserve_scale must be >= 0")


def concept_keys(pipe, prompts: list[str], tokens: str, ends: list[int] | None = None) -> list[torch.Tensor]:
    """Text embeddings used as UCE keys: per prompt, an (n x d) matrix of token embeddings.

    ``"last"``: the concept's last token (``ends[i]``; default the last token before the
    end-of-text token, for "" the start token); ``"all"``: that token and every later one up to
    the padded length.
    """
    if not prompts:
        return []
    emb = encode(pipe, prompts).float()
    if ends is None:
        ends = [len(pipe.tokenizer(p).input_ids) - 2 for p in prompts]  # minus start and end tokens
    return [e[i : i + 1] if tokens == "last" else e[i:] for e, i in zip(emb, ends)]


def in_context(tokenizer, words: list[str], templates: tuple[str, ...],
               guides: list[str] | None = None, guide_template: bool = True) -> tuple[list, list, list, list]:
    """Each word alone and in every template (pairs the tokenizer would truncate are left out),
    with the index of the word's last token in each prompt; with ``guides`` (one per word), the
    row-aligned guide prompts: the guide in the same template, or bare (``guide_template=False``)."""
    prompts, ends, g_prompts, g_ends = [], [], [], []
    for i, w in enumerate(words):
        for t in ("{}", *templates):
            gt = t if guide_template else "{}"
            texts = [fill(t, w)] + ([fill(gt, guides[i])] if guides is not None else [])
            if max(token_count(tokenizer, x) for x in texts) > tokenizer.model_max_length:
                continue
            prompts.append(texts[0]), ends.append(word_end(tokenizer, t, w))
            if guides is not None:
                g_prompts.append(texts[1]), g_ends.append(word_end(tokenizer, gt, guides[i]))
    return prompts, ends, g_prompts, g_ends


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
        self.edit(pipe, *self.keys(pipe, request))

    def keys(self, pipe, request: ErasureRequest) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Erase keys, guide keys (row-aligned) and preserve keys of ``request``, each concept also
        in every template when ``expand_prompts`` is on."""
        cfg, tok = self.config, pipe.tokenizer
        templates = cfg.templates if cfg.expand_prompts else ()
        erase, e_ends, guide, g_ends = in_context(tok, list(request.concepts), templates, list(request.anchors),
                                                  guide_template=cfg.guide_context == "template")
        preserve, p_ends, _, _ = in_context(tok, list(request.preserve), templates)
        return (concept_keys(pipe, erase, cfg.tokens, e_ends), concept_keys(pipe, guide, cfg.tokens, g_ends),
                concept_keys(pipe, preserve, cfg.tokens, p_ends))
