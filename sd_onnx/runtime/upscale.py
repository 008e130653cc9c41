"""Resizing between passes: A1111's latent upscale modes (torch.nn.functional.interpolate's math, in NumPy), its
image upscalers, and its img2img resize modes."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from sd_onnx.errors import UsageError

# A1111's shared.latent_upscale_modes: name -> (torch interpolate mode, antialias)
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Image upscalers as A1111 lists them; the ESRGAN family joins here. "None" resizes with Lanczos, as in A1111.
IMAGE_UPSCALERS: dict[str, Image.Resampling] = {
    "None": Image.Resampling.LANCZOS,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
UPSCALER_NAMES: tuple[str, ...] = (*LATENT_MODES, *IMAGE_UPSCALERS)


def resize_latent(latent: NDArray, width: int, height: int, mode: str = "Latent") -> NDArray[np.float32]:
    """[B,C,h,w] -> [B,C,height,width] as torch's interpolate(size=..., mode, antialias, align_corners=False)."""
    if mode not in LATENT_MODES:
        raise UsageError(f"unknown latent upscale mode '{mode}'; valid: {', '.join(LATENT_MODES)}")
    kind, antialias = LATENT_MODES[mode]
    wy = _weights(latent.shape[2], height, kind, antialias)
    wx = _weights(latent.shape[3], width, kind, antialias)
    return np.einsum("yh,bchw,xw->bcyx", wy, latent.astype(np.float64), wx).astype(np.float32)


def _weights(n_in: int, n_out: int, kind: str, antialias: bool) -> NDArray[np.float64]:
    """The (n_out, n_in) matrix of one axis' interpolation weights."""
    w = np.zeros((n_out, n_in))
    scale = np.float32(n_in / n_out)
    if kind in ("nearest", "nearest-exact"):
        offset = np.float32(0.5 if kind == "nearest-exact" else 0.0)
        for i in range(n_out):
            w[i, min(int(math.floor(np.float32(np.float32(i) + offset) * scale)), n_in - 1)] = 1.0
        return w
    if antialias:
        return _aa_weights(n_in, n_out, float(scale), kind)
    for i in range(n_out):
        src = float(scale * np.float32(i + 0.5) - np.float32(0.5))
        if kind == "bilinear":
            src = max(src, 0.0)
            i0 = int(src)
            lam = min(max(src - i0, 0.0), 1.0)
            w[i, i0] += 1.0 - lam
            w[i, min(i0 + 1, n_in - 1)] += lam
        else:  # bicubic, A = -0.75, taps clamped to the border
            i0 = math.floor(src)
            for k, c in zip(range(i0 - 1, i0 + 3), _cubic(src - i0)):
                w[i, min(max(k, 0), n_in - 1)] += c
    return w


def _cubic(t: float, a: float = -0.75) -> tuple[float, float, float, float]:
    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def _aa_weights(n_in: int, n_out: int, scale: float, kind: str) -> NDArray[np.float64]:
    """torch's antialiased (PIL-style) kernels: the filter widens by the scale when shrinking."""
    if kind == "bilinear":
        support_1, filt = 1.0, lambda x: max(0.0, 1.0 - abs(x))
    else:
        def filt(x: float, a: float = -0.5) -> float:
            x = abs(x)
            if x < 1:
                return ((a + 2) * x - (a + 3)) * x * x + 1
            return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0
        support_1 = 2.0
    support = support_1 * max(scale, 1.0)
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = np.array([filt((j - center + 0.5) * invscale) for j in range(lo, hi)])
        if taps.sum() != 0:
            taps = taps / taps.sum()
        w[i, lo:hi] = taps
    return w


def upscale_image(image: Image.Image, width: int, height: int, upscaler: str = "None") -> Image.Image:
    """A1111's resize() inside images.resize_image: the upscaler enlarges by the larger ratio, then Lanczos fits
    the exact size."""
    if upscaler not in IMAGE_UPSCALERS:
        raise UsageError(f"unknown image upscaler '{upscaler}'; valid: {', '.join(IMAGE_UPSCALERS)}")
    scale = max(width / image.width, height / image.height)
    if scale > 1.0 and upscaler != "None":
        image = image.resize((int(image.width * scale), int(image.height * scale)), IMAGE_UPSCALERS[upscaler])
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def resize_image(mode: int, image: Image.Image, width: int, height: int, upscaler: str = "None") -> Image.Image:
    """A1111's img2img resize modes: 0 just resize, 1 crop and resize (fill the box, centre crop), 2 resize and
    fill (fit in the box, stretch the edges into the bars). Mode 3 (latent upscale) is done on the latent."""
    if mode in (0, 3):
        return upscale_image(image, width, height, upscaler)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = upscale_image(image, src_w, src_h, upscaler)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2 and ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif mode == 2 and ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return out
