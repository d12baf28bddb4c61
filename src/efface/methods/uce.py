"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024, arXiv 2308.14761).

A closed-form edit of the linear layers through which the text enters the denoiser (the model
family's closed-form sites, ``family.edit_sites(pipe)``; parameter set ``text_input``). With
``c_i`` the keys of an erased concept (what the layer ``W`` reads for it), ``v_i* = W_old c_guide``
the old projection of its guide (anchor) and ``c_j`` the keys of preserved concepts, UCE solves
(paper, eq. 7)::

    W = (lamb W_old + s_e sum_i v_i* c_i^T + s_p sum_j W_old c_j c_j^T)
        (lamb I     + s_e sum_i c_i c_i^T  + s_p sum_j c_j c_j^T)^-1

in float64 (``solve_dtype``) whatever the model's dtype. The keys of all concepts enter only
through three d x d matrices, ``C^T C``, ``G^T C`` and ``P^T P`` (``C``, ``G``, ``P``: the stacked
erase, guide and preserve keys, :class:`Grams`), so that every layer reading the same keys shares
one solve: ``W = W_old M_keep + W_guide M_guide`` with ``M_keep = (lamb I + s_p P^T P) mat2^-1``
and ``M_guide = s_e G^T C mat2^-1`` (``mat2`` the second factor above), one matrix product per
layer, whatever the number of concepts. The text encoders run once per batch of prompts (every
distinct prompt once) and, for keys at the prompts' own tokens (``tokens="last"``), only as far as
the longest prompt of the batch where the encoders are causal (CLIP: SD, SDXL; ``Family.encode``'s
``trim``): the states of a prompt's tokens do not depend on the padding after them. Keys from the
padding (``tokens="all"``) and T5 states (SD3, Flux) are encoded to the full length. Measured on an
SD 1.4-sized model: docs/erasure.md, "Closed forms at scale".

What is edited, per family:

* **sd** (SD 1.x / 2.x) and **sdxl**: every cross-attention ``to_k`` / ``to_v`` (``attn2``); a key
  is the token state at the concept's last token (SDXL: the concatenated CLIP-L / bigG states,
  positions counted by the first tokenizer). This is the official ``trainscripts/uce_sd_erase.py``,
  which the official README names for SDXL too; SDXL's pooled path (``add_embedding``) is not
  edited, as there.
