"""Distribution distances on feature vectors (Fréchet distance, KID) and bootstrap intervals."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import linalg


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched Gaussians: means {mu1.shape}, {mu2.shape}; covariances {s1.shape}, {s2.shape}")
    with warnings.catch_warnings():  # singular products (few samples, equal sets) are expected here
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            eps = np.eye(len(s1)) * 1e-6
            covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def feature_frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between two sets of feature vectors (rows), from their means and
    covariances; clamped at 0 (the matrix square root can leave a tiny negative)."""
    return max(0.0, frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)))


def paired_rms(a, b) -> float:
    """RMS pixel difference of two same-size images (PIL), in [0, 1]: the paired image drift."""
    diff = np.asarray(a.convert("RGB"), float) - np.asarray(b.convert("RGB"), float)
    return float(np.sqrt(np.mean(diff**2)) / 255)


def mean_defined(values) -> float | None:
    """Mean of the values that are neither None nor NaN; None if there are none."""
    kept = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(kept)) if kept else None


def kid(features_a: np.ndarray, features_b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> float:
    """Kernel Inception Distance: unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over
    random subsets (Bińkowski et al. 2018)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"KID needs two N x D feature arrays of the same D, got {a.shape} and {b.shape}")
    n = min(len(a), len(b), subset_size)
    if n < 2:
        raise ValueError("KID needs at least 2 feature vectors on each side")
    rng, d, total = np.random.default_rng(seed), a.shape[1], 0.0
    for _ in range(subsets):
        x = a[rng.choice(len(a), n, replace=False)]
        y = b[rng.choice(len(b), n, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        total += ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
    return float(total / subsets)


def bootstrap_interval(groups: dict[str, Sequence[float]], n_seeds: int = 1, *, resamples: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean over groups of each group's mean.

    Each group's values are ``n_seeds`` consecutive blocks of one value per prompt (seed-major, the
    same prompts in every block). Every resample draws the seeds with replacement and, per group, its
    prompts with replacement (a two-way bootstrap over prompts and seeds; with one seed, the usual
    bootstrap over prompts). None when no group has a value."""
    rng = np.random.default_rng(seed)
    stats = []
    for values in groups.values():
        v = np.asarray(values, np.float64)
        if v.size == 0:
            continue
        if v.size % n_seeds:
            raise ValueError(f"{v.size} values are not {n_seeds} blocks of the same prompts")
        m = v.reshape(n_seeds, -1)  # seeds x prompts
        s, p = m.shape
        seed_counts = rng.multinomial(s, np.full(s, 1 / s), size=resamples)    # B x S
        prompt_counts = rng.multinomial(p, np.full(p, 1 / p), size=resamples)  # B x P
        stats.append(((seed_counts @ m) * prompt_counts).sum(1) / (s * p))
    if not stats:
        return None
    means = np.mean(stats, axis=0)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
