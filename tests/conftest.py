"""Shared fixtures: tiny seeded Stable Diffusion components built in code (the diffusers test recipe),
saved to a temporary directory so tests load them back through the real loading functions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def build_tiny_pipeline():
    """A tiny, seeded ``StableDiffusionPipeline`` (32x32 images, 16x16 latents)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from efface.toy.tokenizer import MAX_LENGTH, write_tokenizer
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(tmp)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2, attention_head_dim=2,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=2, sample_size=32,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, projection_dim=8,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny SD pipeline saved as a diffusers directory (safetensors)."""
    path = tmp_path_factory.mktemp("tiny-sd") / "pipe"
    build_tiny_pipeline().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def toy():
    """The shipped toy-sd (real weights), progress bars off; module-scoped because erasure tests
    apply and restore edits on it."""
    from efface import load_pipeline

    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """``get(family) -> Path``: the tiny pipeline of ``family`` (see tests/families.py) saved as a diffusers
    directory (safetensors); built and saved once per family per session. Treat the directory as read-only."""
    from families import build

    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{family}") / "pipe"
            build(family).save_pretrained(path, safe_serialization=True)
            cache[family] = path
        return cache[family]

    return get


@pytest.fixture(scope="session")
def family_pipe(family_dirs):
    """``load(family) -> pipeline``: a fresh pipeline loaded from ``family_dirs(family)`` through the real
    ``efface.load_pipeline`` (CPU, fp32), progress bars off. Each call loads anew, so tests may edit it."""
    from efface import load_pipeline

    def load(family: str):
        pipe = load_pipeline(family_dirs(family))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load


@pytest.fixture(scope="module")
def attack_pipes(tiny_sd_dir):
    """``(original, erased)``: the tiny SD pipeline and a second one with UCE's erasure of "circle"
    applied (the attack tests' pair)."""
    from efface import load_pipeline
    from efface.methods import erase

    original = load_pipeline(str(tiny_sd_dir))
    original.set_progress_bar_config(disable=True)
    erased_pipe = load_pipeline(str(tiny_sd_dir))
    erased_pipe.set_progress_bar_config(disable=True)
    erase(original, "uce", ["circle"], seed=0, progress=False).apply(erased_pipe)
    return original, erased_pipe

@pytest.fixture(scope="session")
def resnet_dir(tmp_path_factory):
    """A tiny seeded transformers ResNet with 1000 labels and a ConvNext processor (resnet-50's), saved."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    folder = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1],
                                              num_labels=1000)).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A tiny seeded CLIP with the toy CLIP tokenizer and a real CLIP processor, saved."""
    from families import build_tiny_clip

    folder = tmp_path_factory.mktemp("clip")
    model, processor = build_tiny_clip(folder / "tokenizer")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