* **flux**: the official ``trainscripts/uce_flux_edit.py``: ``context_embedder`` (reads the T5
  sequence; key: the T5 state at the concept's last token) and the pooled text embedder
  ``time_text_embed.text_embedder.linear_1`` (reads CLIP's pooled output: one key per prompt).
* **sd3** (no official script): the Flux script's two sites. ``context_embedder`` reads CLIP-L ||
  CLIP-G states (zero-padded to T5's width) followed by T5's, so each prompt gives two sequence
  keys: the concept's last token in the CLIP part and in the T5 part
  (``family.word_positions``); the pooled embedder reads CLIP-L || CLIP-G pooled.

Defaults are those of the official code (both scripts): ``erase_scale=1``, ``preserve_scale=1``,
``lamb=0.5``, one key per concept (and text encoder part) at its last token; the guide defaults to
"" (objects; use "art" for artists). ``tokens="all"`` instead uses every token from the concept's
last token to the end of its part of the padded sequence, as the paper's first code release did
on SD: on SD / SDXL to the end of the 77 CLIP tokens; on Flux to the end of the T5 sequence
(``max_sequence_length``); on SD3 both the CLIP part (to token 77) and the T5 part (to the end).
An erased prompt's rows and its guide's are trimmed, part by part, to the shorter of the two (as
that release); the pooled site keeps one key per prompt. ``expand_prompts`` also edits each concept
inside every template of ``templates`` (default the official code's object templates, "image of
{}", ...), the key taken at the concept's last token in that context, and preserves each
preserved concept in the same templates. The official ``--expand_prompts`` (``uce_sd_erase.py``
and ``uce_flux_edit.py`` at their current version) is ``expand_prompts=True,
guide_context="template"``: each templated concept maps onto the guide in the same template
("image of circle" onto "image of {guide}"), and the preserved concepts are not expanded.

``preserve_empty`` (default off) adds the paper-era code's preservation of the empty prompt
(``train-scripts/train_erase.py``, before the diffusers rewrite): "" is always in its retain list,
kept over all its tokens (start, end and padding: the 77 CLIP tokens on SD; here every token of
each part of the sequence, and the pooled embedding on SD3 / Flux), with the weight
``empty_preserve_scale``, by default that code's ``max(0.1, 1 / (1 + number of preserved
concepts))``. That code applied the one scale to "" and to the preserved concepts alike (over
their 77 tokens too) and keyed the erased concepts with ``tokens="all"``: ``preserve_empty=True,
tokens="all"`` and ``preserve_scale`` equal to that value reproduce it, up to the preserved
concepts' tokens (here from their last word on).

Differences from the official code, and why:

* ``expand_prompts`` also puts each *preserved* concept into the templates; the current official
  scripts expand only the erased concepts (and their guides). Only commit 4502388 of
  ``uce_sd_erase.py`` touched the preserved list: it zipped erased concepts with preserved ones and
  extended the preserved list with the *erased* concept's templates (a bug: erase and preserve
  terms cancel), the guides untemplated;
* ``guide_context`` defaults to ``"bare"`` (each expanded prompt maps onto the bare guide, as
  commit 4502388 and RECE's first-release UCE); the current official scripts template the guide
  (``guide_context="template"``: "image of circle" onto "image of", so that the context words
  keep their values);
* the empty prompt is preserved only with ``preserve_empty`` (the paper-era code always kept it,
  the current scripts never do), and its weight is its own (``empty_preserve_scale``), not
  ``preserve_scale``;
* keys sit at the concept's last token in every template, not at the prompt's last token, so
  templates may continue after the concept ("a {} on a plain background");
* Flux / SD3 sites have a bias ``b``. ``uce_flux_edit.py`` takes the guide and preserved values as
  the module's output ``W_old c + b`` and solves for ``W``, which then adds ``b`` again: every
  target, the preserved ones included, is shifted by ``b``. efface takes the values of the weight
  alone (``W_old c``), so that the layer's output ``W c + b`` maps onto the guide's
  ``W_old c_guide + b`` and preserved outputs stay;
* the T5 key of the empty guide "": the official index ``attention_mask.sum() - 2`` is ``-1``
  there, the last padding token of the sequence; efface takes T5's end token (position 0, the
  family's ``word_positions``), as the start token on CLIP;
* Flux prompts are encoded with the family's ``max_sequence_length`` (512); the official script
  uses 256 for FLUX.1-schnell, and T5 states depend on the padded length;
* solves in float64 (official: float32 ``torch.inverse``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from efface.errors import InputError
from efface.methods.base import ErasureMethod, ErasureRequest, MethodConfig, register_method
from efface.methods.uce_keys import Encodings, PromptKeys, concept_keys, empty_keys, in_context
from efface.models.families import family_of
from efface.models.params import get_parameter

OBJECT_TEMPLATES = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")


@dataclass
class UCEConfig(MethodConfig):
    erase_scale: float = field(default=1.0, metadata={"help": "weight s_e of the erase terms"})
    preserve_scale: float = field(default=1.0, metadata={"help": "weight s_p of the preserve terms"})
    lamb: float = field(default=0.5, metadata={"help": "weight of the stay-close-to-W_old term (lambda)"})
    tokens: str = field(default="last", metadata={"help": "'last' concept token (official code) or 'all' "
                                                           "tokens from it to the end of its part of the "
                                                           "sequence"})
    expand_prompts: bool = field(default=False, metadata={"help": "also edit (and preserve) each concept in "
                                                                   "every template of 'templates'"})
    templates: tuple[str, ...] = field(default=OBJECT_TEMPLATES, metadata={"help": "templates of expand_prompts, "
                                                                               "'{}' is the concept"})
    guide_context: str = field(default="bare", metadata={"help": "expanded prompts map to the 'bare' guide "
                                                                  "(commit 4502388, RECE's first-release UCE) or to "
                                                                  "the guide in the same 'template' (the current "
                                                                  "official --expand_prompts)"})
    preserve_empty: bool = field(default=False, metadata={"help": "also keep the empty prompt \"\" over every token "
                                                                   "of the padded sequence (and its pooled embedding), "
                                                                   "as the paper-era code (train_erase.py)"})
    empty_preserve_scale: float | None = field(default=None, metadata={
        "help": "weight of the \"\" term of preserve_empty; None: max(0.1, 1 / (1 + number of preserved concepts)), "
                "the paper-era code's default preserve scale"})
    solve_dtype: str = field(default="float64", metadata={"help": "float32 or float64 for the solve"})

    def __post_init__(self) -> None:
        self.check_choices(tokens=("last", "all"), guide_context=("bare", "template"),
                           solve_dtype=("float32", "float64"))
        self.check_templates("templates")
        if self.lamb < 0 or self.erase_scale < 0 or self.preserve_scale < 0:
            raise InputError("lamb, erase_scale and preserve_scale must be >= 0")
        if self.empty_preserve_scale is not None and self.empty_preserve_scale < 0:
            raise InputError(f"empty_preserve_scale must be >= 0 (or None), not {self.empty_preserve_scale}")

    def empty_scale(self, n_preserved: int) -> float:
        """The weight of the "" term (``preserve_empty``) with ``n_preserved`` preserved concepts:
        ``empty_preserve_scale``, or the paper-era default ``max(0.1, 1 / (1 + n_preserved))``."""
        if self.empty_preserve_scale is not None:
            return self.empty_preserve_scale
        return max(0.1, 1.0 / (1 + n_preserved))


@dataclass(frozen=True)
class Grams:
    """All that UCE's closed form reads of a site's keys (d x d each): ``erase`` ``C^T C``,
    ``guide_erase`` ``G^T C`` and ``preserve`` ``P^T P`` (erase keys ``C``, their row-aligned
    guide keys ``G``, preserved keys ``P``), and ``weighted``, the preserved keys that carry their
    own weight instead of ``s_p``, already weighted (``sum_k s_k K_k^T K_k``: the empty prompt of
    ``preserve_empty``), or None. Keys of any number of concepts reduce to these; RECE forms them
    directly from its derived embeddings."""

    erase: torch.Tensor
    guide_erase: torch.Tensor
    preserve: torch.Tensor
    weighted: torch.Tensor | None = None

    def to(self, device, dtype) -> Grams:
        weighted = None if self.weighted is None else self.weighted.to(device, dtype)
        return Grams(*(t.to(device, dtype) for t in (self.erase, self.guide_erase, self.preserve)), weighted)


@dataclass(frozen=True)
class SiteKeys:
    """UCE's keys for the edit sites that read one input (``"sequence"`` or ``"pooled"``), stacked:
    ``erase`` (n x d), the ``guide`` keys row-aligned with them (n x d), whose values the erase keys
    must take, and ``preserve`` (m x d), whose current values must stay; ``weighted``: more keys whose
    values must stay, each block with its own weight instead of ``s_p`` (``preserve_empty``'s "")."""

    erase: torch.Tensor
    guide: torch.Tensor
    preserve: torch.Tensor
    weighted: tuple[tuple[torch.Tensor, float], ...] = ()

    def grams(self, device, dtype) -> Grams:
        c, g, p = (k.to(device, dtype) for k in (self.erase, self.guide, self.preserve))
        weighted = None
        for k, scale in self.weighted:
            k = k.to(device, dtype)
            weighted = scale * k.T @ k if weighted is None else weighted + scale * k.T @ k
        return Grams(c.T @ c, g.T @ c, p.T @ p, weighted)


def _cat(rows: list[torch.Tensor], width: int, like: torch.Tensor) -> torch.Tensor:
    return torch.cat(rows) if rows else like.new_zeros(0, width)


def stack_keys(erase: list[PromptKeys], guide: list[PromptKeys], preserve: list[PromptKeys]) -> dict[str, SiteKeys]:
    """The :class:`SiteKeys` of prompt keys (``erase[i]`` guided to ``guide[i]``): ``"sequence"``,
    every part of every prompt (an erased prompt's part and its guide's trimmed to the shorter:
    ``tokens="all"``), and ``"pooled"`` where the prompts have a pooled embedding."""
    if not erase or len(erase) != len(guide):
        raise ValueError(f"need one guide per erased prompt, got {len(erase)} erased and {len(guide)} guides")
    rows_e, rows_g = [], []
    for e, g in zip(erase, guide):
        for a, b in zip(e.parts, g.parts, strict=True):
            a, b = _align(a, b)
            rows_e.append(a), rows_g.append(b)
    first = rows_e[0]
    keys = {"sequence": SiteKeys(torch.cat(rows_e), torch.cat(rows_g),
                                 _cat([r for p in preserve for r in p.parts], first.shape[1], first))}
    if erase[0].pooled is not None:
        pooled = erase[0].pooled
        keys["pooled"] = SiteKeys(torch.cat([e.pooled for e in erase]), torch.cat([g.pooled for g in guide]),
                                  _cat([p.pooled for p in preserve], pooled.shape[1], pooled))
    return keys


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


@torch.no_grad()
def normal_matrices(keys: SiteKeys | Grams, *, erase_scale: float, preserve_scale: float, lamb: float,
                    device: torch.device, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """What the closed form of every layer reading ``keys`` shares (d x d each): ``mat2 = lamb I +
    s_e C^T C + Q``, ``G^T C`` and the whole preserve term ``Q = s_p P^T P (+ sum_k s_k K_k^T K_k,
    the keys with their own weight: Grams.weighted)`` (``C``, ``G``, ``P``: erase, guide and
    preserve keys), so that a layer's ``mat1 = lamb W + s_e W_guide G^T C + W Q`` (the sums of the
    formula above, with ``v_i* = W_guide g_i``) and ``W_new = mat1 mat2^-1``."""
    grams = keys.grams(device, dtype) if isinstance(keys, SiteKeys) else keys.to(device, dtype)
    eye = torch.eye(grams.erase.shape[1], dtype=dtype, device=device)
    kept = preserve_scale * grams.preserve
    if grams.weighted is not None:
        kept = kept + grams.weighted
    mat2 = lamb * eye + erase_scale * grams.erase + kept
    return mat2, grams.guide_erase, kept


@torch.no_grad()
def edit_maps(keys: SiteKeys | Grams, *, erase_scale: float, preserve_scale: float, lamb: float,
              device: torch.device, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The two d x d maps every layer reading ``keys`` shares: ``W_new = W M_keep + W_guide M_guide``
    with ``M_keep = (lamb I + Q) mat2^-1`` (``Q = s_p P^T P``, plus the keys with their own weight)
    and ``M_guide = s_e G^T C mat2^-1``: the closed form of :func:`normal_matrices` with its one
    solve done once for all layers."""
    mat2, guide_erase, kept = normal_matrices(keys, erase_scale=erase_scale, preserve_scale=preserve_scale, lamb=lamb,
                                              device=device, dtype=dtype)
    d = mat2.shape[0]
    keep = lamb * torch.eye(d, dtype=dtype, device=device) + kept
    maps = torch.linalg.solve(mat2, torch.cat([keep, erase_scale * guide_erase]), left=False)  # X mat2 = [.; .]
    return maps[:d], maps[d:]


@register_method("uce")
class UCE(ErasureMethod[UCEConfig]):
    """Unified Concept Editing: closed-form edit of where the text enters the denoiser (arXiv 2308.14761)."""

    Config = UCEConfig
    paper = "Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024), arXiv 2308.14761"
    families = frozenset({"sd", "sdxl", "sd3", "flux"})
    family_notes = {
        "sdxl": "cross-attention to_k / to_v only (as the official script); the pooled path is not edited",
        "sd3": "no official script: the UCE-Flux sites (context_embedder with a CLIP and a T5 key per prompt, "
               "and the pooled text embedder)",
        "flux": "context_embedder (T5 key) and the pooled text embedder (CLIP pooled key), as uce_flux_edit.py",
    }
    parameter_set = "text_input"
    lora_export = "exact"  # dW = (V* - W K) K^T M^-1: rank <= the number of erased keys (efface.artifacts_lora)
    preserves = True

    @torch.no_grad()
    def edit(self, pipe, keys: dict[str, SiteKeys | Grams], originals: dict[str, torch.Tensor] | None = None,
             *, reads: tuple[str, ...] | None = None) -> None:
        """Solve and write every edit site of the family (``family.edit_sites``) in place, each with
        the keys of what it reads (``keys["sequence"]``, ``keys["pooled"]``; stacked keys or their
        :class:`Grams`): one solve per kind of input for all concepts and layers (:func:`edit_maps`),
        then one matrix product per layer. Guide values are computed with ``originals`` (default:
        the current weights), so that later edits (RECE) can keep mapping onto the original model's
        values; preserved keys keep their current values. Values are the weight's alone: a site's
        bias (SD3, Flux) stays, so its output ``W c + b`` maps onto the guide's ``W_old c_guide + b``.
        ``reads``: edit only the sites that read these inputs (default: every site, each needing keys)."""
        cfg = self.config
        dtype = getattr(torch, cfg.solve_dtype)
        shared: dict[tuple[str, torch.device], tuple[torch.Tensor, ...]] = {}
        for site in family_of(pipe).edit_sites(pipe):
            if reads is not None and site.reads not in reads:
                continue
            if site.reads not in keys:
                raise KeyError(f"no {site.reads!r} keys for the edit site {site.key}")
            param = get_parameter(pipe, site.key)
            if (site.reads, param.device) not in shared:
                keep, guide = edit_maps(keys[site.reads], erase_scale=cfg.erase_scale,
                                        preserve_scale=cfg.preserve_scale, lamb=cfg.lamb, device=param.device,
                                        dtype=dtype)
                shared[site.reads, param.device] = keep, guide, keep + guide
            keep, guide, both = shared[site.reads, param.device]
            w = param.detach().to(dtype)  # preserved concepts keep their *current* output (W_old in the paper)
            if originals is None:  # guide values from the current weights too
                new = w @ both
            else:
                new = w @ keep + originals[site.key].to(param.device, dtype) @ guide
            param.data.copy_(new.to(param.dtype))

    def _fit(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool) -> None:
        self.edit(pipe, self.keys(pipe, request))

    def keys(self, pipe, request: ErasureRequest, cache: Encodings | None = None) -> dict[str, SiteKeys]:
        """The stacked keys of ``request`` per kind of site, each concept also in every template
        when ``expand_prompts`` is on (every prompt encoded once; ``cache``: see :func:`encode_each`)."""
        cfg = self.config
        templates = cfg.templates if cfg.expand_prompts else ()
        erase, e_pos, guide, g_pos = in_context(pipe, list(request.concepts), templates, list(request.anchors),
                                                guide_template=cfg.guide_context == "template")
        preserve, p_pos, _, _ = in_context(pipe, list(request.preserve), templates)
        found = concept_keys(pipe, [*erase, *guide, *preserve], cfg.tokens, [*e_pos, *g_pos, *p_pos], cache)
        n, m = len(erase), len(erase) + len(guide)
        keys = stack_keys(found[:n], found[n:m], found[m:])
        if cfg.preserve_empty:
            scale = cfg.empty_scale(len(request.preserve))
            empty = empty_keys(pipe, cache)
            keys = {site: replace(k, weighted=((empty[site], scale),)) for site, k in keys.items()}
        return keys
