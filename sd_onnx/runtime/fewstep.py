"""Runtime side of few-step models: an LCM UNet's guidance embedding (`timestep_cond`) instead of CFG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from sd_onnx.runtime.denoiser import GuidedUNet


def unet_cond_dim(folder: Path) -> int | None:
    """time_cond_proj_dim from unet/config.json: set for LCM-distilled UNets (they take `timestep_cond`)."""
    try:
        config = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    dim = config.get("time_cond_proj_dim") if isinstance(config, dict) else None
    return int(dim) if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


def guidance_scale_embedding(w: float, dim: int) -> NDArray[np.float32]:
    """diffusers' get_guidance_scale_embedding (from the LCM and VDM papers) for one scale: [1, dim], the sin and cos
    of w * 1000 at `dim // 2` log-spaced frequencies. In float64: diffusers' float32 arguments (up to ~8000 rad)
    carry rounding of a few 1e-4 rad, which is its error, not a feature of the embedding."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float64) * -(np.log(10000.0) / (half - 1)))
    emb = w * 1000.0 * freqs
    out = np.concatenate([np.sin(emb), np.cos(emb)])
    if dim % 2:
        out = np.concatenate([out, np.zeros(1, np.float32)])
    return out[None].astype(np.float32)


def guided_unet(model, cond, cfg_scale: float) -> GuidedUNet:
    """The UNet for a sampler. An LCM-distilled UNet gets the CFG scale as its embedded guidance (w - 1, as
    diffusers' LatentConsistencyModelPipeline does) and runs one batch without the unconditional half; any other
    UNet gets classifier-free guidance (one batch as well when cfg_scale is 1)."""
    dim = getattr(model, "unet_cond_dim", None)
    if dim is None:
        return GuidedUNet(model, cond, cfg_scale)
    return GuidedUNet(model, cond, 1.0, extra={"timestep_cond": guidance_scale_embedding(cfg_scale - 1.0, dim)})
