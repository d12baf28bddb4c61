"""The toy models' recipe knobs (a plain dataclass, so the CLI can read it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ToyRecipe:
    """Every knob of the toy recipes (toy-sd; toy-flux's own stages are the ``t5_*`` and ``flux_*``
    knobs); the defaults are the recipes of the shipped weights."""

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
    t5_steps: int = field(default=600, metadata={"help": "toy-flux: T5 encoder pre-training steps (batch 256)"})
    t5_lr: float = field(default=2e-3, metadata={"help": "toy-flux: T5 encoder peak learning rate"})
    flux_steps: int = field(default=12_000, metadata={"help": "toy-flux: transformer steps (batch 64)"})
    flux_lr: float = field(default=1e-3, metadata={"help": "toy-flux: transformer peak learning rate"})
    flux_ema: float = field(default=0.999, metadata={"help": "toy-flux: transformer EMA decay"})
    flux_layers: int = field(default=2, metadata={"help": "toy-flux: double-stream blocks"})
    flux_single_layers: int = field(default=2, metadata={"help": "toy-flux: single-stream blocks"})
    flux_heads: int = field(default=4, metadata={"help": "toy-flux: attention heads (32 channels each)"})
    threads: int = field(default=0, metadata={"help": "torch threads; 0 = torch's default"})
