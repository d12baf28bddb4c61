"""Procedural drawing of toy images: one coloured shape on a textured grey background.

Images are drawn at 4x the output size and downscaled (anti-aliased). Every draw is a pure function
of its ``random.Random``, so a seed fixes the data set.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from efface.toy.world import Scene, random_scene

SIZE = 32  # output resolution
SUPER = 4  # supersampling factor

RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 50),
    "blue": (35, 75, 215),
    "yellow": (230, 205, 25),
    "purple": (145, 45, 185),
}


def _outline(shape: str) -> list[tuple[float, float]] | None:
    """Unit-radius polygon of a shape, centred at the origin, y pointing down (None = circle)."""
    if shape == "circle":
        return None
    if shape == "square":
        r = 0.8
        return [(-r, -r), (r, -r), (r, r), (-r, r)]
    if shape == "triangle":
        return [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = 1.0 if i % 2 == 0 else 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return pts
    if shape == "cross":
        w, r = 0.33, 0.95
        return [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r),
                (-w, w), (-r, w), (-r, -w), (-w, -w)]
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 16.5, -y / 16.5 + 0.1))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def _background(draw: ImageDraw.ImageDraw, style: str, rng: random.Random, big: int) -> None:
    light = rng.randint(200, 235)
    dark = light - rng.randint(70, 95)
    draw.rectangle([0, 0, big, big], fill=(light,) * 3)
    period = 8 * SUPER  # 8 output pixels: two latent pixels at a VAE factor of 4
    phase = rng.randrange(period)
    if style == "plain":
        return
    if style == "striped":
        for y in range(-period + phase, big, period):
            draw.rectangle([0, y, big, y + period // 2 - 1], fill=(dark,) * 3)
    elif style == "dotted":
        r = int(1.6 * SUPER)
        for y in range(-period + phase, big + period, period):
            for x in range(-period + phase, big + period, period):
                cx, cy = x + period // 2, y + period // 2
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(dark,) * 3)
    elif style == "checkered":
        for i, y in enumerate(range(-period + phase, big, period)):
            for j, x in enumerate(range(-period + phase, big, period)):
                if (i + j) % 2 == 0:
                    draw.rectangle([x, y, x + period - 1, y + period - 1], fill=(dark,) * 3)
    else:
        raise ValueError(f"unknown style {style!r}")


def draw(scene: Scene, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``scene``; returns an ``SIZE x SIZE x 3`` uint8 image and a boolean shape mask."""
    big = SIZE * SUPER
    img = Image.new("RGB", (big, big))
    d = ImageDraw.Draw(img)
    _background(d, scene.style, rng, big)

    radius = rng.uniform(0.30, 0.40) * big
    margin = radius * 1.02
    cx = rng.uniform(margin, big - margin)
    cy = rng.uniform(margin, big - margin)
    angle = math.radians(rng.uniform(-12, 12))
    base = RGB[scene.colour]
    colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in base)

    mask = Image.new("L", (big, big))
    m = ImageDraw.Draw(mask)
    outline = _outline(scene.shape)
    if outline is None:
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        d.ellipse(box, fill=colour)
        m.ellipse(box, fill=255)
    else:
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [(cx + radius * (x * ca - y * sa), cy + radius * (x * sa + y * ca)) for x, y in outline]
        d.polygon(pts, fill=colour)
        m.polygon(pts, fill=255)
    small = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    small_mask = np.asarray(mask.resize((SIZE, SIZE), Image.Resampling.BOX)) >= 128
    return small, small_mask


def dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` random images: (uint8 images N x 32 x 32 x 3, bool masks N x 32 x 32, int64 labels N x 3)."""
    rng = random.Random(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    masks = np.empty((n, SIZE, SIZE), bool)
    labels = np.empty((n, 3), np.int64)
    for i in range(n):
        scene = random_scene(rng)
        images[i], masks[i] = draw(scene, rng)
        labels[i] = scene.labels()
    return images, masks, labels
