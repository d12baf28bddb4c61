"""How fast efface reads a base model to recognise it: the per-component fingerprint (mean |w| per
parameter, used to refuse a wrong base) and the SHA-256 of the weights (recorded in the manifest).

Builds an SD 1.4-sized UNet (860 M parameters, random weights, fp32 and bf16) in code, times
``base_fingerprint`` and ``base_hash`` over it, prints GB/s and extrapolates to Flux's 12 B-parameter
transformer (bf16: 24 GB; fp32: 48 GB). Run on an otherwise idle machine:

    python bench/base_check_speed.py
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def sd14_pipeline(dtype: torch.dtype):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from efface.toy.tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(tmp)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).to(dtype)  # the SD 1.x defaults
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12,
                                        max_position_embeddings=tokenizer.model_max_length,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).to(dtype)
    return StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    from efface.artifacts import base_fingerprint, base_hash
    from efface.models.params import named_parameters

    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"{'dtype':<9}{'GB':>7}{'fingerprint s':>15}{'GB/s':>7}{'hash s':>9}{'GB/s':>7}"
          f"{'12B fingerprint s':>19}{'12B hash s':>12}")
    for dtype in (torch.float32, torch.bfloat16):
        pipe = sd14_pipeline(dtype)
        size = sum(p.numel() * p.element_size() for _, _, p in named_parameters(pipe)) / 1e9
        times = {}
        for name, fn in (("fingerprint", base_fingerprint), ("hash", base_hash)):
            fn(pipe)  # warm
            start = time.perf_counter()
            fn(pipe)
            times[name] = time.perf_counter() - start
        flux = 12e9 * torch.tensor([], dtype=dtype).element_size() / 1e9
        print(f"{str(dtype).removeprefix('torch.'):<9}{size:7.2f}{times['fingerprint']:15.2f}"
              f"{size / times['fingerprint']:7.2f}{times['hash']:9.2f}{size / times['hash']:7.2f}"
              f"{flux / (size / times['fingerprint']):19.0f}{flux / (size / times['hash']):12.0f}")
        del pipe


if __name__ == "__main__":
    main()
