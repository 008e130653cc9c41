"""Inpainting masks as A1111 prepares them: binarised (alpha or grey), inverted, Gaussian-blurred as cv2 does, cropped
to "Only masked", the masked area pre-filled, and the init picture laid back over the result outside the mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFilter, ImageOps

from sd_onnx.runtime.upscale import resize_image

FILL_MODES = {"fill": 0, "original": 1, "latent-noise": 2, "latent-nothing": 3}
FILL_NAMES = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}  # A1111's "Masked content" values


def binary_mask(mask: Image.Image) -> Image.Image:
    """A1111's create_binary_mask (mask_round on): a transparent-painted RGBA mask by its alpha, else its grey
    levels; above 128 is white (repaint)."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        grey = mask.split()[-1].convert("L")
    else:
        grey = mask.convert("L")
    return grey.point(lambda v: 255 if v > 128 else 0)


def gaussian_blur(mask: Image.Image, sigma_x: float, sigma_y: float) -> Image.Image:
    """cv2.GaussianBlur with A1111's kernel sizes (2 * int(2.5 * sigma + 0.5) + 1) and cv2's default border
    (reflect-101), one axis at a time as A1111 calls it."""
    x = np.asarray(mask, dtype=np.float64)
    for axis, sigma in ((1, sigma_x), (0, sigma_y)):
        if sigma <= 0:
            continue
        half = int(2.5 * sigma + 0.5)
        taps = np.exp(-(np.arange(-half, half + 1) ** 2) / (2 * sigma * sigma))
        taps /= taps.sum()
        size = x.shape[axis]
        if size > half:
            pad = [(0, 0), (0, 0)]
            pad[axis] = (half, half)
            padded = np.pad(x, pad, mode="reflect")
        else:  # tiny images: cv2 reflects repeatedly; clamp the indices the same way
            idx = np.arange(-half, size + half)
            period = 2 * (size - 1) if size > 1 else 1
            idx = np.abs((idx % period + period) % period)
            idx = np.where(idx >= size, period - idx, idx)
            padded = np.take(x, idx, axis=axis)
        x = sum(w * np.take(padded, np.arange(k, k + size), axis=axis) for k, w in enumerate(taps))
        x = np.clip(np.rint(x), 0, 255)
    return Image.fromarray(x.astype(np.uint8))


def crop_region(mask: Image.Image, pad: int) -> tuple[int, int, int, int] | None:
    """A1111's get_crop_region_v2: the mask's bounding box grown by `pad`, inside the picture; None if empty."""
    box = mask.getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    return (max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)) if pad else box


def expand_crop_region(region: tuple[int, int, int, int], width: int, height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:
    """A1111's expand_crop_region: grow the box to the processing size's aspect ratio, kept inside the picture."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        diff = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = _expand(y1 - diff // 2, y2 + diff - diff // 2, image_height)
    else:
        diff = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = _expand(x1 - diff // 2, x2 + diff - diff // 2, image_width)
    return x1, y1, x2, y2


def _expand(lo: int, hi: int, limit: int) -> tuple[int, int]:
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's masking.fill ("Masked content: fill"): the masked area painted with ever finer blurs of the rest."""
    out = Image.new("RGBA", image.size)
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


@dataclass
class PreparedMask:
    """What img2img needs from a mask: the picture to encode, the latent blend mask, and how to finish an image."""

    image: Image.Image  # the (cropped, resized, filled) picture to encode
    latent_mask: NDArray[np.float32]  # [h, w], 1 = repaint (A1111's nmask), at latent size
    pixel_mask: Image.Image  # the blurred mask at processing size (9-channel conditioning uses it)
    overlay: Image.Image  # RGBA: the init picture, transparent where repainted
    paste_to: tuple[int, int, int, int] | None  # "Only masked": where the processed square goes back
    settings: dict[str, object]


def prepare(image: Image.Image, mask: Image.Image, width: int, height: int, resize_mode: int, blur: int,
            invert: bool, full_res: bool, padding: int, fill_mode: int) -> PreparedMask:
    """A1111's StableDiffusionProcessingImg2Img.init for a mask (mask_round on, blur on both axes)."""
    settings: dict[str, object] = {}
    mask = binary_mask(mask)
    if invert:
        mask = ImageOps.invert(mask)
        settings["Mask mode"] = "Inpaint not masked"
    if blur > 0:
        mask = gaussian_blur(mask, blur, blur)
        settings["Mask blur"] = blur
    paste_to = None
    region = crop_region(mask.convert("L"), padding) if full_res else None
    if region:
        region = expand_crop_region(region, width, height, mask.width, mask.height)
        overlay_mask = mask
        x1, y1, x2, y2 = region
        mask = resize_image(2, mask.crop(region), width, height)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        settings["Inpaint area"] = "Only masked"
        settings["Masked area padding"] = padding
        picture = image  # the whole picture stays the base; the crop is what gets processed
    else:
        mask = resize_image(resize_mode, mask, width, height)
        overlay_mask = Image.fromarray(np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8))
        picture = resize_image(resize_mode, image, width, height) if resize_mode != 3 else image
    if overlay_mask.size != picture.size:
        overlay_mask = resize_image(resize_mode, overlay_mask, picture.width, picture.height)
    overlay = Image.new("RGBa", picture.size)
    overlay.paste(picture.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
    if region:
        picture = resize_image(2, picture.crop(region), width, height)
    if fill_mode == 0:
        picture = fill(picture, mask)
    if fill_mode != 1:
        settings["Masked content"] = FILL_NAMES[fill_mode]
    latent = np.asarray(mask.convert("RGB").resize((width // 8, height // 8)), dtype=np.float32)[:, :, 0] / 255
    return PreparedMask(picture, np.around(latent), mask, overlay.convert("RGBA"), paste_to, settings)


def apply_overlay(image: Image.Image, prepared: PreparedMask) -> Image.Image:
    """A1111's apply_overlay: an "Only masked" result goes back into the whole picture, then the init picture is laid
    over everything that was not repainted."""
    if prepared.paste_to is not None:
        x, y, w, h = prepared.paste_to
        base = Image.new("RGBA", prepared.overlay.size)
        base.paste(resize_image(1, image, w, h).convert("RGBA"), (x, y))
        image = base
    image = image.convert("RGBA")
    image.alpha_composite(prepared.overlay)
    return image.convert("RGB")
