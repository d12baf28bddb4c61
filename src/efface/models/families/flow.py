"""What SD3 and Flux share: a joint-attention transformer trained by flow matching.

Forward process and target (rectified flow, as diffusers' ``FlowMatchEulerDiscreteScheduler``):
``sigma = t / 1000``, ``x_t = (1 - sigma) x_0 + sigma noise``, velocity target ``noise - x_0``.
Sampling is the pipeline's flow-matching Euler scheduler with the pipeline's own shift rule.

Named parameter sets (joint attention is where the image tokens read the text):

* ``xattn``: every parameter of the attention modules that text tokens pass through (SD3: the joint
  attention of every block, not SD3.5's image-only ``attn2``; Flux: double *and* single blocks, as
  the community ESD-Flux scripts' esd-x, since single blocks read the concept through their shared
  projections);
* ``xattn_kv``: the keys and values the text tokens are projected to (SD3 and Flux double blocks:
  the text stream's ``add_k_proj`` / ``add_v_proj``; Flux single blocks: the shared ``to_k`` /
  ``to_v``, which carry the image tokens too). The community esd-x-strict takes ``attn.to_k`` /
  ``to_v`` everywhere, which in double blocks are the *image* stream's: efface follows the idea
  (what the text is projected to), not that script;
* ``noxattn``: every transformer parameter outside those attention modules and the input / output
  and conditioning embedders (``x_embedder`` / ``pos_embed``, ``context_embedder``,
  ``time_text_embed``, ``norm_out``, ``proj_out``);
* ``all``: every transformer parameter;
* ``text_input``: where the encoders' states enter through a linear map, the closed-form sites of
  the official UCE-Flux script: ``context_embedder`` (token states) and
  ``time_text_embed.text_embedder.linear_1`` (the pooled embedding);
* ``text_encoder`` / ``text_encoder_layers``: as on UNets, over every text encoder (CLIP and T5).

The text stream's ``add_k_proj`` / ``add_v_proj`` are not closed-form sites: after the first block
their input depends on the image tokens and on the timestep (AdaLN), so no key is a function of the
prompt alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from efface.errors import InputError
from efface.models.families.base import EditSite, Family, draw_noise, under
from efface.models.tokens import fill

FLOW_SETS: dict[str, str] = {
    "xattn": "every parameter of the attention modules text passes through (joint attention; Flux: double + single)",
    "xattn_kv": "the keys / values text is projected to (add_k_proj / add_v_proj; Flux single blocks: to_k / to_v)",
    "noxattn": "every transformer parameter outside those attention modules and the embedders / output",
    "all": "every transformer parameter",
    "text_input": "context_embedder and the pooled text embedder (official UCE-Flux sites)",
    "text_encoder": "every parameter of every text encoder (CLIP and T5)",
    "text_encoder_layers": "the text encoders' layers and final norms, not their embeddings",
}
EMBEDDERS = ("x_embedder.", "pos_embed.", "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.")
POOLED_SITE = "time_text_embed.text_embedder.linear_1"


class FlowFamily(Family):
    denoiser_name: ClassVar[str] = "transformer"
    parameter_sets: ClassVar[dict[str, str]] = FLOW_SETS

    def prediction_type(self, pipe) -> str:
        return "flow"

    def kv_modules(self, pipe) -> dict[str, tuple[str, str]]:
        """Attention module name -> the names of the key and value projections the text goes through."""
        raise NotImplementedError

    def cross_attention(self, pipe) -> dict[str, torch.nn.Module]:
        den = self.denoiser(pipe)
        return {n: den.get_submodule(n) for n in self.kv_modules(pipe)}

    def denoiser_rules(self, pipe) -> dict[str, Callable[[str], bool]]:
        kv = self.kv_modules(pipe)
        in_attn = under(set(kv))

        def is_kv(n: str) -> bool:
            parts = n.rsplit(".", 2)  # "<attention module>.<projection>.weight"
            return len(parts) == 3 and parts[1] in kv.get(parts[0], ())

        return {
            "xattn": in_attn,
            "xattn_kv": is_kv,
            "noxattn": lambda n: not in_attn(n) and not n.startswith(EMBEDDERS),
            "all": lambda n: True,
            "text_input": lambda n: n.startswith(("context_embedder.", f"{POOLED_SITE}.")),
        }

    def edit_sites(self, pipe) -> list[EditSite]:
        return [EditSite(f"{self.denoiser_name}.context_embedder.weight", "sequence"),
                EditSite(f"{self.denoiser_name}.{POOLED_SITE}.weight", "pooled")]

    def max_sequence_length(self, pipe) -> int:
        """T5 tokens the prompt is padded to (the pipeline's default, or less if the tokenizer keeps less)."""
        tok = getattr(pipe, self.tokenizers[-1])
        return min(self.default_max_sequence_length, int(tok.model_max_length))

    default_max_sequence_length: ClassVar[int] = 512

    def t5_position(self, pipe, template: str, word: str) -> int:
        """Position of the word's last token in the T5 sequence (no start token; the end token for
        a prompt with nothing before the slot)."""
        head = fill(template[: template.index("{}")] + "{}", word)
        tok = getattr(pipe, self.tokenizers[-1])
        return max(len(tok(head).input_ids) - 2, 0)

    def add_noise(self, pipe, x0: torch.Tensor, t, generator: torch.Generator | None,
                  noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigma(pipe, t, x0).to(x0.dtype)
        noise = draw_noise(x0, generator, noise)
        return (1 - sigma) * x0 + sigma * noise, noise - x0

    def sigma(self, pipe, t, like: torch.Tensor) -> torch.Tensor:
        """sigma = t / 1000 at ``t`` (an int or one per row), float32, shaped to broadcast over ``like``."""
        s = (torch.as_tensor(t, dtype=torch.float32) / self.num_train_timesteps(pipe)).to(like.device)
        return s.view(-1, *([1] * (like.dim() - 1))) if s.dim() else s

    def predicted_x0(self, pipe, x_t: torch.Tensor, t, out: torch.Tensor) -> torch.Tensor:
        return x_t.float() - self.sigma(pipe, t, x_t) * out.float()  # x_t = (1 - s) x0 + s n, out = n - x0

    def predicted_noise(self, pipe, x_t: torch.Tensor, t, out: torch.Tensor) -> torch.Tensor:
        return (x_t.float() + (1 - self.sigma(pipe, t, x_t)) * out.float()).to(out.dtype)

    def image_patch(self, pipe) -> int:
        """The side of the latent patch one image token covers."""
        raise NotImplementedError

    def image_seq_len(self, pipe) -> int:
        """Image tokens, as the pipelines' dynamic shift counts them."""
        _, h, w = self.latent_shape(pipe)
        p = self.image_patch(pipe)
        return (h // p) * (w // p)

    def generation_kwargs(self, pipe, guidance: float, negative_prompt: str | None) -> dict:
        # T5 padded as the family encodes: the pipelines' own defaults (Flux 512, SD3 256) would pad a
        # shorter tokenizer's prompts far past what the model was trained on (T5 runs without a mask)
        return {**super().generation_kwargs(pipe, guidance, negative_prompt),
                "max_sequence_length": self.max_sequence_length(pipe)}

    solvers: ClassVar[tuple[str, ...]] = ("euler",)

    def scheduler(self, pipe, num_steps: int, solver: str = "default"):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.check_solver(solver)
        if num_steps < 1:
            raise InputError(f"the number of sampling steps must be at least 1, not {num_steps}")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        kwargs = self.timestep_kwargs(pipe, scheduler, num_steps)
        scheduler.set_timesteps(device=self.denoiser(pipe).device, **kwargs)
        return scheduler

    def timestep_kwargs(self, pipe, scheduler, num_steps: int) -> dict:
        kwargs: dict = {"num_inference_steps": num_steps}
        if scheduler.config.get("use_dynamic_shifting"):
            c = scheduler.config
            m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
            kwargs["mu"] = self.image_seq_len(pipe) * m + c.base_shift - m * c.base_image_seq_len
        return kwargs

    def step(self, scheduler, out, t, x, eta, generator):
        return scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
