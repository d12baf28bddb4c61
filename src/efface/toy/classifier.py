"""The toy world's judge: a small CNN with shape, colour and style heads.

Its penultimate layer (``features``) is the feature space for Fréchet distances between image sets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from efface.images import array_to_tensor
from efface.io import file_sha256
from efface.toy.loop import StepRandom
from efface.toy.world import AXES

BUNDLED = Path(__file__).parent / "weights" / "classifier"


@dataclass
class ClassifierConfig:
    width: int = 32
    features: int = 128
    size: int = 32


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2),
    )


class ToyClassifier(nn.Module):
    """Classifies toy images. Input: float N x 3 x H x W in [0, 1] (resized to 32 x 32)."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        self.source: Path | None = None  # the directory it was loaded from
        w = self.config.width
        self.body = nn.Sequential(_block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w),
                                  nn.Flatten(), nn.Linear(4 * w * 16, self.config.features), nn.ReLU())
        self.heads = nn.ModuleDict({axis: nn.Linear(self.config.features, len(n)) for axis, n in AXES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.size
        if images.shape[-2:] != (size, size):
            images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {axis: head(feats) for axis, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Concept names per axis for each image."""
        return {axis: [AXES[axis][i] for i in logits.argmax(-1).tolist()]
                for axis, logits in self(images).items()}

    def provenance(self) -> dict:
        """What judges (a metric's ``evaluator``): the weights' sha256 if loaded from a file."""
        weights = self.source / "model.safetensors" if self.source is not None else None
        return {"name": "toy-classifier", "weights_sha256": file_sha256(weights) if weights else None,
                "decision": "argmax per axis (no threshold)"}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, directory: str | Path = BUNDLED) -> ToyClassifier:
        directory = Path(directory)
        if not (directory / "model.safetensors").exists():
            raise FileNotFoundError(f"no toy classifier in {directory}; train one with `efface toy train`")
        model = cls(ClassifierConfig(**json.loads((directory / "config.json").read_text())))
        model.load_state_dict(load_file(directory / "model.safetensors"))
        model.source = directory
        return model.eval()


class ClassifierTrainer(nn.Module):
    def __init__(self, model: ToyClassifier, images: np.ndarray, labels: np.ndarray, batch: int = 128):
        super().__init__()
        self.model, self.images, self.labels, self.batch = model, images, labels, batch

    def loss(self, r: StepRandom) -> torch.Tensor:
        idx = r.np.integers(len(self.images), size=self.batch)
        x = array_to_tensor(self.images[idx])
        x = (x + 0.03 * torch.randn(x.shape, generator=r.torch)).clamp(0, 1)
        y = torch.from_numpy(self.labels[idx])
        logits = self.model(x)
        return sum(nn.functional.cross_entropy(logits[a], y[:, i]) for i, a in enumerate(AXES))


@torch.no_grad()
def accuracy(model: ToyClassifier, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-axis accuracy of ``model`` on uint8 images with integer labels."""
    model.eval()
    preds = {a: [] for a in AXES}
    for i in range(0, len(images), 500):
        for a, logits in model(array_to_tensor(images[i : i + 500])).items():
            preds[a].append(logits.argmax(-1))
    return {a: float((torch.cat(p).numpy() == labels[:, i]).mean()) for i, (a, p) in enumerate(preds.items())}
