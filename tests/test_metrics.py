"""The fidelity metrics against independent formulations."""

from __future__ import annotations

import numpy as np
import pytest

from sd_onnx.quantize.metrics import cosine, psnr, ssim


def _ssim_scipy(a, b, peak=255.0):
    """SSIM from Wang et al. with scipy's Gaussian filter (sigma 1.5, truncated to an 11-tap window), 'valid' crop."""
    from scipy.ndimage import gaussian_filter

    x, y = a.astype(np.float64), b.astype(np.float64)
    f = lambda img: gaussian_filter(img, sigma=(1.5, 1.5, 0), truncate=5 / 1.5)  # noqa: E731  radius 5
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s[5:-5, 5:-5].mean()


def test_ssim_matches_a_scipy_formulation():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, b) == pytest.approx(_ssim_scipy(a, b), abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 255 - a) < 0


def test_psnr_and_cosine():
    a = np.zeros((8, 8), np.uint8)
    b = a.copy()
    b[0, 0] = 255  # mse = 255^2 / 64
    assert psnr(a, b) == pytest.approx(10 * np.log10(64))
    assert psnr(a, a) == float("inf")
    v = np.array([1.0, 2.0, 3.0])
    assert cosine(v, 2 * v) == pytest.approx(1.0) and cosine(v, -v) == pytest.approx(-1.0)
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0 and cosine(np.zeros(3), v) == 0.0
