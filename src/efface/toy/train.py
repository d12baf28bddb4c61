"""``efface toy train``: the whole toy-sd recipe, stage by stage, each stage resumable.

Stages write into a work directory; a finished stage is skipped when the command is run again and an
interrupted one resumes from its last checkpoint. The final pipeline and classifier are written
atomically into the output directory.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from efface.errors import InputError
from efface.io import atomic_dir, atomic_file
from efface.toy import classifier as clf
from efface.toy import draw, loop, text, unet, vae
from efface.toy.recipe import ToyRecipe
from efface.toy.tokenizer import MAX_LENGTH, write_tokenizer

log = logging.getLogger(__name__)


def _stage(work: Path, name: str, fn) -> None:
    """Run stage ``fn(tmp_dir)`` unless ``work/name`` already exists; record its wall time."""
    out = work / name
    if out.exists():
        log.info("stage %s: done already, skipped", name)
        return
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        fn(tmp)
    times_path = work / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    times[name] = round(time.perf_counter() - start, 1)
    with atomic_file(times_path) as tmp:
        tmp.write_text(json.dumps(times, indent=2))
    log.info("stage %s: %.0f s", name, times[name])


IGNORED = ("threads",)  # recipe fields that do not change what a stage makes


def pin_recipe(work: Path, name: str, record: dict) -> None:
    """Write ``record`` (the recipe, as JSON) to ``work/name``, or, when the work directory already
    holds one, refuse to go on with a different recipe before any work: its finished stages were
    made by that one and would be silently reused (fields in :data:`IGNORED` may differ)."""
    path, record = work / name, json.loads(json.dumps(record))  # as JSON reads it back (tuples -> lists)
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in {*old, *record} - set(IGNORED) if old.get(k) != record.get(k))
        if changed:
            raise InputError(f"the work directory {work} was started with another recipe ({', '.join(changed)} "
                             f"differ: {', '.join(f'{k} {old.get(k)!r} -> {record.get(k)!r}' for k in changed[:3])}); "
                             "its finished stages belong to that recipe: use a new --work, or delete it to start over")
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def _data(recipe: ToyRecipe, work: Path) -> dict[str, np.ndarray]:
    def make(tmp: Path) -> None:
        tr = draw.dataset(recipe.n_train, recipe.seed)
        te = draw.dataset(recipe.n_test, recipe.seed + 1_000_003)
        np.savez(tmp / "data.npz", train_images=tr[0], train_masks=tr[1], train_labels=tr[2],
                 test_images=te[0], test_masks=te[1], test_labels=te[2])

    _stage(work, "data", make)
    with np.load(work / "data" / "data.npz") as f:
        return dict(f)


def _latents(work: Path, name: str, autoencoder: AutoencoderKL, images: np.ndarray) -> torch.Tensor:
    """Stage ``name``: the scaled VAE latents of ``images``, encoded once and loaded back."""
    def make(tmp: Path) -> None:
        torch.save(vae.encode(autoencoder, images) * autoencoder.config.scaling_factor, tmp / "latents.pt")

    _stage(work, name, make)
    return torch.load(work / name / "latents.pt", weights_only=True)


def train_toy(recipe: ToyRecipe, work: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Train toy-sd and its classifier; writes ``out/toy-sd`` (a diffusers pipeline) and ``out/classifier``."""
    work, out = Path(work), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    work.mkdir(parents=True, exist_ok=True)
    pin_recipe(work, "recipe.json", asdict(recipe))
    data = _data(recipe, work)
    torch.manual_seed(recipe.seed)

    _stage(work, "tokenizer", lambda tmp: write_tokenizer(tmp))
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")

    def text_stage(tmp: Path) -> None:
        torch.manual_seed(recipe.seed)
        enc = CLIPTextModel(text.text_config(len(tokenizer), MAX_LENGTH))
        trainer = text.TextPretrainer(enc, tokenizer)
        loop.train("text encoder", trainer, trainer.loss, steps=recipe.text_steps, lr=recipe.text_lr,
                   seed=recipe.seed, checkpoint=work / "text.ckpt")
        enc.save_pretrained(tmp)

    _stage(work, "text_encoder", text_stage)
    encoder = CLIPTextModel.from_pretrained(work / "text_encoder").eval()

    def vae_stage(tmp: Path) -> None:
        torch.manual_seed(recipe.seed)
        model = vae.build_vae()
        trainer = vae.VAETrainer(model, data["train_images"])
        loop.train("vae", trainer, trainer.loss, steps=recipe.vae_steps, lr=recipe.vae_lr,
                   seed=recipe.seed, checkpoint=work / "vae.ckpt")
        model.eval()
        std = vae.encode(model, data["test_images"]).std().item()
        model.register_to_config(scaling_factor=1.0 / std)
        model.save_pretrained(tmp)

    _stage(work, "vae", vae_stage)
    autoencoder = AutoencoderKL.from_pretrained(work / "vae").eval()

    def classifier_stage(tmp: Path) -> None:
        torch.manual_seed(recipe.seed)
        n_rec = min(10_000, recipe.n_train)
        recon = vae.reconstruct(autoencoder, data["train_images"][:n_rec])
        images = np.concatenate([data["train_images"], recon])
        labels = np.concatenate([data["train_labels"], data["train_labels"][:n_rec]])
        model = clf.ToyClassifier()
        trainer = clf.ClassifierTrainer(model, images, labels)
        loop.train("classifier", trainer, trainer.loss, steps=recipe.classifier_steps,
                   lr=recipe.classifier_lr, seed=recipe.seed, checkpoint=work / "classifier.ckpt")
        acc = clf.accuracy(model, data["test_images"], data["test_labels"])
        log.info("classifier accuracy on held-out real images: %s", acc)
        model.save(tmp)
        (tmp / "accuracy.json").write_text(json.dumps(acc, indent=2))

    _stage(work, "classifier", classifier_stage)

    latents = _latents(work, "latents", autoencoder, data["train_images"])

    def unet_stage(tmp: Path) -> None:
        torch.manual_seed(recipe.seed)
        model = unet.build_unet()
        trainer = unet.UNetTrainer(model, latents, data["train_labels"], encoder, tokenizer)
        ema = loop.train("unet", trainer, trainer.loss, steps=recipe.unet_steps, lr=recipe.unet_lr,
                         seed=recipe.seed, checkpoint=work / "unet.ckpt", ema_decay=recipe.unet_ema)
        ema.unet.save_pretrained(tmp)

    _stage(work, "unet", unet_stage)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        pipe = StableDiffusionPipeline(
            vae=autoencoder, text_encoder=encoder, tokenizer=tokenizer,
            unet=UNet2DConditionModel.from_pretrained(work / "unet"), scheduler=unet.build_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp / "toy-sd", safe_serialization=True)
        clf.ToyClassifier.load(work / "classifier").save(tmp / "classifier")
        summary = {"recipe": asdict(recipe), "seconds": json.loads((work / "times.json").read_text()),
                   "classifier_accuracy": json.loads((work / "classifier" / "accuracy.json").read_text()),
                   "torch_threads": torch.get_num_threads()}
        (tmp / "training.json").write_text(json.dumps(summary, indent=2))
    return out
