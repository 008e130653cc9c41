"""Images over the API: base64 in (checked against the limits, never a path or URL), base64 PNG out, and the cheap
latent preview that /progress shows."""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sd_onnx.runtime.requests import max_size
from sd_onnx.server.errors import ApiError

# A1111's "Approximate cheap" preview (sd_vae_approx.cheap_approximation): SD 1.x/2.x latent channels -> RGB in [-1, 1]
CHEAP_FACTORS = np.array([[0.298, 0.207, 0.208],
                          [0.187, 0.286, 0.173],
                          [-0.158, 0.189, 0.264],
                          [-0.184, -0.271, -0.473]], dtype=np.float32)
_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,", re.IGNORECASE)
_B64 = re.compile(rb"[A-Za-z0-9+/=\s]*")


def max_image_pixels() -> int:
    """An uploaded picture may have up to 4 times the pixels of the largest image the server makes."""
    return 4 * max_size() ** 2


def decode_image(text: object, field: str = "image") -> Image.Image:
    """A base64 picture (optionally a data: URL), fully read. 422 naming the field for anything else: a URL, a
    path, bad base64, bytes that are not a picture, or a picture over the pixel limit."""
    if not isinstance(text, str) or not text.strip():
        raise ApiError(422, f"{field}: expected a base64-encoded image")
    text = text.strip()
    if text.startswith(("http://", "https://", "file:", "/", "./", "~")):
        raise ApiError(422, f"{field}: images are accepted as base64 data only, not as URLs or file paths")
    m = _DATA_URL.match(text)
    raw_text = text[m.end():] if m else text
    raw_bytes = raw_text.encode("ascii", "replace")
    if not _B64.fullmatch(raw_bytes):
        raise ApiError(422, f"{field}: Invalid encoded image (not base64)")
    compact = re.sub(rb"\s", b"", raw_bytes).rstrip(b"=")
    try:
        data = base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field}: Invalid encoded image (bad base64)") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_image_pixels():
                raise ApiError(413, f"{field}: a {im.width}x{im.height} image is over the limit of "
                                    f"{max_image_pixels()} pixels (4 x SD_ONNX_MAX_SIZE squared)")
            im.load()
            picture = im.copy()
            picture.info = dict(im.info)
            return picture
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(413, f"{field}: the image is over the pixel limit") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise ApiError(422, f"{field}: Invalid encoded image ({type(e).__name__})") from None


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """Base64 PNG with A1111's `parameters` text chunk, as A1111's encode_pil_to_base64 writes it."""
    info = None
    if parameters:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    with io.BytesIO() as out:
        image.save(out, format="PNG", pnginfo=info)
        return base64.b64encode(out.getvalue()).decode("ascii")


def cheap_preview(latent: np.ndarray) -> Image.Image:
    """One latent [4, h, w] (the sampler's scaled space) as an h x w RGB picture, A1111's cheap approximation."""
    rgb = np.einsum("lhw,lr->hwr", latent[:4].astype(np.float32), CHEAP_FACTORS)
    return Image.fromarray((np.clip((rgb + 1) / 2, 0, 1) * 255).round().astype(np.uint8), "RGB")
