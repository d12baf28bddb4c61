"""SPM: One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing Applications
(Lyu et al., CVPR 2024, arXiv 2312.16145).

The base model is not changed: each erased concept gets a *concept-semipermeable membrane*, a
rank-1 adapter ``m (alpha / r) U D x`` on every ``Linear`` / ``Conv2d`` of the UNet's transformer
blocks (:mod:`efface.methods.spm_membranes`; ``U`` starts at zero, so the membrane starts as the
identity; on Flux, see below). It is trained at multiplier ``m = 1`` with ESD's loss plus *latent
anchoring*. Each iteration runs the first ``k`` of ``ddim_steps`` DDIM steps (``k`` uniform in ``[1, ddim_steps)``)
from x_T with the membrane on, conditioned on the concept ``c`` with guidance ``start_guidance``,
then, with the original model ``theta`` (membrane off) and the membraned one ``theta + M``::

    e_a = eps_theta(x_t, t, a)          e_c = eps_theta(x_t, t, c)
    L_erase  = || eps_{theta+M}(x_t, t, c) - (e_a - eta (e_c - e_a)) ||^2
    L_anchor = mean_j || eps_{theta+M}(x_t, t, s_j) - eps_theta(x_t, t, s_j) ||^2
    loss     = L_erase + la_strength L_anchor

with ``a`` the anchor ("" by default: the official ``neutral`` prompt) and ``s_j`` the anchoring
batch: alternately the empty prompt and a random direction of the text-embedding space (Gaussian,
normalised, rejected with probability ``cos(s, c)``, scaled to ``U(0.8, 1.2) ||c||``). At
inference each membrane's multiplier is the prompt's *facilitated transport* rate (1 for a prompt
naming the concept, else the cosine similarity of its text embedding with the concept's), per batch
row; several membranes (several concepts) compose as in the official code. The membranes can be
exported as a plain diffusers LoRA (multiplier 1, no transport): ``erased.adapter.save_lora(dir)``
then ``pipe.load_lora_weights(dir)``.

Defaults are the official code's (github.com/Con6924/SPM: ``train_spm.py``, ``src/models/spm.py``,
``src/configs/{config,prompt}.py``, ``configs/*/config.yaml``, ``infer_spm.py``): rank 1, alpha 1,
Kaiming-uniform ``D`` and zero ``U``; 3000 iterations of batch 1, AdamW (8-bit there; weight decay
0.01, bitsandbytes' default) at lr 1e-4 with the ``cosine_with_restarts`` schedule (500 linear
warm-up steps, then 3 cosine cycles; ``get_scheduler_fix``), 30 DDIM steps (``max_denoising_steps``), x_t sampled with
guidance 3 by the model being trained, ``guidance_scale`` (eta) 1, ``la_strength`` 1000,
``sampling_batch_size`` 4; inference metric ``clipcos_tokenuni``, composition by summing the
transport-scaled weights of the SPMs.

On Flux (``FluxPipeline``; not in the paper, whose code is SD 1.x / 2.x only), each part has its
counterpart through the model-family seam:

* placement: every ``Linear`` of the transformer's double-stream ``FluxTransformerBlock`` and
  single-stream ``FluxSingleTransformerBlock`` blocks (attention, text- and image-stream
  projections, feed-forwards, the AdaLN modulation linears), the blocks where image tokens meet
  the text as in the UNet's ``Transformer2DModel`` (the embedders and output layers outside them
  carry no membrane, as the UNet's ResNets do not);
* facilitated transport compares the token sequence the transformer reads
  (``encoder_hidden_states``: the T5 states of ``text_encoder_2``), with the T5 tokenizer's ids for
  the token term; the pooled CLIP embedding takes no part in the rate;
* latent anchoring: the conditioning is a T5 sequence *and* a pooled CLIP vector, so each random
  anchor is a random point of both: a random sequence drawn as on SD and a random pooled vector
  drawn the same way (rejected by its cosine with the concept's pooled embedding, scaled to
  ``U(0.8, 1.2)`` times its norm); the empty-prompt rows are the empty prompt's sequence and pooled.
  The random anchors stand for "some other prompt": pairing a random sequence with the empty
  prompt's pooled vector would anchor every such prompt at one pooled point, and the membranes on
  the AdaLN linears read the pooled path;
* the ESD target and the partial sampling are the family's (flow velocity, Flux's Euler sampler
  with its shift: ``ddim_steps`` counts those steps), guidance ``start_guidance`` real
  classifier-free guidance against the empty prompt;
* the LoRA export writes ``transformer.*`` keys, which ``FluxPipeline.load_lora_weights`` reads.

Differences from the official code, and why:

* Adam in 32 bits by default: the official optimizer is bitsandbytes' 8-bit AdamW, which is
  ``optimizer_8bit=True`` here (it needs that package);
* the UNet is queried at x_t's own DDIM timestep, as in efface's ESD; the official code reads the
  1000-step schedule at index ``1000 k / 30``, 33-42 steps *above* the timestep its sampler stopped
  at (k = 1: the latent is at 924, the query at 966), so it asks a slightly noisier question than
  the latent;
* the anchoring batch is what the official code effectively uses: it builds ``sampling_batch_size``
  (empty, anchor) pairs and its guidance helper keeps the second half of that batch, i.e. for 4:
  the empty prompt twice and two random anchors; here ``anchor_batch`` rows alternate "" and a
  random anchor;
* facilitated transport is computed per batch row from the UNet's ``encoder_hidden_states``
  (the empty-prompt rows of classifier-free guidance get their own, usually lower, rate); the
  official code computes one rate per prompt and applies it to both halves. Rates are clamped to
  [0, 1]. One membrane per concept (the official code trains one SPM per config file);
* training resolution: the model's native latent size (official: dynamic resolution, sides drawn
  from 256-448 px in aspect buckets, never 512);
  every random draw (step, x_T, anchors) comes from the seeded generator;
* ``templates`` (default the bare concept, as the official ``use_template: false``) can put the
  concept into prompt contexts, one drawn per iteration; ``composition="sum"`` adds membranes'
  outputs instead of merging their weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from efface.errors import InputError
from efface.methods.base import ErasureMethod, ErasureRequest, TrainingConfig, register_method
from efface.methods.esd import esd_target
from efface.methods.prompts import fill
from efface.methods.spm_membranes import COMPOSITIONS, SPMAdapter, membrane_blocks, membrane_layers
from efface.models.diffusion import initial_latents, predict, random_index, sample_to, sampler, train_steps
from efface.models.families import Conditioning, family_of
from efface.models.params import named_parameters
from efface.models.precision import cosine_with_restarts
from efface.models.text import encode

log = logging.getLogger(__name__)


@dataclass
class SPMConfig(TrainingConfig):
    iterations: int = field(default=3000, metadata={"help": "optimisation steps per concept"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate"})
    lr_scheduler: str = field(default="cosine_with_restarts", metadata={
        "help": "'cosine_with_restarts' (official: warm-up, then lr_cycles cosine decays) or 'constant'"})
    lr_warmup_steps: int = field(default=500, metadata={"help": "linear warm-up steps of the schedule"})
    lr_cycles: int = field(default=3, metadata={"help": "cosine cycles after the warm-up"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (official: bitsandbytes' default)"})
    rank: int = field(default=1, metadata={"help": "rank of each membrane (1: the paper's one-dimensional adapter)"})
    alpha: float = field(default=1.0, metadata={"help": "membrane scale numerator: output scaled by alpha / rank"})
    negative_guidance: float = field(default=1.0, metadata={"help": "negative guidance eta of the erasing target"})
    start_guidance: float = field(default=3.0, metadata={"help": "guidance scale used to sample x_t"})
    ddim_steps: int = field(default=30, metadata={"help": "DDIM steps of the partial sampling of x_t"})
    batch_size: int = field(default=1, metadata={"help": "x_t samples per iteration, sharing one DDIM step"})
    la_strength: float = field(default=1000.0, metadata={"help": "weight of the latent-anchoring loss (0: off)"})
    anchor_batch: int = field(default=4, metadata={"help": "rows of the anchoring batch, alternately '' and a random "
                                                            "anchor embedding; a multiple of batch_size"})
    composition: str = field(default="merged", metadata={"help": "how membranes combine: 'merged' (official: rate-"
                                                                  "scaled weights summed) or 'sum' (outputs added)"})
    facilitated_transport: bool = field(default=True, metadata={"help": "scale each membrane by the prompt's "
                                                                         "similarity to its concept (False: always 1)"})
    templates: tuple[str, ...] = field(default=("{}",), metadata={"help": "prompt templates, '{}' is the concept (or "
                                                                          "anchor); one drawn per iteration"})

    def __post_init__(self) -> None:
        self.check_bounds(at_least_one=("iterations", "rank", "batch_size", "anchor_batch"),
                          non_negative=("la_strength", "weight_decay"), positive=("lr", "alpha"))
        if self.ddim_steps < 2:
            raise InputError(f"ddim_steps must be at least 2 (x_t is taken after 1 to ddim_steps - 1 steps), "
                             f"not {self.ddim_steps}")
        if self.anchor_batch % self.batch_size:
            raise InputError(f"anchor_batch ({self.anchor_batch}) must be a multiple of batch_size ({self.batch_size})")
        self.check_choices(composition=COMPOSITIONS, lr_scheduler=("cosine_with_restarts", "constant"))
        self.check_bounds(at_least_one=("lr_cycles",), non_negative=("lr_warmup_steps",))
        if self.lr_scheduler != "constant" and self.lr_warmup_steps >= self.iterations:
            log.warning("spm: lr_warmup_steps (%d) >= iterations (%d): the learning rate never reaches lr",
                        self.lr_warmup_steps, self.iterations)
        self.check_templates("templates")


def anchor_embeddings(target: torch.Tensor, empty: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    """The latent-anchoring batch: ``rows`` embeddings alternating ``empty`` and a random direction
    ``s`` of the embedding space, kept with probability ``1 - cos(s, target)``, scaled to
    ``U(0.8, 1.2) ||target||`` (official ``src/engine/sampling.py``)."""
    flat, norm = target.flatten().float().cpu(), target.float().norm().item()
    out = []
    for j in range(rows):
        if j % 2 == 0:
            out.append(empty[0])
            continue
        while True:
            s = torch.randn(flat.shape, generator=generator)
            s = s / s.norm()
            if torch.rand((), generator=generator).item() < 1 - F.cosine_similarity(s, flat, dim=0).item():
                break
        scale = 0.8 + 0.4 * torch.rand((), generator=generator).item()
        out.append((s * scale * norm).view(target.shape[1:]).to(empty.device, empty.dtype))
    return torch.stack(out)


def anchor_conditioning(target: Conditioning, empty: Conditioning, rows: int,
                        generator: torch.Generator) -> Conditioning:
    """:func:`anchor_embeddings` of the token sequence and, where the family has one (Flux), of the
    pooled embedding too, drawn the same way against the concept's pooled embedding (sequences first,
    then pooled vectors): row ``j`` is the empty prompt or a random point of both."""
    embeds = anchor_embeddings(target.embeds, empty.embeds, rows, generator)
    if target.pooled is None:
        return Conditioning(embeds)
    return Conditioning(embeds, anchor_embeddings(target.pooled, empty.pooled, rows, generator))


@register_method("spm")
class SPM(ErasureMethod[SPMConfig]):
    """Concept-semipermeable membranes: one trained rank-1 adapter per concept, applied at inference
    with facilitated transport (arXiv 2312.16145). Changes no base weight: the result is an adapter."""

    Config = SPMConfig
    paper = ("One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing Applications "
             "(Lyu et al., CVPR 2024), arXiv 2312.16145")
    families: ClassVar[frozenset[str]] = frozenset({"sd", "flux"})
    parameter_set: ClassVar[str | None] = None  # adapter-only: no base parameter changes (the membranes)
    lora_export = "adapter"  # its membranes' own LoRA (ErasedModel.save(lora=True) / efface erase --save-lora)
    family_notes: ClassVar[dict[str, str]] = {
        "sdxl": "not ported to SDXL yet: facilitated transport reads the token ids the first text encoder "
                "encoded, but SDXL conditions the UNet on both encoders' penultimate states (so only the cosine "
                "term would apply); the official code is SD 1.x / 2.x only",
        "sd3": "SD3's transformer reads one sequence joining CLIP and T5 tokens (no single tokenizer for the "
               "token term of facilitated transport) and has no membrane placement chosen: not ported",
        "flux": "not in the paper: membranes on every Linear of the double- and single-stream blocks, "
                "transport on the T5 sequence and T5 token ids, random anchors in both the T5 sequence and the "
                "pooled CLIP space; the LoRA export writes transformer.* keys",
    }

    def _fit(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool) -> SPMAdapter:
        cfg = self.config
        if request.preserve:
            log.info("spm: preserved concepts are not used (latent anchoring uses random embeddings)")
        for _, _, p in named_parameters(pipe):
            p.requires_grad_(False)
        family = family_of(pipe)
        layers = membrane_layers(family.denoiser(pipe), membrane_blocks(pipe))
        adapter = SPMAdapter(layers, list(request.concepts), rank=cfg.rank, alpha=cfg.alpha,
                             composition=cfg.composition, transport=cfg.facilitated_transport,
                             denoiser=family.denoiser_name).reset(generator)
        with adapter.installed(pipe):
            adapter.requires_grad_(True)
            for k in range(len(request.concepts)):
                self._train_membrane(pipe, adapter, request, k, generator, progress)
        return adapter

    def _train_membrane(self, pipe, adapter: SPMAdapter, request: ErasureRequest, k: int,
                        generator: torch.Generator, progress: bool) -> None:
        """Membrane ``k`` on concept ``k`` at multiplier 1, every other membrane off (multiplier 0)."""
        cfg, unet, n = self.config, family_of(pipe).denoiser(pipe), self.config.batch_size
        with torch.no_grad():
            concepts = encode(pipe, [fill(t, request.concepts[k]) for t in cfg.templates]).to(unet.device, unet.dtype)
            anchors = encode(pipe, [fill(t, request.anchors[k]) for t in cfg.templates]).to(unet.device, unet.dtype)
            empty = encode(pipe, [""]).to(unet.device, unet.dtype)
        timesteps = sampler(pipe, cfg.ddim_steps).timesteps
        on = torch.zeros(len(request.concepts))
        on[k] = 1.0

        def loss(_: int) -> torch.Tensor:
            j = random_index(len(cfg.templates), generator) if len(cfg.templates) > 1 else 0
            step = 1 + random_index(cfg.ddim_steps - 1, generator)
            c, a = concepts[j : j + 1].expand(n), anchors[j : j + 1].expand(n)
            x_T = initial_latents(pipe, n, generator)
            with adapter.fixed(on):  # x_t from the model being trained
                x_t = sample_to(pipe, c, empty, step, cfg.ddim_steps, cfg.start_guidance, generator, x_T)
            t = timesteps[step]
            s = anchor_conditioning(concepts[j], empty, cfg.anchor_batch, generator) if cfg.la_strength else None
            x_s = x_t.repeat(cfg.anchor_batch // n, 1, 1, 1) if s is not None else None
            with torch.no_grad(), adapter.fixed(0.0):  # the original model
                e_a, e_c = predict(pipe, torch.cat([x_t, x_t]), t, Conditioning.cat([a, c])).chunk(2)
                e_s = predict(pipe, x_s, t, s) if s is not None else None
            with adapter.fixed(on):
                erase = F.mse_loss(predict(pipe, x_t, t, c).float(),
                                   esd_target(e_a, e_c, cfg.negative_guidance).float())
                if s is None:
                    return erase
                anchor = F.mse_loss(predict(pipe, x_s, t, s).float(), e_s.float())
            return erase + cfg.la_strength * anchor

        membrane = list(adapter.membranes[k].parameters())
        schedule = (cosine_with_restarts(cfg.lr_warmup_steps, cfg.iterations, cfg.lr_cycles)
                    if cfg.lr_scheduler == "cosine_with_restarts" else None)
        train_steps(loss, membrane, cfg.iterations, lr=cfg.lr, name=f"{self.name}[{request.concepts[k]}]",
                    progress=progress, optimizer="adamw", weight_decay=cfg.weight_decay, lr_schedule=schedule)
