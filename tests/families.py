"""Tiny, seeded, offline pipelines of every model family efface supports, built in code.

``build(family)`` returns a freshly built pipeline; every component is seeded with
``torch.manual_seed(0)`` before it is made, so two builds are identical. Nothing is downloaded:
the CLIP tokenizers are the toy BPE tokenizer (:func:`efface.toy.tokenizer.write_tokenizer`) and the
T5 tokenizer is a unigram model written here whose vocabulary holds every toy word.

Sizes (all families): 32x32 images and 16x16 latents. On SD-type families the latent size is
``unet.config.sample_size``; on transformer families (sd3, flux) it is
``vae.config.sample_size // pipe.vae_scale_factor``. CLIP sequences are
:data:`efface.toy.tokenizer.MAX_LENGTH` tokens; the T5 tokenizer's ``model_max_length`` is
:data:`T5_MAX_LENGTH`, but the pipelines pass their own ``max_sequence_length`` (flux 512, sd3 256) and T5's
relative position buckets accept any length.
"""

from __future__ import annotations

import tempfile

import torch

FAMILIES = ("sd", "sd2-v", "sdxl", "sd3", "flux")
PIPELINE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sd2-v": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
IMAGE_SIZE = 32
LATENT_SIZE = 16
T5_MAX_LENGTH = 32


def clip_tokenizer():
    """The toy CLIP BPE tokenizer (BOS 0, EOS = PAD = 1, ``model_max_length`` = ``MAX_LENGTH``)."""
    from efface.toy.tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return write_tokenizer(tmp)


def t5_tokenizer():
    """The toy T5 unigram tokenizer (:func:`efface.toy.tokenizer.write_t5_tokenizer`) with
    ``model_max_length`` = :data:`T5_MAX_LENGTH`, round-tripped through ``save_pretrained``."""
    from efface.toy.tokenizer import write_t5_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return write_t5_tokenizer(tmp, T5_MAX_LENGTH)


def _clip_config(tokenizer, hidden: int, projection_dim: int | None = None, layers: int = 2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or hidden, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip(tokenizer, hidden: int, projection_dim: int | None = None, with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    torch.manual_seed(0)
    return cls(_clip_config(tokenizer, hidden, projection_dim)).eval()


def _t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )).eval()


def _vae(latent_channels: int = 4, **kwargs):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels, norm_num_groups=2, sample_size=IMAGE_SIZE, **kwargs,
    )


def _sd():
    from conftest import build_tiny_pipeline

    return build_tiny_pipeline()


def _sd2_v():
    """SD 2.x-v layout: linear projections in the transformers, per-block head counts, v-prediction."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer()
    text_encoder = _clip(tokenizer, hidden=8)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size, norm_num_groups=2, attention_head_dim=(2, 4),
        use_linear_projection=True, upcast_attention=True,
    )
    vae = _vae()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sdxl():
    """SDXL layout: two CLIP encoders (the second with projection), text_time added conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    # distinct widths (as 768 / 1280 in SDXL) and a projection narrower than the hidden size, so a
    # swapped encoder or pooler_output taken for text_embeds fails on shapes instead of passing silently
    text_encoder = _clip(tokenizer, hidden=8)
    text_encoder_2 = _clip(tokenizer_2, hidden=12, projection_dim=6, with_projection=True)
    time_dim = 8
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=2,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim,
    )
    vae = _vae()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                                       prediction_type="epsilon")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def _sd3():
    """SD3 layout: MMDiT over 16-channel latents; two CLIPs with projection + T5; flow matching, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    # CLIP-L: SD3 uses its pooled output unprojected, so its projection is the identity (diffusers'
    # single-file loader sets exactly that); CLIP-G is wider (768 / 1280 in SD3) with a narrower projection.
    # The widths must differ: the single-file loader tells clip_l from clip_g by width.
    text_encoder = _clip(tokenizer, hidden=8, projection_dim=8, with_projection=True)
    with torch.no_grad():
        text_encoder.text_projection.weight.copy_(torch.eye(8))
    text_encoder_2 = _clip(tokenizer_2, hidden=12, projection_dim=10, with_projection=True)
    # SD3 pads the concatenated CLIP hidden states (8 + 12) with zeros up to T5's width (32)
    text_encoder_3 = _t5(tokenizer_3, d_model=32)
    vae = _vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               scaling_factor=1.5305, shift_factor=0.0609)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
        joint_attention_dim=text_encoder_3.config.d_model,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=LATENT_SIZE,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _flux():
    """Flux layout: 2x2-packed 16-channel latents, one double + one single stream block, pooled CLIP + T5,
    flow matching with resolution-dependent (dynamic) shift as in the FLUX.1 scheduler config."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = _clip(tokenizer, hidden=8)
    text_encoder_2 = _t5(tokenizer_2, d_model=32)
    latent_channels = 16
    vae = _vae(latent_channels=latent_channels, use_quant_conv=False, use_post_quant_conv=False,
               scaling_factor=0.3611, shift_factor=0.1159)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size, guidance_embeds=False, axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )


