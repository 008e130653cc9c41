"""Latents to pictures and PNG files that carry A1111's `parameters` text chunk."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd_onnx.errors import SdOnnxError


def to_images(decoded: NDArray) -> list[Image.Image]:
    """VAE output [B,3,H,W] in [-1, 1] -> RGB images (rounded, as diffusers' numpy_to_pil does)."""
    x = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return [Image.fromarray((img * 255).round().astype(np.uint8)) for img in x]


def infotext(prompt: str, negative_prompt: str, settings: dict[str, object]) -> str:
    """A1111's generation parameters: prompt, 'Negative prompt: ...' (if any), then 'Key: value, ...'."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in settings.items() if v is not None and v != ""))
    return "\n".join(lines)


def _value(v: object) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    text = str(v)
    # A1111 quotes values that contain the separators, so the line can be parsed back.
    return f'"{text}"' if ("," in text or ":" in text or "\n" in text) and not text.startswith('"') else text


def next_index(outdir: Path) -> int:
    """A1111 numbers images NNNNN-SEED.png, continuing after the highest number already in the folder."""
    numbers = [int(m.group(1)) for p in outdir.glob("*.png") if (m := re.match(r"(\d+)-", p.name))]
    return max(numbers, default=-1) + 1


def save_png(image: Image.Image, outdir: Path, index: int, seed: int, parameters: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters)
    path = outdir / f"{index:05d}-{seed}.png"
    try:
        image.save(path, pnginfo=info)
    except OSError as e:
        raise SdOnnxError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def prepare_outdir(outdir: Path) -> Path:
    outdir = Path(outdir).expanduser()
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = outdir / ".sd-onnx-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SdOnnxError(f"cannot write to output folder {outdir}: {e.strerror or e}") from None
    return outdir
