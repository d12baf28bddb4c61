"""The toy-sd recipe's knobs (a plain dataclass, so the CLI can read it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ToyRecipe:
    """Every knob of the toy-sd recipe; the defaults are the recipe of the shipped weights."""

    seed: int = field(default=0, metadata={"help": "random seed of data and training"})
    n_train: int = field(default=40_000, metadata={"help": "training images"})
    n_test: int = field(default=2_000, metadata={"help": "held-out images (classifier accuracy)"})
    text_steps: int = field(default=600, metadata={"help": "text encoder pre-training steps (batch 256)"})
    text_lr: float = field(default=2e-3, metadata={"help": "text encoder peak learning rate"})
    vae_steps: int = field(default=2_000, metadata={"help": "VAE steps (batch 32)"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE peak learning rate"})
    classifier_steps: int = field(default=600, metadata={"help": "classifier steps (batch 128; real images "
                                                            "and VAE reconstructions)"})
    classifier_lr: float = field(default=2e-3, metadata={"help": "classifier peak learning rate"})
    unet_steps: int = field(default=5_000, metadata={"help": "UNet steps (batch 64)"})
    unet_lr: float = field(default=1e-3, metadata={"help": "UNet peak learning rate"})
    unet_ema: float = field(default=0.999, metadata={"help": "UNet EMA decay"})
    threads: int = field(default=0, metadata={"help": "torch threads; 0 = torch's default"})
