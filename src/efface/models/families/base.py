"""The model-family seam: everything that differs between SD 1.x / 2.x, SDXL, SD3 and Flux.

A :class:`Family` is a stateless object chosen from the pipeline's class (:func:`family_of`). Methods,
attacks, metrics and the benchmark reach a model only through it: the trainable components, the
named parameter sets in that family's module names, prompt encoding through the pipeline's own
``encode_prompt`` (a :class:`Conditioning`), the denoiser call with or without classifier-free
guidance, the forward process and training target, the sampler, latent shapes and the places where
a closed-form edit applies.

Latents are always ``B x C x H x W`` on the method side; a family that packs them (Flux: 2 x 2
patches) packs and unpacks inside :meth:`Family.predict`. Timesteps are on the training scale of
``num_train_timesteps`` (0 .. 1000) for every family: DDPM timesteps for UNets, ``1000 sigma`` for
flow matching, as diffusers' schedulers count them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from efface.errors import InputError
from efface.models.tokens import check_fits

Rule = Callable[[str, str], bool]  # (component, parameter name) -> in the set


@dataclass(frozen=True)
class Conditioning:
    """What a family's denoiser reads from a batch of prompts: the token sequence ``embeds``
    (B x T x D) and, for families with a pooled text path (SDXL, SD3, Flux), ``pooled`` (B x P).
    Rows index, expand, concatenate and move like a tensor's batch dimension."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.embeds.shape

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        return Conditioning(fn(self.embeds), None if self.pooled is None else fn(self.pooled))

    def __getitem__(self, index) -> Conditioning:
        """Rows ``index`` (an int keeps the batch dimension: ``cond[k]`` is ``cond[k:k+1]``)."""
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"row {index} of a conditioning of {len(self)} rows")
            index = index % len(self)
            index = slice(index, index + 1)
        return self._map(lambda t: t[index])

    def __iter__(self) -> Iterator[Conditioning]:
        return (self[i] for i in range(len(self)))

    def expand(self, n: int) -> Conditioning:
        """A batch of ``n`` rows from a batch of one (a no-op when it already has ``n``)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a batch of {len(self)} to {n}")
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def repeat(self, n: int) -> Conditioning:
        """Every row ``n`` times in a row (``repeat_interleave``)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def to(self, device=None, dtype=None) -> Conditioning:
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def float(self) -> Conditioning:
        return self._map(lambda t: t.float())

    def detach(self) -> Conditioning:
        return self._map(lambda t: t.detach())

    def with_embeds(self, embeds: torch.Tensor) -> Conditioning:
        """The same pooled part with another sequence (perturbed or soft embeddings)."""
        return replace(self, embeds=embeds)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        pooled = [p.pooled for p in parts]
        if any(p is None for p in pooled) and not all(p is None for p in pooled):
            raise ValueError("cannot concatenate conditionings with and without a pooled embedding")
        return Conditioning(torch.cat([p.embeds for p in parts]),
                            None if pooled[0] is None else torch.cat(pooled))


@dataclass(frozen=True)
class EditSite:
    """A linear layer a closed-form edit may rewrite: the parameter key (``"<component>.<name>"``
    of its weight) and what it reads: ``"sequence"`` (per-token states of :attr:`Conditioning.embeds`)
    or ``"pooled"`` (:attr:`Conditioning.pooled`)."""

    key: str
    reads: str = "sequence"


def text_encoder_rule(encoders: tuple[str, ...], layers_only: bool) -> Rule:
    """Every text-encoder parameter, or (``layers_only``) all but the token / position embeddings
    (CLIP ``embeddings.*``; T5 ``shared`` / ``embed_tokens``)."""

    def rule(component: str, name: str) -> bool:
        if component not in encoders:
            return False
        if not layers_only:
            return True
        return ".embeddings." not in f".{name}" and not name.startswith(("shared.", "encoder.embed_tokens."))

    return rule


def under(prefixes: set[str]) -> Callable[[str], bool]:
    """``name`` lies inside one of the modules named ``prefixes``."""
    dotted = tuple(f"{p}." for p in prefixes)
    return lambda name: name.startswith(dotted) if dotted else False


