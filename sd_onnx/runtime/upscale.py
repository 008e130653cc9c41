"""Resizing between passes: A1111's latent upscale modes (torch.nn.functional.interpolate's math, in NumPy), its
image upscalers, and its img2img resize modes."""

from __future__ import annotations

import math
from pathlib import Path

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
# The built-in names; upscaler_names() adds the models installed under $SD_ONNX_HOME/upscalers.
UPSCALER_NAMES: tuple[str, ...] = (*LATENT_MODES, *IMAGE_UPSCALERS)


def upscaler_names() -> tuple[str, ...]:
    """Every name --hr-upscaler accepts: latent modes, built-in image upscalers, installed upscaler models."""
    from sd_onnx.runtime.upscaler_models import installed_upscalers

    return (*UPSCALER_NAMES, *(n for n in installed_upscalers() if n not in UPSCALER_NAMES))


def image_upscaler_names() -> tuple[str, ...]:
    """What Extras (`sd-onnx upscale`) accepts: the built-in image upscalers and the installed models."""
    from sd_onnx.runtime.upscaler_models import installed_upscalers

    return (*IMAGE_UPSCALERS, *(n for n in installed_upscalers() if n not in UPSCALER_NAMES))


class ResampleUpscaler:
    """A1111's UpscalerLanczos / UpscalerNearest (do_upscale resizes by the requested scale) and UpscalerNone."""

    def __init__(self, name: str):
        self.name = name

    def do_upscale(self, image: Image.Image, scale: float) -> Image.Image:
        if self.name == "None":
            return image
        return image.resize((int(image.width * scale), int(image.height * scale)), IMAGE_UPSCALERS[self.name])


def open_upscaler(name: str, device="auto", threads: int | None = None, tile: int | None = None,
                  overlap: int | None = None):
    """A built-in image upscaler or an installed model (its session opened once, for many images)."""
    if name in IMAGE_UPSCALERS:
        return ResampleUpscaler(name)
    from sd_onnx.runtime.upscaler_models import (DEFAULT_OVERLAP, DEFAULT_TILE, METADATA, UpscalerModel,
                                                 installed_upscalers)

    if name not in installed_upscalers() and not (Path(name).expanduser() / METADATA).is_file():
        raise UsageError(f"unknown image upscaler '{name}'; valid: {', '.join(image_upscaler_names())}")
    return UpscalerModel(name, device, threads, DEFAULT_TILE if tile is None else tile,
                         DEFAULT_OVERLAP if overlap is None else overlap)


def upscale_by(image: Image.Image, scale: float, upscaler) -> Image.Image:
    """A1111's Upscaler.upscale: the upscaler's own passes (at most 3) until the image reaches scale x its size
    rounded down to a multiple of 8, then Lanczos to exactly that size."""
    dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
    for i in range(3):
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        shape = image.size
        image = upscaler.do_upscale(image, scale)
        if image.size == shape:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), Image.Resampling.LANCZOS)
    return image


def postprocess_upscale(image: Image.Image, upscaler, scale: float, upscaler_2=None,
                        visibility: float = 0.0) -> tuple[Image.Image, dict[str, object]]:
    """A1111's Extras upscale ("Scale by"): the first upscaler's result, blended with the second's by `visibility`,
    and the fields A1111 records for it."""
    if not 0 < scale <= 16:
        raise UsageError(f"upscale factor must be above 0 and at most 16, got {scale}")
    if not 0 <= visibility <= 1:
        raise UsageError(f"upscaler 2 visibility must be between 0 and 1, got {visibility}")
    info: dict[str, object] = {"Postprocess upscale by": scale, "Postprocess upscaler": upscaler.name}
    result = upscale_by(image, scale, upscaler)
    if upscaler_2 is not None and upscaler_2.name != "None" and visibility > 0:
        result = Image.blend(result, upscale_by(image, scale, upscaler_2), visibility)
        info["Postprocess upscaler 2"] = upscaler_2.name
    return result, info


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


def upscale_image(image: Image.Image, width: int, height: int, upscaler="None") -> Image.Image:
    """A1111's resize() inside images.resize_image: the upscaler enlarges by the larger ratio, then Lanczos fits
    the exact size. `upscaler` is a built-in name, or what open_upscaler() gave (a model, opened once)."""
    if not isinstance(upscaler, str) or upscaler not in IMAGE_UPSCALERS:
        if isinstance(upscaler, str):
            upscaler = open_upscaler(upscaler)
        scale = max(width / image.width, height / image.height)
        if scale > 1.0:
            image = upscale_by(image, scale, upscaler)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        return image
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
