"""Test helper: write a diffusers SD 1.x pipeline's weights as one original-format (CompVis LDM) state dict.

This is the reverse of diffusers' ``convert_ldm_{unet,vae,clip}_checkpoint``, written independently from
the original Stable Diffusion key layout so tests exercise the real single-file path:

* UNet under ``model.diffusion_model.``: ``input_blocks.N.{0 resnet | 1 attention | 0.op downsampler}``,
  ``middle_block.{0,1,2}``, ``output_blocks.N.{0 resnet | 1 attention | 1/2.conv upsampler}``, resnet
  parts ``in_layers.{0,2}``, ``out_layers.{0,3}``, ``emb_layers.1``, ``skip_connection``;
* VAE under ``first_stage_model.``: ``{en,de}coder.{down,up}.N.block.M``, ``mid.block_{1,2}``,
  ``mid.attn_1.{norm,q,k,v,proj_out}`` (1x1 convolutions), ``nin_shortcut``, ``norm_out``; decoder ``up``
  blocks are numbered from the highest resolution, the reverse of diffusers' ``up_blocks``;
* CLIP text encoder under ``cond_stage_model.transformer.text_model.``.
"""

from __future__ import annotations

import re

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_FLAT = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    part, _, tail = rest.partition(".")
    return f"{_RESNET[part]}.{tail}"


def unet_key(key: str, config: dict) -> str:
    """The LDM name (without prefix) of one diffusers ``UNet2DConditionModel`` parameter."""
    step = config["layers_per_block"] + 1
    for new, old in _UNET_FLAT.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"input_blocks.{1 + block * step + j}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{1 + block * step + j}.1.{rest}"
        return f"input_blocks.{1 + block * step + step - 1}.0.op.{rest.removeprefix('conv.')}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        if m[1] == "resnets":
            return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
        return f"middle_block.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"output_blocks.{block * step + j}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{block * step + j}.1.{rest}"
        slot = 2 if "CrossAttn" in config["up_block_types"][block] else 1
        return f"output_blocks.{block * step + step - 1}.{slot}.{rest}"
    raise KeyError(f"no LDM name for UNet parameter {key}")


def vae_key(key: str, config: dict) -> str:
    """The LDM name (without prefix) of one diffusers ``AutoencoderKL`` parameter."""
    n = len(config["block_out_channels"])
    key = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)|(post_)?quant_conv\..+", key):
        return key
    raise KeyError(f"no LDM name for VAE parameter {key}")


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """One flat original-format state dict (UNet + VAE + CLIP text encoder) of an SD 1.x pipeline."""
    out: dict[str, torch.Tensor] = {}
    unet_config, vae_config = dict(pipe.unet.config), dict(pipe.vae.config)
    for key, value in pipe.unet.state_dict().items():
        out["model.diffusion_model." + unet_key(key, unet_config)] = value
    for key, value in pipe.vae.state_dict().items():
        name = vae_key(key, vae_config)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention projections are 1x1 convolutions
        out["first_stage_model." + name] = value
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers 5 flattened CLIPTextModel (no .text_model); the LDM names keep "text_model."
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    return {k: v.detach().clone().contiguous() for k, v in out.items()}