class Family:
    """One model family. Subclasses set the class attributes and implement the abstract hooks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    denoiser_name: ClassVar[str] = "unet"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    # every named parameter set this family defines, with the one-line meaning for `efface list`
    parameter_sets: ClassVar[dict[str, str]] = {}
    # every text encoder is causal (CLIP): a token's state does not depend on the tokens after it,
    # so `encode(..., trim=True)` may stop at the longest prompt
    causal_text: ClassVar[bool] = False

    # --- what the pipeline is made of -------------------------------------------------------------
    @classmethod
    def pipeline_classes(cls) -> tuple[type, ...]:
        """The diffusers pipeline classes of this family (imported lazily)."""
        raise NotImplementedError

    @classmethod
    def denoiser_classes(cls) -> tuple[type, ...]:
        """The denoiser model classes (for counting evaluations)."""
        raise NotImplementedError

    def components(self, pipe) -> tuple[str, ...]:
        """The trainable components present: the denoiser, then each text encoder."""
        return tuple(c for c in (self.denoiser_name, *self.text_encoders) if getattr(pipe, c, None) is not None)

    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_name)

    def named_parameters(self, pipe, components: tuple[str, ...] | None = None) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
        """(component, name, parameter) for every trainable component (or those in ``components``)."""
        for component in self.components(pipe):
            if components is None or component in components:
                yield from ((component, n, p) for n, p in getattr(pipe, component).named_parameters())

    def denoiser_rules(self, pipe) -> dict[str, Callable[[str], bool]]:
        """Per denoiser parameter set, the test of a denoiser parameter's name."""
        raise NotImplementedError

    def rule(self, pipe, parameter_set: str) -> Rule:
        """The membership test of ``parameter_set`` in this pipeline: a denoiser set of
        :meth:`denoiser_rules`, or a text-encoder set over every text encoder."""
        rules = self.denoiser_rules(pipe)
        if parameter_set in rules:
            test, den = rules[parameter_set], self.denoiser_name
            return lambda component, name: component == den and test(name)
        if parameter_set in ("text_encoder", "text_encoder_layers"):
            return text_encoder_rule(self.text_encoders, parameter_set == "text_encoder_layers")
        raise InputError(f"unknown parameter set {parameter_set!r}; valid: {', '.join(self.parameter_sets)}")

    def select(self, pipe, parameter_set: str) -> dict[str, torch.nn.Parameter]:
        """The parameters of ``parameter_set``, keyed ``"<component>.<parameter name>"``."""
        if parameter_set not in self.parameter_sets:
            raise InputError(f"parameter set {parameter_set!r} does not exist on {self.name} models; "
                             f"valid: {', '.join(self.parameter_sets)}")
        rule = self.rule(pipe, parameter_set)
        chosen = {f"{c}.{n}": p for c, n, p in self.named_parameters(pipe) if rule(c, n)}
        if not chosen:
            raise InputError(f"parameter set {parameter_set!r} selects nothing in this {self.name} model")
        return chosen

    def cross_attention(self, pipe) -> dict[str, torch.nn.Module]:
        """The denoiser's attention modules where image tokens read the text (by module name):
        cross-attention in UNets, joint attention in SD3 / Flux. Found by what the module is."""
        raise NotImplementedError

    def edit_sites(self, pipe) -> list[EditSite]:
        """The linear layers a closed-form edit (UCE, RECE, ...) rewrites on this family."""
        raise NotImplementedError

    # --- text ----------------------------------------------------------------------------------
    def text_encoder(self, pipe, index: int = 0) -> torch.nn.Module:
        """The ``index``-th text encoder (0: the CLIP one every family has)."""
        return getattr(pipe, self.text_encoders[index])

    def tokenizer(self, pipe):
        """The tokenizer whose positions :meth:`word_positions` counts in first (the CLIP one)."""
        return getattr(pipe, self.tokenizers[0])

    def sequence_tokenizer(self, pipe):
        """The tokenizer whose tokens are the positions of :attr:`Conditioning.embeds` (UNets: the
        CLIP one; Flux: T5), or None where the sequence joins several encoders' tokens (SD3)."""
        return self.tokenizer(pipe)

    def sequence_length(self, pipe) -> int:
        """Tokens of :attr:`Conditioning.embeds` per prompt: the sequence tokenizer's padded length
        (UNets: CLIP's 77; Flux: the T5 length the family pads to)."""
        return int(self.sequence_tokenizer(pipe).model_max_length)

    def check_fits(self, pipe, text: str, what: str = "concept") -> None:
        """Refuse ``text`` if it is empty or any of the pipeline's tokenizers would truncate it."""
        for name in self.tokenizers:
            tok = getattr(pipe, name, None)
            if tok is not None:
                check_fits(tok, text, what)

    def encode(self, pipe, prompts: list[str] | str, *, grad: bool = False, trim: bool = False) -> Conditioning:
        """The conditioning of ``prompts`` through the pipeline's own ``encode_prompt``.

        ``trim``: where every text encoder is causal (:attr:`causal_text`: CLIP), the sequence ends
        with the longest prompt's end token instead of the tokenizers' padded length (77 on SD):
        each token's state depends only on the tokens before it, so the states of the prompts' own
        tokens are those of the full padded sequence (up to float rounding); only padding states
        are missing. Elsewhere (a T5 encoder attends both ways: SD3, Flux) the full length."""
        if isinstance(prompts, str):
            prompts = [prompts]
        with torch.set_grad_enabled(grad), self._encoded_length(pipe, list(prompts), trim):
            return self._encode(pipe, list(prompts))

    @contextmanager
    def _encoded_length(self, pipe, prompts: list[str], trim: bool) -> Iterator[None]:
        """Within the block, with ``trim`` on a causal family, the tokenizers pad (the pipeline's
        ``encode_prompt`` pads to ``model_max_length``) only to the longest of ``prompts``."""
        toks = [t for t in (getattr(pipe, n, None) for n in self.tokenizers) if t is not None]
        if not (trim and self.causal_text and toks and prompts):
            yield
            return
        limits = [t.model_max_length for t in toks]
        convert = getattr(pipe, "maybe_convert_prompt", lambda p, t: p)  # multi-vector textual inversion tokens
        longest = max(len(ids) for t in toks for ids in t(convert(prompts, t)).input_ids)
        length = min(longest, *limits)  # one length for every tokenizer (SDXL concatenates their states)
        try:
            for t in toks:
                t.model_max_length = length
            yield
        finally:
            for t, limit in zip(toks, limits):
                t.model_max_length = limit

    def _encode(self, pipe, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def word_positions(self, pipe, template: str, word: str) -> list[int]:
        """Indices in :attr:`Conditioning.embeds` of ``fill(template, word)`` that hold the last
        token of ``word`` (one per text encoder whose states the sequence carries)."""
        raise NotImplementedError

    # --- the denoiser --------------------------------------------------------------------------
    def prediction_type(self, pipe) -> str:
        """``"epsilon"``, ``"v_prediction"`` or ``"flow"`` (velocity ``noise - x0``)."""
        return pipe.scheduler.config.get("prediction_type", "epsilon")

    def num_train_timesteps(self, pipe) -> int:
        return int(pipe.scheduler.config.num_train_timesteps)

    def latent_shape(self, pipe) -> tuple[int, int, int]:
        """(C, H, W) of the latents the model generates at its native size."""
        raise NotImplementedError

    def image_size(self, pipe) -> tuple[int, int]:
        """(height, width) in pixels of the native latent size: what generation defaults to, so that
        images are made at the size methods train at (Flux's pipeline would otherwise pick 1024 px
        whatever its VAE says)."""
        _, h, w = self.latent_shape(pipe)
        scale = getattr(pipe, "vae_scale_factor", 8)
        return h * scale, w * scale

    def _call(self, pipe, denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, pipe, x_t: torch.Tensor, t, cond: Conditioning, guidance: float | None = None,
                uncond: Conditioning | None = None, *, denoiser: torch.nn.Module | None = None) -> torch.Tensor:
        """The model output at ``(x_t, t)`` given ``cond``; with ``guidance`` w and ``uncond``, the
        classifier-free guided ``out_u + w (out_c - out_u)`` in one batched call. ``denoiser``
        defaults to the pipeline's own (a frozen copy may be given). A conditioning of batch 1 is
        broadcast; ``t`` is an int, a 0-d tensor or one timestep per row."""
        denoiser = denoiser if denoiser is not None else self.denoiser(pipe)
        x_t = x_t.to(denoiser.device)
        n = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(n) if t.ndim == 0 else t
        cond = cond.expand(n).to(x_t.device, x_t.dtype)
        if guidance is None or guidance == 1.0 or uncond is None:
            return self._call(pipe, denoiser, x_t, t, cond)
        both = Conditioning.cat([uncond.expand(n).to(x_t.device, x_t.dtype), cond])
        out_u, out_c = self._call(pipe, denoiser, torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return out_u + guidance * (out_c - out_u)

    # --- forward process and sampling ----------------------------------------------------------
    def add_noise(self, pipe, x0: torch.Tensor, t, generator: torch.Generator | None,
                  noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward process at ``t`` (an int or one per row), noise drawn on the CPU from
        ``generator`` (or the given ``noise``): ``(x_t, target)``, the target being what the model
        must predict there."""
        raise NotImplementedError

    solvers: ClassVar[tuple[str, ...]] = ("default",)  # sampler kinds of :meth:`scheduler`, the family's first

    def scheduler(self, pipe, num_steps: int, solver: str = "default"):
        """A private sampler with the pipeline's schedule, set to ``num_steps`` steps; ``solver``
        one of :attr:`solvers` ("default": the family's own)."""
        raise NotImplementedError

    def check_solver(self, solver: str) -> None:
        if solver != "default" and solver not in self.solvers:
            raise InputError(f"sampler {solver!r} is not offered on {self.name} models: use one of "
                             f"{', '.join(self.solvers)}")

    def step(self, scheduler, out: torch.Tensor, t, x: torch.Tensor, eta: float, generator: torch.Generator) -> torch.Tensor:
        return scheduler.step(out, t, x, return_dict=False)[0]

    def initial_latents(self, pipe, batch: int, generator: torch.Generator) -> torch.Tensor:
        """x_T ~ N(0, I) of :meth:`latent_shape`, drawn on the CPU from ``generator``."""
        x = torch.randn((batch, *self.latent_shape(pipe)), generator=generator)
        den = self.denoiser(pipe)
        return x.to(den.device, den.dtype)

    def encode_images(self, pipe, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE latents of images in [-1, 1] (B x 3 x H x W), scaled (and shifted) as the denoiser reads
        them: a sample drawn with ``generator``, or the mode without one."""
        vae = pipe.vae
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        shift = vae.config.get("shift_factor") or 0.0
        return (z - shift) * vae.config.scaling_factor

    def latent_distribution(self, pipe, images: torch.Tensor) -> torch.distributions.Normal:
        """The VAE posterior of images in [-1, 1], scaled (and shifted) as :meth:`encode_images`,
        on the denoiser's device and dtype."""
        vae, den = pipe.vae, self.denoiser(pipe)
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0
        return torch.distributions.Normal(((dist.mean - shift) * scale).to(den.device, den.dtype),
                                          (dist.std * scale).to(den.device, den.dtype))

    def decode_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B x 3 x H x W) of denoiser-side latents (the inverse of :meth:`encode_images`)."""
        vae = pipe.vae
        shift = vae.config.get("shift_factor") or 0.0
        return vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift).sample

    def predicted_x0(self, pipe, x_t: torch.Tensor, t, out: torch.Tensor) -> torch.Tensor:
        """The clean latent the model output ``out`` at ``(x_t, t)`` stands for (float32)."""
        raise NotImplementedError

    def predicted_noise(self, pipe, x_t: torch.Tensor, t, out: torch.Tensor) -> torch.Tensor:
        """The noise the model output ``out`` at ``(x_t, t)`` stands for (epsilon models: ``out``)."""
        raise NotImplementedError

    def generation_kwargs(self, pipe, guidance: float, negative_prompt: str | None) -> dict:
        """``pipe(...)`` keyword arguments for classifier-free guidance ``guidance`` (and whatever else
        the pipeline must be told to encode and sample as the family does)."""
        return {"guidance_scale": guidance, "negative_prompt": negative_prompt}


def draw_noise(x0: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None) -> torch.Tensor:
    """``noise`` on ``x0``'s device and dtype, or N(0, I) of ``x0``'s shape drawn on the CPU from ``generator``."""
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator)
    return noise.to(x0.device, x0.dtype)