_BUILDERS = {"sd": _sd, "sd2-v": _sd2_v, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}


def build(family: str):
    """A freshly built tiny pipeline of ``family`` (one of :data:`FAMILIES`)."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return _BUILDERS[family]()


def latent_size(pipe) -> int:
    """The training latent size efface uses: ``unet.config.sample_size`` on UNet families, else
    ``vae.config.sample_size // pipe.vae_scale_factor``."""
    if getattr(pipe, "unet", None) is not None:
        return pipe.unet.config.sample_size
    return pipe.vae.config.sample_size // pipe.vae_scale_factor


def tokenizers(pipe) -> list:
    """Every tokenizer of ``pipe`` (tokenizer, tokenizer_2, tokenizer_3 where present)."""
    return [t for name in ("tokenizer", "tokenizer_2", "tokenizer_3") if (t := getattr(pipe, name, None)) is not None]


# --- single-file (original-format) checkpoints ------------------------------------------------------
# What diffusers 0.42 ``<Pipeline>.from_single_file(path, config=DIR, local_files_only=True)`` reads:
#   sd, sd2-v: CompVis LDM keys (tests/ldm_format.py; the CLIP text encoder in the SD 1.x layout);
#   sdxl: LDM UNet (+ ``label_emb``), VAE, CLIP-L under ``conditioner.embedders.0.transformer.``,
#         CLIP-G in the OpenCLIP layout under ``conditioner.embedders.1.model.``;
#   sd3: MMDiT keys under ``model.diffusion_model.``, LDM VAE, ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.``
#        (transformers names); diffusers sets CLIP-L's text_projection to the identity.
#   flux: not loadable at tiny size: diffusers' converter hard-codes FLUX.1's inner_dim=3072.
# Text encoders must be in the file: diffusers only falls back to the config directory's weights for files
# named diffusion_pytorch_model.*, never transformers' model.safetensors.
SINGLE_FILE_FAMILIES = ("sd", "sd2-v", "sdxl", "sd3")


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous (scale, shift) <-> the original (shift, scale); its own inverse."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a])


def _vae_ldm(vae, prefix: str) -> dict[str, torch.Tensor]:
    from ldm_format import vae_key

    out = {}
    for key, value in vae.state_dict().items():
        name = vae_key(key, dict(vae.config))
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + name] = value
    return out


