"""``efface toy train --model toy-flux``: toy-flux's recipe, stage by stage, each stage resumable.

What toy-flux shares with toy-sd is taken from a trained toy-sd (the bundled one by default): its
VAE, its CLIP tokenizer and text encoder (the pooled embedding), and so the toy classifier judges
both models' images alike. What differs is trained here: a T5 tokenizer and encoder pre-trained on
the toy captions (:mod:`efface.toy.t5`), the toy world's training images encoded by toy-sd's VAE,
and the flow-matching transformer (:mod:`efface.toy.flux`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxPipeline
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

from efface.errors import InputError
from efface.io import atomic_dir
from efface.toy import flux, loop, t5
from efface.toy.recipe import ToyRecipe
from efface.toy.tokenizer import write_t5_tokenizer
from efface.toy.train import _data, _latents, _stage, pin_recipe

SHARED = ("vae", "text_encoder", "tokenizer")


def _check_base(base: Path) -> None:
    missing = [name for name in SHARED if not (base / name).is_dir()]
    if missing:
        raise InputError(f"--base {base}: no {', '.join(missing)} there; give a toy-sd pipeline directory "
                         "(the bundled one, or the toy-sd/ that `efface toy train` writes)")


def train_toy_flux(recipe: ToyRecipe, work: str | Path, out: str | Path, *, base: str | Path | None = None,
                   overwrite: bool = False) -> Path:
    """Train toy-flux on top of toy-sd ``base``; writes ``out/toy-flux`` (a diffusers ``FluxPipeline``)."""
    from efface.toy import TOY_SD

    work, out, base = Path(work), Path(out), Path(base or TOY_SD)
    if (out / "toy-flux").exists() and not overwrite:
        raise FileExistsError(f"{out / 'toy-flux'} already exists; choose another --out or pass --overwrite")
    _check_base(base)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    work.mkdir(parents=True, exist_ok=True)
    pin_recipe(work, "recipe-flux.json", {**asdict(recipe), "base": str(base)})
    data = _data(recipe, work)
    autoencoder = AutoencoderKL.from_pretrained(base / "vae").eval()
    clip = CLIPTextModel.from_pretrained(base / "text_encoder").eval()
    clip_tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")

    _stage(work, "t5_tokenizer", lambda tmp: write_t5_tokenizer(tmp))
    t5_tokenizer = AutoTokenizer.from_pretrained(work / "t5_tokenizer")

    def t5_stage(tmp: Path) -> None:
        torch.manual_seed(recipe.seed)
        enc = T5EncoderModel(t5.t5_config(t5_tokenizer))
        trainer = t5.T5Pretrainer(enc, t5_tokenizer)
        loop.train("t5 encoder", trainer, trainer.loss, steps=recipe.t5_steps, lr=recipe.t5_lr,
                   seed=recipe.seed, checkpoint=work / "t5.ckpt")
        enc.save_pretrained(tmp)

    _stage(work, "t5_encoder", t5_stage)
    encoder = T5EncoderModel.from_pretrained(work / "t5_encoder").eval()

    # the base VAE's latents, a stage of their own (a toy-sd work dir's "latents" may be another VAE's)
    latents = _latents(work, "base_latents", autoencoder, data["train_images"])

    def transformer_stage(tmp: Path) -> None:
        torch.manual_seed(recipe.seed)
        model = flux.build_transformer(layers=recipe.flux_layers, single_layers=recipe.flux_single_layers,
                                       heads=recipe.flux_heads, latent_channels=autoencoder.config.latent_channels,
                                       text_dim=encoder.config.d_model, pooled_dim=clip.config.hidden_size)
        trainer = flux.FluxTrainer(model, latents, data["train_labels"], clip, clip_tokenizer, encoder, t5_tokenizer)
        ema = loop.train("transformer", trainer, trainer.loss, steps=recipe.flux_steps, lr=recipe.flux_lr,
                         seed=recipe.seed, checkpoint=work / "transformer.ckpt", ema_decay=recipe.flux_ema)
        ema.transformer.save_pretrained(tmp)

    _stage(work, "transformer", transformer_stage)

    # FluxPipeline reads vae.config.shift_factor; toy-sd's latents are unshifted (scaling only)
    autoencoder.register_to_config(shift_factor=0.0)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out / "toy-flux", overwrite=overwrite) as tmp:
        from diffusers import FluxTransformer2DModel

        pipe = FluxPipeline(
            scheduler=flux.build_scheduler(), vae=autoencoder, text_encoder=clip, tokenizer=clip_tokenizer,
            text_encoder_2=encoder, tokenizer_2=t5_tokenizer,
            transformer=FluxTransformer2DModel.from_pretrained(work / "transformer"),
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        times = json.loads((work / "times.json").read_text())
        stages = ("data", "t5_tokenizer", "t5_encoder", "base_latents", "transformer")
        summary = {"recipe": {k: v for k, v in asdict(recipe).items() if k.startswith(("seed", "n_", "t5_", "flux_"))},
                   "base": "bundled toy-sd" if base.resolve() == TOY_SD.resolve() else str(base),
                   "seconds": {k: times[k] for k in stages if k in times},
                   "torch_threads": torch.get_num_threads()}
        (tmp / "training.json").write_text(json.dumps(summary, indent=2))
    return out
