"""MACE: Mass Concept Erasure in Diffusion Models (Lu et al., CVPR 2024, arXiv 2403.06135).

Three stages on every cross-attention key / value projection ``W`` (``attn2.to_k``, ``attn2.to_v``;
Flux: below):

1. **Closed-form refinement (CFR).** Each concept is put into every template (``"a photo of
   {}"``) and the same template is filled with its mapping concept (the anchor). The keys are the
   embeddings of the tokens that *co-occur* with the concept, not the concept's own tokens: the
   tokens before it (common prefix) and every token after it (end-of-text and padding, aligned
   from the end of each phrase), ``e^f``; each is mapped onto the original value of its counterpart
   in the anchor prompt, ``W e^g``. With preserved prompts ``e^p`` (every token)::

       W' = argmin  lamb ||W' - W||^2 + sum ||W' e^f - W e^g||^2 + s_p sum ||W' e^p - W e^p||^2

   which is UCE's closed form (:func:`efface.methods.uce.uce_solve`, erase scale 1,
   ``train_preserve_scale`` as s_p), in float64. With the keys stacked it is ``W' = W M`` with one
   d x d map ``M = (lamb I + E^g^T E^f + s_p E^p^T E^p)(lamb I + E^f^T E^f + s_p E^p^T E^p)^-1``
   shared by every layer (:func:`cfr_map`): one solve for all concepts and layers.
2. **One LoRA per concept** (rank ``rank``) on every ``to_k`` / ``to_v`` of the refined model,
   trained separately for each concept on ``num_images`` images of it: the loss is the sum over
   cross-attention layers of the Frobenius norm of the attention probabilities of the concept's
   tokens (and, ``use_pooler``, of the end-of-text tokens, which in SD 1.x is every padding token)
   at the pixels inside the concept's mask, for a noisy latent at a timestep drawn with the
   official importance sampling (mostly t in 200..400) and a prompt from ``templates``.
3. **Closed-form fusion** of all LoRAs: with ``e^f`` every token of the concept prompts of concept
   i, ``Delta W_i`` its LoRA and ``W'`` the refined weights::

       W* = argmin  lamb ||W* - W'||^2 + sum_i sum ||W* e^f - (W' + Delta W_i) e^f||^2
                    + s_f sum ||W* e^p - W e^p||^2

   (``fuse_preserve_scale`` as s_f; preserved values from the original weights, as the official
   caches). The artifact is the fused ``to_k`` / ``to_v`` (parameter set ``xattn_kv``). The keys
   enter only through ``G_i = e^f_i^T e^f_i`` per concept and ``e^p^T e^p`` (d x d, shared by
   every layer), so with ``mat2 = lamb I + sum_i G_i + s_f e^p^T e^p`` one solve gives every layer's
   ``W* = W' (lamb I + sum_i G_i) mat2^-1 + s_f W e^p^T e^p mat2^-1 + (sum_i B_i A_i G_i) mat2^-1``
   (``Delta W_i = B_i A_i``, the LoRA's factors: :func:`fused_weight`; every ``A_i G_i`` of every
   layer in one batched product, :func:`lora_keys`), a few matrix products per layer for all
   concepts at once.

The prompts are encoded once each, in batches, over the whole padded length (the CFR's keys reach
into the padding) and reduced at once to those d x d matrices (:class:`ClosedFormStats`:
``n + 3`` of them, 4.7 MB each at d = 768 in float64). Measured on an SD 1.4-sized model:
docs/erasure.md, "Closed forms at scale".

Flux (the joint-attention form; not in the paper, whose code is SD 1.x only). Flux's text enters
the transformer linearly only at ``context_embedder`` (the T5 token states) and the pooled text
embedder (CLIP's pooled embedding): the family's closed-form sites (``Family.edit_sites``, parameter
set ``text_input``; on SD the same set is the cross-attention ``to_k`` / ``to_v``). After the first
block the text stream's keys and values depend on the image and the timestep, so no closed form
can sit there. So: the CFR maps the co-occurring T5 tokens (no start token; the end token and the
padding aligned from the end) onto the anchor's at ``context_embedder``, and each concept
prompt's pooled embedding onto its anchor prompt's at the pooled embedder (CLIP's pooled embedding
is its end-of-text state: a co-occurring token of the SD CFR); the LoRA of each concept sits on
``context_embedder``, trained with the loss above read from the *image-to-text* part of every
double- and single-stream joint attention (the softmax over text and image keys, at the concept's
T5 tokens and, ``use_pooler``, T5's end token; :mod:`efface.methods.mace_attention`); the fusion
solves at ``context_embedder`` as on SD (the pooled site has no LoRA: its fusion only pulls the
refined weights towards the preserved values). Biases cancel from every objective (``W' k + b``
against ``W g + b``). Measured on toy-flux: docs/erasure.md, "On toy-flux".

Images and masks (``data``): ``"generate"`` (official) samples ``num_images`` images per concept
from the original model with ``image_prompt`` ("a photo of the {}"), guidance 7.5; the official
code then segments them with Grounded-SAM. Here the mask comes from ``segmenter``, a callable
given to the constructor / ``erase()`` (``segmenter(images: list[PIL.Image], concept) -> N x H x W
bool``, at any resolution), or by default from the sampling's own cross-attention maps of the
concept tokens (where the map reaches ``mask_threshold`` of its maximum). ``"source"`` takes the
images and their masks from ``image_source``, a callable given to the constructor / ``erase()``
(``image_source(concept, n, generator) -> (images, masks)``: ``n`` uint8 N x H x W x 3 images at
the model's resolution, or PIL images, and N x H x W bool masks; one that has a ``check(concepts)``
method refuses the concepts it cannot give before any work). On toy-sd the toy world hands in its
drawn images with their exact shape masks (``efface.toy.presets.method_inputs("mace")``):
toy-sd's own training distribution, with the segmentation the toy world knows.

Defaults are the official code's object configuration (github.com/Shilin-LU/MACE,
``configs/object/erase_ship.yaml``, the README's example): lamb 1e3 (automobile 1e2, bird 10;
celebrities, artists and nudity 0 with preservation caches), train / fuse preserve scale 0, rank
1, AdamW lr 1e-5 (celebrities, artists 1e-4), weight decay 0.01, gradient norm clipped to 1, 50
steps of batch 1, importance sampling on, ``use_pooler`` on, all 30 object prompt augmentations
(``aug_length = prompt_len = 30``; ``src/cfr_utils.py``), 8 images per concept (README,
``inference.py``: 30 DPM-Solver steps, guidance 7.5, "a photo of the {concept}").

Preservation, against the official code (``src/cfr_lora_training.py``, ``src/fuse_lora_close_form.py``):
the official closed forms read two caches of ``(sum W e e^T, sum e e^T)`` over every token of
their prompts, a *prior* one (``cache_coco.pt``: every MS-COCO caption) and a *domain* one (other
celebrities / artists, ``preserve_weight`` 8e3 to 2e5; objects and nudity use none), neither
shipped. Here the preserved prompts ``e^p`` are the request's preserved concepts in the templates:
the domain term, weighted ``domain_weight`` (default 1); the prior term has no counterpart (absent).
With at most ``max_memory`` (1000, every config) concepts the official CFR builds its cache as
``s_p (prior + w domain)`` and then solves with ``preserve_scale = s_p``, so the preserved prompts
enter with ``s_p^2`` (with more concepts, once); the fusion applies ``s_f`` once.
``cfr_recipe="official"`` reproduces that (CFR weight ``s_p^2 w``), the default ``"paper"`` the
single ``s_p w`` of the formula above; both fuse with ``s_f w``
(:meth:`MACEConfig.cfr_preserve_weight`, :meth:`MACEConfig.fuse_preserve_weight`).
The two recipes differ only where ``train_preserve_scale`` is neither 0 nor 1 (the official
celebrity / art / nudity configs: 1e-4, 7e-7).

Differences from the official code, and why:

* preservation uses the request's preserved concepts in the templates (every token, like the
  official COCO / domain caches, which are not shipped; above); the official code's anchor
  ("ground", "sky", "a person") is the request's anchor, default "" (name one for real models);
* images are sampled with DDIM (``image_steps``) and kept as latents; the official code decodes
  them to JPEG, re-encodes them with ImageNet normalisation (not the VAE's [-1, 1]) and random
  crops; masks from attention maps replace Grounded-SAM unless a ``segmenter`` is given;
* with ``batch_size`` > 1 every sample's own mask counts (the official loss reads the first sample);
* all random draws come from the seeded generator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from efface.config import Preset
from efface.errors import InputError
from efface.images import images_to_array
from efface.methods.base import ErasureMethod, ErasureRequest, TrainingConfig, register_method
from efface.methods.mace_attention import (AttentionLoss, MapRecorder, attention_processors, importance_weights,
                                           lora_hooks, make_loras)
from efface.methods.prompts import fill
from efface.methods.mace_closed_forms import (ClosedFormStats, cfr_map, cooccurring_indices, fused_weight, fusion_maps,
                                              lora_keys)
from efface.methods.uce_keys import ENCODE_BATCH, Encodings, encode_each
from efface.models.diffusion import add_noise, num_train_timesteps, predict, random_index, sample_to, train_steps
from efface.models.families import family_of
from efface.models.params import named_parameters, select
from efface.models.text import encode, token_count

log = logging.getLogger(__name__)

# the official object prompt augmentations (src/cfr_utils.py, prompt_augmentation), the first 30
OBJECT_TEMPLATES: tuple[str, ...] = (
    "{} in a photo", "{} in a snapshot", "A snapshot of {}", "A photograph showcasing {}", "An illustration of {}",
    "A digital rendering of {}", "A visual representation of {}", "A graphic of {}", "A shot of {}",
    "A photo of {}", "A black and white image of {}", "A depiction in portrait form of {}",
    "A scene depicting {} during a public gathering", "{} captured in an image",
    "A depiction created with oil paints capturing {}", "An image of {}", "A drawing capturing the essence of {}",
    "An official photograph featuring {}", "A detailed sketch of {}", "{} during sunset/sunrise",
    "{} in a detailed portrait", "An official photo of {}", "Historic photo of {}", "Detailed portrait of {}",
    "A painting of {}", "HD picture of {}", "Magazine cover capturing {}", "Painting-like image of {}",
    "Hand-drawn art of {}", "An oil portrait of {}",
)
Segmenter = Callable[[list, str], "np.ndarray | torch.Tensor"]
ImageSource = Callable[[str, int, torch.Generator], tuple]  # (concept, n, generator) -> (images, masks)
LoRAFactors = tuple[torch.Tensor, torch.Tensor]  # (B, A): Delta W = B A


@dataclass
class MACEConfig(TrainingConfig):
    lamb: float = field(default=1e3, metadata={"help": "weight of the stay-close term of both closed forms (lambda)"})
    train_preserve_scale: float = field(default=0.0, metadata={"help": "weight of preserved prompts in the CFR"})
    fuse_preserve_scale: float = field(default=0.0, metadata={"help": "weight of preserved prompts in the fusion"})
    cfr_recipe: str = field(default="paper", metadata={
        "help": "'paper': the CFR weighs preserved prompts train_preserve_scale x domain_weight; 'official': "
                "train_preserve_scale^2 x domain_weight, as cfr_lora_training.py (the scale in its cache, then "
                "again in the solve)"})
    domain_weight: float = field(default=1.0, metadata={
        "help": "weight of the preserved concepts in the templates (the official domain cache, preserve_weight: "
                "celebrities 8e3 to 2e5, art 8e4) in both closed forms; the official prior cache (MS-COCO "
                "captions, weight 1) is not shipped and has no counterpart"})
    templates: tuple[str, ...] = field(default=OBJECT_TEMPLATES, metadata={"help": "prompt augmentations, '{}' is "
                                                                              "the concept (or anchor)"})
    rank: int = field(default=1, metadata={"help": "rank of each concept's LoRA"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the LoRAs"})
    iterations: int = field(default=50, metadata={"help": "LoRA training steps per concept"})
    batch_size: int = field(default=1, metadata={"help": "images per LoRA step"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient norm clipping (0: off)"})
    importance_sampling: bool = field(default=True, metadata={"help": "draw timesteps mostly in 200..400 "
                                                                      "(official), else uniformly"})
    use_pooler: bool = field(default=True, metadata={"help": "also suppress the end-of-text tokens' attention"})
    use_mask: bool = field(default=True, metadata={"help": "loss inside the concept's mask (off: every pixel, "
                                                           "as for artistic styles)"})
    data: str = field(default="generate", metadata={"help": "'generate' images with the model, or take them "
                                                            "and their masks from the injected image 'source'"})
    num_images: int = field(default=8, metadata={"help": "images per concept"})
    image_prompt: str = field(default="a photo of the {}", metadata={"help": "prompt of generated images"})
    image_steps: int = field(default=30, metadata={"help": "DDIM steps of generated images"})
    image_guidance: float = field(default=7.5, metadata={"help": "guidance scale of generated images"})
    mask_threshold: float = field(default=0.5, metadata={"help": "attention-map mask: fraction of the map's "
                                                                 "maximum (not official: Grounded-SAM)"})
    solve_dtype: str = field(default="float64", metadata={"help": "float32 or float64 for the closed forms"})

    def __post_init__(self) -> None:
        self.check_choices(data=("generate", "source"), solve_dtype=("float32", "float64"),
                           cfr_recipe=("paper", "official"))
        self.check_templates("templates")
        if self.image_prompt.count("{}") != 1:
            raise InputError("image_prompt needs exactly one '{}' for the concept")
        self.check_bounds(at_least_one=("rank", "iterations", "batch_size", "num_images", "image_steps"),
                          non_negative=("lamb", "train_preserve_scale", "fuse_preserve_scale", "domain_weight",
                                        "weight_decay", "max_grad_norm"), positive=("lr",))
        if not 0 < self.mask_threshold <= 1:
            raise InputError(f"mask_threshold must be in (0, 1], not {self.mask_threshold}")

    def cfr_preserve_weight(self) -> float:
        """The weight of ``P^T P`` (preserved prompts, every token) in the CFR: ``s_p w`` (``"paper"``)
        or ``s_p^2 w`` (``"official"``), ``s_p`` = ``train_preserve_scale``, ``w`` = ``domain_weight``."""
        s = self.train_preserve_scale
        return (s * s if self.cfr_recipe == "official" else s) * self.domain_weight

    def fuse_preserve_weight(self) -> float:
        """The weight of ``P^T P`` in the fusion: ``fuse_preserve_scale x domain_weight`` (the official
        fusion applies its scale once, with either recipe)."""
        return self.fuse_preserve_scale * self.domain_weight


def concept_positions(pipe, template: str, concept: str, use_pooler: bool) -> torch.Tensor:
    """Boolean (T,) positions of ``concept``'s tokens in the padded ``fill(template, concept)`` of the
    token sequence the denoiser reads (SD: CLIP's; Flux: T5's), and with ``use_pooler`` of every
    end-of-text id (in CLIP SD 1.x tokenizers: padding too; T5: its one end token)."""
    family = family_of(pipe)
    tokenizer = family.sequence_tokenizer(pipe)
    ids = tokenize_one(tokenizer, fill(template, concept), family.sequence_length(pipe))
    end = family.word_positions(pipe, template, concept)[-1]
    n = len(tokenizer(concept, add_special_tokens=False).input_ids)
    pos = torch.zeros(len(ids), dtype=torch.bool)
    pos[end - n + 1 : end + 1] = True
    if use_pooler:
        pos |= ids == tokenizer.eos_token_id
    return pos


def tokenize_one(tokenizer, text: str, length: int | None = None) -> torch.Tensor:
    return tokenizer([text], padding="max_length", max_length=length or tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids[0]


@register_method("mace")
class MACE(ErasureMethod[MACEConfig]):
    """MACE: CFR of cross-attention K/V, one LoRA per concept, closed-form fusion (arXiv 2403.06135).

    ``MACE(segmenter=fn)`` (or ``erase(..., segmenter=fn)``) segments generated images with ``fn``;
    ``MACE(data="source", image_source=fn)`` takes the images and masks from ``fn`` instead.
    """

    Config = MACEConfig
    paper = "MACE: Mass Concept Erasure in Diffusion Models (Lu et al., CVPR 2024), arXiv 2403.06135"
    parameter_set = "text_input"  # SD: cross-attention to_k / to_v; Flux: context_embedder and the pooled embedder
    lora_export = "exact"  # the fused closed form: the change at its exact numerical rank, untruncated
    preserves = True
    families = frozenset({"sd", "flux"})
    family_notes = {
        "sdxl": "not ported to SDXL yet: the closed forms and LoRAs would edit the cross-attention to_k / to_v, "
                "but SDXL's pooled text embedding (add_embedding) would still carry the concept unedited, and "
                "the co-occurring-token alignment of the CFR reads one CLIP tokenizer (the official code is "
                "SD 1.x only); not verified on SDXL",
        "sd3": "the closed forms would sit on context_embedder as on Flux, but SD3's sequence joins CLIP-L, "
               "CLIP-G and T5 tokens, so the CFR's co-occurring-token alignment would need one per part: not "
               "ported",
        "flux": "joint-attention form: CFR, LoRAs and fusion on context_embedder (T5 states), the CFR also on "
                "the pooled text embedder; the loss reads the image-to-text part of every joint attention",
    }

    def __init__(self, config: MACEConfig | None = None, *, preset: str | Preset | None = None,
                 segmenter: Segmenter | None = None, image_source: ImageSource | None = None, **overrides):
        super().__init__(config, preset=preset, **overrides)
        self.segmenter = segmenter
        self.image_source = image_source

    def check(self, pipe, request: ErasureRequest) -> None:
        super().check(pipe, request)
        cfg = self.config
        if cfg.data == "source":
            if self.image_source is None:
                raise InputError("data='source' needs an image source: MACE(image_source=fn) or erase(..., "
                                 "image_source=fn), fn(concept, n, generator) -> (images, masks) (on toy-sd: "
                                 "**efface.toy.presets.method_inputs('mace'); efface erase --model toy hands it in); "
                                 "or use data='generate'")
            if callable(getattr(self.image_source, "check", None)):
                self.image_source.check(request.concepts)
        prompts = [fill(t, w) for t in (*cfg.templates, cfg.image_prompt)
                   for w in (*request.concepts, *request.anchors, *request.preserve)]
        family = family_of(pipe)
        limits = {id(family.tokenizer(pipe)): (family.tokenizer(pipe), family.tokenizer(pipe).model_max_length),
                  id(family.sequence_tokenizer(pipe)): (family.sequence_tokenizer(pipe), family.sequence_length(pipe))}
        if any(max(token_count(tok, p) for p in prompts) > limit for tok, limit in limits.values()):
            raise InputError("a template filled with a concept is longer than the tokenizer keeps; "
                             "shorten the templates or the concept")

    def _fit(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool) -> None:
        cfg = self.config
        dtype = getattr(torch, cfg.solve_dtype)
        for _, _, p in named_parameters(pipe):
            p.requires_grad_(False)
        weights = self.site_weights(pipe)
        original = {k: p.detach().clone() for k, (_, p) in weights.items()}
        data = [self.images(pipe, c, generator) for c in request.concepts]  # from the original model
        stats = self.statistics(pipe, request, dtype)
        self.refine(pipe, stats)
        refined = {k: p.detach().clone() for k, (_, p) in weights.items()}
        factors = [self.train_lora(pipe, c, x0, masks, generator, progress)
                   for c, (x0, masks) in zip(request.concepts, data)]
        self.fuse_loras(pipe, stats, original, refined, factors)

    @staticmethod
    def site_weights(pipe) -> dict[str, tuple[str, torch.nn.Parameter]]:
        """Weight key -> (what it reads, the weight) of every closed-form site (``Family.edit_sites``:
        SD's cross-attention to_k / to_v read the token sequence; Flux's context_embedder the T5
        sequence, its pooled text embedder the CLIP pooled embedding)."""
        weights = select(pipe, "text_input")
        return {site.key: (site.reads, weights[site.key]) for site in family_of(pipe).edit_sites(pipe)
                if site.key in weights}

    @torch.no_grad()
    def statistics(self, pipe, request: ErasureRequest, dtype: torch.dtype) -> dict[str, ClosedFormStats]:
        """Every prompt of both closed forms encoded once, in batches (whole padded prompts: the CFR's
        keys reach into the padding), reduced at once to :class:`ClosedFormStats` (in ``dtype``) per
        input the sites read: ``"sequence"`` (the co-occurring tokens of each concept in every
        template onto the anchor prompts'; each distinct anchor prompt encoded once) and, where the
        family has a pooled site, ``"pooled"`` (each concept prompt's pooled embedding onto its anchor
        prompt's: in CLIP the pooled embedding *is* an end-of-text state, a co-occurring token)."""
        cfg, family = self.config, family_of(pipe)
        tok, length = family.sequence_tokenizer(pipe), family.sequence_length(pipe)
        pooled = any(reads == "pooled" for reads, _ in self.site_weights(pipe).values())
        n_t = len(cfg.templates)
        anchors: Encodings = {}
        sums: dict[str, list] = {"sequence": [None, None, []], "pooled": [None, None, []]}

        def add(kind: str, k: torch.Tensor, s: torch.Tensor, per_concept: torch.Tensor) -> None:
            acc = sums[kind]
            acc[0] = k.T @ k if acc[0] is None else acc[0] + k.T @ k
            acc[1] = s.T @ k if acc[1] is None else acc[1] + s.T @ k
            acc[2].append(per_concept.transpose(1, 2) @ per_concept)

        pairs = list(zip(request.concepts, request.anchors))
        group = max(1, ENCODE_BATCH // n_t)  # whole concepts per batch
        for b in range(0, len(pairs), group):
            old = [fill(t, c) for c, _ in pairs[b : b + group] for t in cfg.templates]
            new = [fill(t, a) for _, a in pairs[b : b + group] for t in cfg.templates]
            c_old, c_new = encode_each(pipe, old), encode_each(pipe, new, cache=anchors)
            e_old = torch.stack([e.embeds[0] for e in c_old]).to(dtype)
            e_new = torch.stack([e.embeds[0] for e in c_new]).to(dtype)
            rows = [cooccurring_indices(tok, o, a, length) for o, a in zip(old, new)]
            k = torch.cat([e_old[i, r] for i, (r, _) in enumerate(rows)])
            s = torch.cat([e_new[i, r] for i, (_, r) in enumerate(rows)])
            add("sequence", k, s, e_old.reshape(len(old) // n_t, -1, e_old.shape[-1]))  # every token per concept
            if pooled:
                p_old = torch.cat([e.pooled for e in c_old]).to(dtype)
                p_new = torch.cat([e.pooled for e in c_new]).to(dtype)
                add("pooled", p_old, p_new, p_old.reshape(len(old) // n_t, n_t, -1))
        kept = [fill(t, p) for p in request.preserve for t in cfg.templates]
        preserved: Encodings = {}  # encoded once, read by both kinds
        out = {}
        for kind in ("sequence", "pooled") if pooled else ("sequence",):
            kk, sk, concepts = sums[kind]
            pp = torch.zeros_like(kk)
            for b in range(0, len(kept), ENCODE_BATCH):
                enc = encode_each(pipe, kept[b : b + ENCODE_BATCH], cache=preserved)
                rows = [e.embeds[0] if kind == "sequence" else e.pooled for e in enc]
                p = torch.cat(rows).to(dtype)
                pp = pp + p.T @ p
            out[kind] = ClosedFormStats(kk, sk, torch.cat(concepts), pp)
        return out

    @torch.no_grad()
    def refine(self, pipe, stats: dict[str, ClosedFormStats]) -> None:
        """Stage 1, CFR: the co-occurring words' keys onto the anchor prompts' values, in place (one
        d x d map per input the sites read, shared by every site that reads it: :func:`cfr_map`)."""
        cfg = self.config
        maps = {kind: cfr_map(st, lamb=cfg.lamb, preserve_scale=cfg.cfr_preserve_weight()) for kind, st in stats.items()}
        for reads, param in self.site_weights(pipe).values():
            m = maps[reads]
            param.data.copy_((param.detach().to(m.dtype) @ m.to(param.device)).to(param.dtype))  # W' = W M

    @torch.no_grad()
    def fuse_loras(self, pipe, stats: dict[str, ClosedFormStats], original: dict[str, torch.Tensor],
                   refined: dict[str, torch.Tensor], factors: list[dict[str, LoRAFactors]]) -> None:
        """Stage 3: the closed-form fusion of every concept's LoRA (``factors[i][key]``: ``(B_i, A_i)``,
        from :meth:`train_lora`) into the refined weights, in place; one solve per input the sites
        read (:func:`fusion_maps`), then :func:`fused_weight` per site (a site without LoRAs, Flux's
        pooled one, is fused with none: the refined weights pulled towards the preserved values)."""
        cfg = self.config
        weights = self.site_weights(pipe)
        device = next(iter(weights.values()))[1].device
        maps = {kind: fusion_maps(st.to(device), lamb=cfg.lamb, preserve_scale=cfg.fuse_preserve_weight())
                for kind, st in stats.items()}
        trained = [k for k in weights if k in factors[0]]
        dtype = maps["sequence"][0].dtype
        ranks = [factors[0][k][1].shape[0] for k in trained]
        downs = torch.stack([torch.cat([f[k][1] for k in trained]) for f in factors]).to(device, dtype)
        a_g = dict(zip(trained, lora_keys(stats["sequence"], downs).split(ranks, dim=1)))  # A_i G_i per site
        for key, (reads, param) in weights.items():
            ups = torch.stack([f[key][0] for f in factors]).to(device, dtype) if key in a_g else None
            new = fused_weight(refined[key].to(device, dtype), original[key].to(device, dtype), ups, a_g.get(key),
                               maps[reads])
            param.data.copy_(new.to(param.dtype))

    @torch.no_grad()
    def images(self, pipe, concept: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``num_images`` latents x_0 of ``concept`` and their masks (N x 1 x H x W, or None)."""
        cfg = self.config
        if cfg.data == "source":
            return self._sourced(pipe, concept, generator)
        family = family_of(pipe)
        unet = family.denoiser(pipe)
        prompt = fill(cfg.image_prompt, concept)
        cond = encode(pipe, [prompt] * cfg.num_images).to(unet.device, unet.dtype)
        empty = encode(pipe, [""]).to(unet.device, unet.dtype)
        pos = concept_positions(pipe, cfg.image_prompt, concept, use_pooler=False).expand(cfg.num_images, -1)
        hw = tuple(family.latent_shape(pipe)[1:])
        recorder = MapRecorder(pos, hw)
        with attention_processors(pipe, recorder=recorder):
            x0 = sample_to(pipe, cond, empty, cfg.image_steps, cfg.image_steps, cfg.image_guidance, generator)
        if not cfg.use_mask:
            return x0, None
        if self.segmenter is None:
            return x0, recorder.masks(cfg.mask_threshold)
        log.info("mace: masks of %r from the injected segmenter %r (not recorded in the manifest)",
                 concept, getattr(self.segmenter, "__name__", type(self.segmenter).__name__))
        return x0, self._segment(pipe, x0, concept)

    def _segment(self, pipe, x0: torch.Tensor, concept: str) -> torch.Tensor:
        from PIL import Image

        pixels = family_of(pipe).decode_latents(pipe, x0)
        arrays = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        masks = torch.as_tensor(np.asarray(self.segmenter([Image.fromarray(a) for a in arrays], concept)))
        if masks.ndim != 3 or masks.shape[0] != len(x0):
            raise InputError(f"the segmenter returned shape {tuple(masks.shape)}; it must return one "
                             f"H x W mask per image ({len(x0)} x H x W)")
        return masks.bool()[:, None]

    def _sourced(self, pipe, concept: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``num_images`` latents x_0 and masks from the injected ``image_source``."""
        n = self.config.num_images
        log.info("mace: images and masks of %r from the injected image source %r (not recorded in the manifest)",
                 concept, getattr(self.image_source, "__name__", type(self.image_source).__name__))
        images, masks = self.image_source(concept, n, generator)
        images = images_to_array(images) if isinstance(images, (list, tuple)) else np.asarray(images)
        masks = torch.as_tensor(np.asarray(masks)).bool()
        if images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise InputError(f"the image source returned images of shape {images.shape} ({images.dtype}); it "
                             f"must return {n} uint8 H x W x 3 images (or PIL images)")
        if tuple(masks.shape) != images.shape[:3]:
            raise InputError(f"the image source returned masks of shape {tuple(masks.shape)}; it must return one "
                             f"H x W mask per image ({images.shape[0]} x {images.shape[1]} x {images.shape[2]})")
        family = family_of(pipe)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents, unet = family.encode_images(pipe, x, generator), family.denoiser(pipe)
        return latents.to(unet.device, unet.dtype), masks[:, None] if self.config.use_mask else None

    def train_lora(self, pipe, concept: str, x0: torch.Tensor, masks: torch.Tensor | None,
                   generator: torch.Generator, progress: bool) -> dict[str, LoRAFactors]:
        """Stage 2: one LoRA per ``"sequence"`` site for ``concept`` on the refined model; returns per
        site weight key its factors ``(B, A)``, ``Delta W = B A``."""
        family = family_of(pipe)
        cfg, unet = self.config, family.denoiser(pipe)
        with torch.no_grad():
            emb = encode(pipe, [fill(t, concept) for t in cfg.templates]).to(unet.device, unet.dtype)
        positions = torch.stack([concept_positions(pipe, t, concept, cfg.use_pooler) for t in cfg.templates])
        loras = make_loras(pipe, cfg.rank, generator)
        params = [p for lora in loras.values() for p in lora.parameters()]
        steps = num_train_timesteps(pipe)
        p_t = importance_weights(steps) if cfg.importance_sampling else torch.full((steps,), 1.0 / steps)
        loss_fn, n = AttentionLoss(), cfg.batch_size

        def loss(_: int) -> torch.Tensor:
            idx = random_index(len(x0), generator, n)
            k = random_index(len(cfg.templates), generator, n)
            t = torch.multinomial(p_t, n, replacement=True, generator=generator)
            x_t, _ = add_noise(pipe, x0[idx], t, generator)
            loss_fn.set(positions[k], masks[idx] if masks is not None else None, tuple(x0.shape[-2:]))
            predict(pipe, x_t, t.to(unet.device), emb[k])  # the loss is read from the attention probabilities
            return loss_fn.value()

        with lora_hooks(pipe, loras), attention_processors(pipe, loss_fn):
            train_steps(loss, params, cfg.iterations, lr=cfg.lr, name=f"{self.name} ({concept})", progress=progress,
                        optimizer="adamw", weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)
        return {key: lora.factors() for key, lora in loras.items()}
