"""What SD 1.x / 2.x and SDXL share: a ``UNet2DConditionModel`` with cross-attention, DDPM noise
schedule (epsilon or v-prediction) and DDIM partial sampling.

Named parameter sets (module names of diffusers' UNet; ESD's sets follow the official CompVis code,
github.com/rohitgandikota/erasing):

* ``xattn``: every parameter of the cross-attention modules (``Attention`` with
  ``is_cross_attention``; ``attn2`` in SD): ESD-x;
* ``xattn_kv``: their key and value projections ``to_k`` / ``to_v``: UCE, RECE, CA, ESD-x-strict;
* ``noxattn``: every UNet parameter but cross-attention, the time embedding (SDXL: and
  ``add_embedding``, the pooled-text path) and the output layer (``conv_norm_out``, ``conv_out``):
  ESD-u;
* ``all``: every UNet parameter: ESD-all;
* ``text_input``: where text enters through a linear map of the encoder states: here the
  cross-attention ``to_k`` / ``to_v`` (the same as ``xattn_kv``);
* ``text_encoder``: every parameter of every text encoder; ``text_encoder_layers``: their
  transformer layers and final norm, not the token / position embeddings (AdvUnlearn).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from efface.errors import InputError
from efface.models.families.base import Conditioning, EditSite, Family, draw_noise, under
from efface.models.tokens import word_end

UNET_SETS: dict[str, str] = {
    "xattn": "every parameter of the cross-attention modules (ESD-x)",
    "xattn_kv": "cross-attention to_k / to_v (UCE, RECE, CA, ESD-x-strict)",
    "noxattn": "every UNet parameter but cross-attention, time / pooled-text embedding and output layer (ESD-u)",
    "all": "every UNet parameter (ESD-all)",
    "text_input": "where text enters the UNet linearly: cross-attention to_k / to_v",
    "text_encoder": "every parameter of every text encoder",
    "text_encoder_layers": "the text encoders' transformer layers and final norm, not their embeddings",
}


class UNetFamily(Family):
    """Base of the UNet families: cross-attention found by ``is_cross_attention``, DDIM sampling."""

    denoiser_name: ClassVar[str] = "unet"
    parameter_sets: ClassVar[dict[str, str]] = UNET_SETS
    causal_text: ClassVar[bool] = True  # CLIP text encoders (SD, SDXL: both)
    # UNet parameters ESD-u leaves out besides cross-attention (CompVis: time_embed and out.)
    not_noxattn: ClassVar[tuple[str, ...]] = ("time_embedding.", "conv_norm_out.", "conv_out.")

    @classmethod
    def denoiser_classes(cls) -> tuple[type, ...]:
        from diffusers import UNet2DConditionModel

        return (UNet2DConditionModel,)

    def cross_attention(self, pipe) -> dict[str, torch.nn.Module]:
        return {n: m for n, m in self.denoiser(pipe).named_modules() if getattr(m, "is_cross_attention", False)}

    def denoiser_rules(self, pipe) -> dict[str, Callable[[str], bool]]:
        in_xattn = under(set(self.cross_attention(pipe)))

        def kv(n: str) -> bool:
            return in_xattn(n) and n.rsplit(".", 2)[-2] in ("to_k", "to_v")

        return {
            "xattn": in_xattn,
            "xattn_kv": kv,
            "text_input": kv,
            "noxattn": lambda n: not in_xattn(n) and not n.startswith(self.not_noxattn),
            "all": lambda n: True,
        }

    def edit_sites(self, pipe) -> list[EditSite]:
        return [EditSite(k) for k in self.select(pipe, "xattn_kv") if k.endswith(".weight")]

    def word_positions(self, pipe, template: str, word: str) -> list[int]:
        return [word_end(self.tokenizer(pipe), template, word)]

    def latent_shape(self, pipe) -> tuple[int, int, int]:
        cfg = self.denoiser(pipe).config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(cfg.in_channels), int(h), int(w)

    def add_noise(self, pipe, x0: torch.Tensor, t, generator: torch.Generator | None,
                  noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod(pipe, t, x0).to(x0.dtype)
        noise = draw_noise(x0, generator, noise)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if self.prediction_type(pipe) == "v_prediction":
            return x_t, a.sqrt() * noise - (1 - a).sqrt() * x0
        return x_t, noise

    def alphas_cumprod(self, pipe, t, like: torch.Tensor) -> torch.Tensor:
        """alpha-bar_t of the pipeline's DDPM schedule at ``t`` (an int or one per row), float32,
        shaped to broadcast over ``like``."""
        schedule = getattr(pipe.scheduler, "alphas_cumprod", None)
        if schedule is None:
            raise InputError(f"the pipeline's scheduler ({type(pipe.scheduler).__name__}) has no DDPM noise schedule "
                             "(alphas_cumprod); load the model with its DDIM / DDPM / Euler scheduler")
        a = schedule[torch.as_tensor(t).cpu()].to(like.device).float()
        return a.view(-1, *([1] * (like.dim() - 1))) if a.dim() else a

    def predicted_x0(self, pipe, x_t: torch.Tensor, t, out: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod(pipe, t, x_t)
        if self.prediction_type(pipe) == "v_prediction":
            return a.sqrt() * x_t.float() - (1 - a).sqrt() * out.float()
        return (x_t.float() - (1 - a).sqrt() * out.float()) / a.sqrt()

    def predicted_noise(self, pipe, x_t: torch.Tensor, t, out: torch.Tensor) -> torch.Tensor:
        if self.prediction_type(pipe) != "v_prediction":
            return out
        a = self.alphas_cumprod(pipe, t, x_t).to(out.dtype)
        return a.sqrt() * out + (1 - a).sqrt() * x_t

    # "ddim" (eta: stochastic when > 0); "dpm++": DPMSolverMultistepScheduler's defaults
    # (dpmsolver++, order 2: deterministic), as diffusers training scripts sample class images
    solvers: ClassVar[tuple[str, ...]] = ("ddim", "dpm++")

    def scheduler(self, pipe, num_steps: int, solver: str = "default"):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        self.check_solver(solver)
        if num_steps < 1:
            raise InputError(f"the number of sampling steps must be at least 1, not {num_steps}")
        cls = DPMSolverMultistepScheduler if solver == "dpm++" else DDIMScheduler
        scheduler = cls.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(num_steps, device=self.denoiser(pipe).device)
        return scheduler

    def step(self, scheduler, out, t, x, eta, generator):
        from diffusers import DDIMScheduler

        if isinstance(scheduler, DDIMScheduler):
            return scheduler.step(out, t, x, eta=eta, generator=generator).prev_sample
        return scheduler.step(out, t, x, return_dict=False)[0]  # deterministic solvers: no eta

    def _encode(self, pipe, prompts: list[str]) -> Conditioning:
        device = getattr(pipe, self.text_encoders[0]).device
        out = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
        return self._conditioning(out)

    def _conditioning(self, out) -> Conditioning:
        return Conditioning(out[0])
