"""Calibration inputs: every feed that text_encoder, unet and vae_decoder receive while the fp32 model generates
the calibration prompts (real denoising trajectories, not random tensors), plus the images, for vae_encoder; an
inpainting model also inpaints those images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sd_onnx.errors import UsageError

DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse, highly detailed",
    "portrait of an old fisherman, oil painting, dramatic lighting",
    "a cozy cabin in a snowy forest at night, warm light in the windows",
    "isometric city street, vibrant colors, 3d render",
)
SAMPLER = "DPM++ 2M Karras"


@dataclass
class Recording:
    feeds: dict[str, list[dict]] = field(default_factory=dict)
    images: list[np.ndarray] = field(default_factory=list)

    def for_component(self, component: str) -> list[dict]:
        if component == "vae_encoder":  # its input is an image in [-1, 1], NCHW
            return [{"sample": (img.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]} for img in self.images]
        return self.feeds.get(component, [])


def read_prompts(path: Path | None, count: int) -> list[str]:
    """Prompts from a file (one per line; blank lines and # comments skipped), else the first `count` defaults."""
    if path is None:
        return list(DEFAULT_PROMPTS[:count])
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read calibration prompts from {path}: {getattr(e, 'strerror', None) or e}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"{path} holds no prompts (one per line)")
    return prompts


def record(folder: Path, prompts: list[str], steps: int, size: int, seed: int = 1000,
           device: str = "cpu", threads: int | None = None) -> Recording:
    from PIL import Image

    from sd_onnx.runtime.model import unet_in_channels
    from sd_onnx.runtime.pipeline import GenerateRequest, Img2ImgRequest, generate

    rec = Recording()

    def observe(component: str, feeds: dict) -> None:
        rec.feeds.setdefault(component, []).append({k: np.array(v, copy=True) for k, v in feeds.items()})

    for i, prompt in enumerate(prompts):
        request = GenerateRequest(prompt, steps=steps, sampler=SAMPLER, seed=seed + i, width=size, height=size)
        result = generate(folder, request, device, threads, observe=observe)
        rec.images.extend(np.asarray(img.image) for img in result.images)
    if unet_in_channels(Path(folder)) > 4:
        # An inpainting UNet: txt2img fills its extra channels with a mask of ones and a grey picture's latent;
        # inpaint the pictures just made too, so the ranges also cover a real mask and picture there.
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, (size // 4, size // 4, size - size // 4, size - size // 4))
        for i, (prompt, picture) in enumerate(zip(prompts, list(rec.images))):
            request = Img2ImgRequest(prompt, steps=steps, sampler=SAMPLER, seed=seed + i, width=size, height=size,
                                     init_image=Image.fromarray(picture), mask=mask)
            generate(folder, request, device, threads, observe=observe)
    return rec
