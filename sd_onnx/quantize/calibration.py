"""Calibration inputs: every feed that text_encoder, unet and vae_decoder receive while the fp32 model generates
the calibration prompts (real denoising trajectories, not random tensors), plus the images, for vae_encoder; an
inpainting model also inpaints those images. An LCM-distilled UNet is run as it is used: the LCM sampler, few
steps, its guidance embedded through `timestep_cond` (one batch, no CFG), so the ranges recorded are those of the
few-step trajectory and its timesteps (999 down to 19), not of a 20-step CFG run it never makes."""

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


@dataclass(frozen=True)
class Recipe:
    """How a model is run for calibration and for the fidelity check: sampler, CFG scale, default step counts."""

    sampler: str
    cfg_scale: float
    calibration_steps: int
    fidelity_steps: int
    guidance: str


# Classifier-free guidance, the common case: a many-step sampler at A1111's default CFG.
CFG_RECIPE = Recipe(SAMPLER, 7.0, calibration_steps=8, fidelity_steps=10, guidance="classifier-free (2 batches)")
# LCM-distilled UNets: A1111's LCM sampler at 4 steps (their intended 2-8), scale 8 embedded as w - 1 = 7 (the
# scale diffusers' LCM pipeline and benchmarks/fewstep.py use).
LCM_RECIPE = Recipe("LCM", 8.0, calibration_steps=4, fidelity_steps=4, guidance="embedded (timestep_cond, 1 batch)")
# A UNet made few-step by a merged LCM-LoRA keeps no guidance input: LCM sampler, 4 steps, CFG 1 (one batch), as
# A1111 users run LCM-LoRA.
LCM_LORA_RECIPE = Recipe("LCM", 1.0, calibration_steps=4, fidelity_steps=4, guidance="none (CFG 1, 1 batch)")


def recipe_for(folder: Path, sampler: str | None = None) -> Recipe:
    """How to run the model at `folder` for calibration: the LCM recipe for a UNet with a guidance-embedding input
    (time_cond_proj_dim), the LCM-LoRA one for a folder that export merged a LoRA named like `lcm*` into, else the
    CFG one; `sampler` (quantize --sampler) overrides the guess, `LCM` choosing between the two LCM recipes."""
    from dataclasses import replace

    from sd_onnx.home import read_metadata
    from sd_onnx.runtime.fewstep import unet_cond_dim
    from sd_onnx.runtime.samplers import SAMPLER_NAMES

    lcm_unet = unet_cond_dim(Path(folder)) is not None
    if sampler is None:
        merged = (read_metadata(Path(folder)) or {}).get("merged_loras") or []
        lcm_lora = any(isinstance(m, dict) and str(m.get("name", "")).lower().startswith("lcm") for m in merged)
        return LCM_RECIPE if lcm_unet else LCM_LORA_RECIPE if lcm_lora else CFG_RECIPE
    if sampler not in SAMPLER_NAMES:
        raise UsageError(f"unknown sampler '{sampler}'; valid: {', '.join(SAMPLER_NAMES)}")
    if sampler == "LCM":
        return LCM_RECIPE if lcm_unet else LCM_LORA_RECIPE
    return replace(LCM_RECIPE if lcm_unet else CFG_RECIPE, sampler=sampler)


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
           device: str = "cpu", threads: int | None = None, recipe: Recipe = CFG_RECIPE) -> Recording:
    from PIL import Image

    from sd_onnx.runtime.model import unet_in_channels
    from sd_onnx.runtime.pipeline import GenerateRequest, Img2ImgRequest, generate

    rec = Recording()

    def observe(component: str, feeds: dict) -> None:
        rec.feeds.setdefault(component, []).append({k: np.array(v, copy=True) for k, v in feeds.items()})

    for i, prompt in enumerate(prompts):
        request = GenerateRequest(prompt, steps=steps, sampler=recipe.sampler, cfg_scale=recipe.cfg_scale,
                                  seed=seed + i, width=size, height=size)
        result = generate(folder, request, device, threads, observe=observe)
        rec.images.extend(np.asarray(img.image) for img in result.images)
    if unet_in_channels(Path(folder)) > 4:
        # An inpainting UNet: txt2img fills its extra channels with a mask of ones and a grey picture's latent;
        # inpaint the pictures just made too, so the ranges also cover a real mask and picture there.
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, (size // 4, size // 4, size - size // 4, size - size // 4))
        for i, (prompt, picture) in enumerate(zip(prompts, list(rec.images))):
            request = Img2ImgRequest(prompt, steps=steps, sampler=recipe.sampler, cfg_scale=recipe.cfg_scale,
                                     seed=seed + i, width=size, height=size,
                                     init_image=Image.fromarray(picture), mask=mask)
            generate(folder, request, device, threads, observe=observe)
    return rec
