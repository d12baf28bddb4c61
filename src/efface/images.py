"""Image conversions shared by the metrics and the toy world: PIL images, uint8 arrays, float tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def images_to_array(images: Sequence[Image.Image]) -> np.ndarray:
    """PIL images -> uint8 N x H x W x 3."""
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def array_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> float N x 3 x H x W in [0, 1]."""
    return array_to_tensor(images_to_array(images))