def _open_clip(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection in the OpenCLIP layout (fused in_proj, c_fc/c_proj, ln_1/2)."""
    import re

    sd, out = text_encoder.state_dict(), {}
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    for key, value in sd.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T
        elif key in fixed:
            out[prefix + fixed[key]] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            if m[2] == "q":
                out[f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = torch.cat(
                    [sd[f"text_model.encoder.layers.{m[1]}.self_attn.{c}_proj.{m[3]}"] for c in "qkv"])
        else:
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
            rest = (m[2].replace("self_attn.out_proj", "attn.out_proj").replace("layer_norm1", "ln_1")
                    .replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            out[f"{prefix}transformer.resblocks.{m[1]}.{rest}"] = value
    return out


def _sdxl_file(pipe) -> dict[str, torch.Tensor]:
    from ldm_format import unet_key

    out, config = {}, dict(pipe.unet.config)
    for key, value in pipe.unet.state_dict().items():
        if key.startswith("add_embedding."):
            name = (key.replace("add_embedding.linear_1", "label_emb.0.0")
                    .replace("add_embedding.linear_2", "label_emb.0.2"))
        else:
            name = unet_key(key, config)
        out["model.diffusion_model." + name] = value
    out.update(_vae_ldm(pipe.vae, "first_stage_model."))
    for key, value in pipe.text_encoder.state_dict().items():
        out["conditioner.embedders.0.transformer.text_model." + key.removeprefix("text_model.")] = value
    out.update(_open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    return out


def _sd3_file(pipe) -> dict[str, torch.Tensor]:
    t, n = pipe.transformer.state_dict(), pipe.transformer.config.num_layers
    o = {"pos_embed": t["pos_embed.pos_embed"],
         "x_embedder.proj.weight": t["pos_embed.proj.weight"], "x_embedder.proj.bias": t["pos_embed.proj.bias"]}
    for wb in ("weight", "bias"):
        o[f"context_embedder.{wb}"] = t[f"context_embedder.{wb}"]
        o[f"final_layer.linear.{wb}"] = t[f"proj_out.{wb}"]
        o[f"final_layer.adaLN_modulation.1.{wb}"] = _swap_halves(t[f"norm_out.linear.{wb}"])
        for old, new in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
            o[f"{old}.mlp.0.{wb}"] = t[f"time_text_embed.{new}.linear_1.{wb}"]
            o[f"{old}.mlp.2.{wb}"] = t[f"time_text_embed.{new}.linear_2.{wb}"]
        for i in range(n):
            d, j, last = f"transformer_blocks.{i}.", f"joint_blocks.{i}.", i == n - 1
            o[j + f"x_block.attn.qkv.{wb}"] = torch.cat([t[d + f"attn.to_{c}.{wb}"] for c in "qkv"])
            o[j + f"context_block.attn.qkv.{wb}"] = torch.cat([t[d + f"attn.add_{c}_proj.{wb}"] for c in "qkv"])
            o[j + f"x_block.attn.proj.{wb}"] = t[d + f"attn.to_out.0.{wb}"]
            o[j + f"x_block.adaLN_modulation.1.{wb}"] = t[d + f"norm1.linear.{wb}"]
            context_norm = t[d + f"norm1_context.linear.{wb}"]  # the last block's is an AdaLayerNormContinuous
            o[j + f"context_block.adaLN_modulation.1.{wb}"] = _swap_halves(context_norm) if last else context_norm
            o[j + f"x_block.mlp.fc1.{wb}"] = t[d + f"ff.net.0.proj.{wb}"]
            o[j + f"x_block.mlp.fc2.{wb}"] = t[d + f"ff.net.2.{wb}"]
            if not last:  # the last block is context_pre_only
                o[j + f"context_block.attn.proj.{wb}"] = t[d + f"attn.to_add_out.{wb}"]
                o[j + f"context_block.mlp.fc1.{wb}"] = t[d + f"ff_context.net.0.proj.{wb}"]
                o[j + f"context_block.mlp.fc2.{wb}"] = t[d + f"ff_context.net.2.{wb}"]
    out = {"model.diffusion_model." + k: v for k, v in o.items()}
    out.update(_vae_ldm(pipe.vae, "first_stage_model."))
    for name, prefix in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")):
        for key, value in getattr(pipe, name).state_dict().items():
            out[f"text_encoders.{prefix}.transformer.{key}"] = value
    return out


def _flux_file(pipe) -> dict[str, torch.Tensor]:
    """BFL layout (unprefixed transformer keys, fused qkv / linear1), VAE under ``vae.``, CLIP in the SD 1.x
    layout, T5 under ``text_encoders.t5xxl.transformer.``. diffusers 0.42 cannot read the transformer part
    back at tiny size (its converter assumes FLUX.1's inner_dim 3072); kept for when it can."""
    t, c = pipe.transformer.state_dict(), pipe.transformer.config
    o = {}
    for wb in ("weight", "bias"):
        o[f"txt_in.{wb}"], o[f"img_in.{wb}"] = t[f"context_embedder.{wb}"], t[f"x_embedder.{wb}"]
        o[f"final_layer.linear.{wb}"] = t[f"proj_out.{wb}"]
        o[f"final_layer.adaLN_modulation.1.{wb}"] = _swap_halves(t[f"norm_out.linear.{wb}"])
        for old, new in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder")):
            o[f"{old}.in_layer.{wb}"] = t[f"time_text_embed.{new}.linear_1.{wb}"]
            o[f"{old}.out_layer.{wb}"] = t[f"time_text_embed.{new}.linear_2.{wb}"]
        for i in range(c.num_layers):
            d, j = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            o[j + f"img_mod.lin.{wb}"] = t[d + f"norm1.linear.{wb}"]
            o[j + f"txt_mod.lin.{wb}"] = t[d + f"norm1_context.linear.{wb}"]
            o[j + f"img_attn.qkv.{wb}"] = torch.cat([t[d + f"attn.to_{q}.{wb}"] for q in "qkv"])
            o[j + f"txt_attn.qkv.{wb}"] = torch.cat([t[d + f"attn.add_{q}_proj.{wb}"] for q in "qkv"])
            o[j + f"img_attn.proj.{wb}"] = t[d + f"attn.to_out.0.{wb}"]
            o[j + f"txt_attn.proj.{wb}"] = t[d + f"attn.to_add_out.{wb}"]
            o[j + f"img_mlp.0.{wb}"], o[j + f"img_mlp.2.{wb}"] = t[d + f"ff.net.0.proj.{wb}"], t[d + f"ff.net.2.{wb}"]
            o[j + f"txt_mlp.0.{wb}"] = t[d + f"ff_context.net.0.proj.{wb}"]
            o[j + f"txt_mlp.2.{wb}"] = t[d + f"ff_context.net.2.{wb}"]
        for i in range(c.num_single_layers):
            d, j = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            o[j + f"modulation.lin.{wb}"] = t[d + f"norm.linear.{wb}"]
            o[j + f"linear1.{wb}"] = torch.cat([t[d + f"attn.to_{q}.{wb}"] for q in "qkv"] + [t[d + f"proj_mlp.{wb}"]])
            o[j + f"linear2.{wb}"] = t[d + f"proj_out.{wb}"]
    for i in range(c.num_layers):
        d, j = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for side, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            o[j + f"{side}_attn.norm.query_norm.scale"] = t[d + f"attn.{q}.weight"]
            o[j + f"{side}_attn.norm.key_norm.scale"] = t[d + f"attn.{k}.weight"]
    for i in range(c.num_single_layers):
        d, j = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        o[j + "norm.query_norm.scale"] = t[d + "attn.norm_q.weight"]
        o[j + "norm.key_norm.scale"] = t[d + "attn.norm_k.weight"]
    out = dict(o)
    out.update(_vae_ldm(pipe.vae, "vae."))
    for key, value in pipe.text_encoder.state_dict().items():
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    for key, value in pipe.text_encoder_2.state_dict().items():
        out["text_encoders.t5xxl.transformer." + key] = value
    return out


def single_file_state_dict(pipe, family: str) -> dict[str, torch.Tensor]:
    """The whole pipeline ``pipe`` of ``family`` as one original-format state dict (see the notes above)."""
    if family in ("sd", "sd2-v"):
        from ldm_format import pipeline_to_ldm

        return pipeline_to_ldm(pipe)
    writers = {"sdxl": _sdxl_file, "sd3": _sd3_file, "flux": _flux_file}
    if family not in writers:
        raise ValueError(f"no single-file writer for {family!r}; choose one of {', '.join(FAMILIES)}")
    return {k: v.detach().clone().contiguous() for k, v in writers[family](pipe).items()}


def build_tiny_clip(tokenizer_dir):
    """A tiny, seeded ``CLIPModel`` (random weights) with the toy CLIP tokenizer (written to
    ``tokenizer_dir``) and a real CLIP processor: ``(model, processor)``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from efface.toy.tokenizer import MAX_LENGTH, write_tokenizer

    tokenizer = write_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    return model, processor
