"""Image and latent similarity: PSNR, SSIM (Wang et al. 2004, 11-tap Gaussian, sigma 1.5) and cosine similarity."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def psnr(a: NDArray, b: NDArray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; inf for identical images."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> NDArray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x * x) / (2 * sigma * sigma))
    return w / w.sum()


def _filter(img: NDArray, w: NDArray) -> NDArray:
    """Separable 'valid' filtering over the first two axes of an HxWxC array."""
    n = len(w)
    rows = sum(w[i] * img[i:img.shape[0] - n + 1 + i] for i in range(n))
    return sum(w[i] * rows[:, i:rows.shape[1] - n + 1 + i] for i in range(n))


def ssim(a: NDArray, b: NDArray, peak: float = 255.0) -> float:
    """Mean structural similarity of two HxW or HxWxC images (channels averaged), as in skimage's
    structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)."""
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    w = _gaussian_window()
    if min(x.shape[:2]) < len(w):
        raise ValueError(f"images must be at least {len(w)} pixels on each side for SSIM")
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mx, my = _filter(x, w), _filter(y, w)
    sxx = _filter(x * x, w) - mx * mx
    syy = _filter(y * y, w) - my * my
    sxy = _filter(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def cosine(a: NDArray, b: NDArray) -> float:
    x = np.asarray(a, np.float64).ravel()
    y = np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(x) * np.linalg.norm(y)
    if denom == 0:  # a zero vector: similar only to another zero vector
        return 1.0 if not x.any() and not y.any() else 0.0
    return float(x @ y / denom)
