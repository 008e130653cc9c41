"""txt2img over a model folder: encode the prompts, run a sampler on the UNet, decode, save A1111-style PNGs."""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from sd_onnx import __version__
from sd_onnx.errors import UsageError
from sd_onnx.home import check_folder
from sd_onnx.runtime import images
from sd_onnx.runtime.noise import ImageRng
from sd_onnx.runtime.prompt import apply_emphasis, concat_chunks, pad_to_same_chunks, tokenize_prompt
from sd_onnx.runtime.providers import Device, resolve_device
from sd_onnx.runtime.samplers import SAMPLER_NAMES, Denoiser, ldm_alphas_cumprod, sample
from sd_onnx.runtime.sessions import Session, cast_feeds, open_session
from sd_onnx.runtime.tokenizer import ClipTokenizer
from sd_onnx.runtime.vae_tiles import decode_tiled
from sd_onnx.runtime.variants import precision_of

MAX_SEED = 2**32 - 1


@dataclass
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler a"
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_size: int = 1
    batch_count: int = 1
    randn_source: str = "cpu"

    def validate(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 64 or value % 8:
                raise UsageError(f"{name} must be a multiple of 8 and at least 64, got {value}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise UsageError(f"steps must be at least 1, got {self.steps}")
        if self.sampler not in SAMPLER_NAMES:
            raise UsageError(f"unknown sampler '{self.sampler}'; valid names: {', '.join(SAMPLER_NAMES)}")
        if self.batch_size < 1 or self.batch_count < 1:
            raise UsageError("batch size and batch count must be at least 1")
        if not 0 <= self.cfg_scale <= 100:
            raise UsageError(f"CFG scale must be between 0 and 100, got {self.cfg_scale}")
        if self.seed != -1 and not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {self.seed}")
        if self.randn_source not in ("cpu", "gpu"):
            raise UsageError(f"noise source must be 'cpu' or 'gpu', got '{self.randn_source}'")


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    parameters: str
    latent: NDArray


@dataclass
class GenerateResult:
    images: list[GeneratedImage]
    device: Device
    timings: dict[str, float] = field(default_factory=dict)


class Conditioning:
    """Positive and negative prompt embeddings, each [1, 77*n, D], computed once and reused for every image."""

    def __init__(self, cond: NDArray, uncond: NDArray):
        self.cond, self.uncond = cond, uncond


Observer = Callable[[str, dict], None]


class _Observed:
    """A session that shows every feed to an observer first (calibration records real inputs this way)."""

    def __init__(self, session: Session, component: str, observe: Observer):
        self._session, self._component, self._observe = session, component, observe
        self.input_types = session.input_types

    def run(self, feeds: dict[str, NDArray]) -> list[NDArray]:
        feeds = cast_feeds(feeds, self.input_types)  # as the model receives them (token ids int32, ...)
        self._observe(self._component, feeds)
        return self._session.run(feeds)


def _open(folder: Path, component: str, device: Device, threads: int | None, observe: Observer | None,
          low_memory: bool = False) -> Session:
    session = open_session(folder, component, device, threads, low_memory)
    return _Observed(session, component, observe) if observe else session


def encode_prompts(folder: Path, device: Device, prompt: str, negative: str, threads: int | None = None,
                   observe: Observer | None = None) -> Conditioning:
    tokenizer = ClipTokenizer.from_folder(folder / "tokenizer")
    pos, neg = pad_to_same_chunks(tokenize_prompt(tokenizer, prompt), tokenize_prompt(tokenizer, negative))
    session = _open(folder, "text_encoder", device, threads, observe)
    ids = np.concatenate([pos.ids, neg.ids])
    hidden = session.run({"input_ids": ids})[0]  # [2n, 77, D]; released with the session below
    n = pos.n_chunks
    cond = concat_chunks(apply_emphasis(hidden[:n], pos.weights))
    uncond = concat_chunks(apply_emphasis(hidden[n:], neg.weights))
    return Conditioning(cond.astype(np.float32), uncond.astype(np.float32))


def guided_model(unet: Session, cond: Conditioning, cfg_scale: float) -> Callable[[NDArray, NDArray], NDArray]:
    """The raw UNet output with classifier-free guidance: uncond and cond in one batch-2B call."""

    def model(x: NDArray, t: NDArray) -> NDArray:
        b = x.shape[0]
        if cfg_scale == 1.0:
            ctx = np.repeat(cond.cond, b, axis=0)
            return unet.run({"sample": x, "timestep": t, "encoder_hidden_states": ctx})[0]
        ctx = np.concatenate([np.repeat(cond.uncond, b, axis=0), np.repeat(cond.cond, b, axis=0)])
        out = unet.run({"sample": np.concatenate([x, x]), "timestep": np.concatenate([t, t]),
                        "encoder_hidden_states": ctx})[0]
        uncond, text = out[:b], out[b:]
        return uncond + cfg_scale * (text - uncond)

    return model


def generate(
    folder: Path,
    request: GenerateRequest,
    device: str | Device = "auto",
    threads: int | None = None,
    progress: Callable[[str], Callable[[int, int], None] | None] | None = None,
    observe: Observer | None = None,
    low_memory: bool = False,
) -> GenerateResult:
    """Run txt2img; images come back with their seeds and A1111 parameters (saving is the caller's choice).

    `observe(component, feeds)`, if given, sees every input fed to text_encoder, unet and vae_decoder.
    `low_memory` (A1111's --lowvram for the CPU): no ONNX Runtime memory arenas, and the VAE decodes in tiles."""
    request.validate()
    folder = Path(folder)
    meta = check_folder(folder)
    dev = device if isinstance(device, Device) else resolve_device(device, precision=precision_of(meta))
    timings: dict[str, float] = {}
    seed = random.randint(0, MAX_SEED) if request.seed == -1 else request.seed
    latent_shape = (4, request.height // 8, request.width // 8)

    t0 = time.perf_counter()
    cond = encode_prompts(folder, dev, request.prompt, request.negative_prompt, threads, observe)
    gc.collect()
    timings["text_encoder_s"] = time.perf_counter() - t0

    sched = _scheduler(folder)
    t0 = time.perf_counter()
    unet = _open(folder, "unet", dev, threads, observe, low_memory)
    timings["unet_load_s"] = time.perf_counter() - t0
    denoiser = Denoiser(guided_model(unet, cond, request.cfg_scale),
                        ldm_alphas_cumprod(sched["beta_start"], sched["beta_end"], sched["num_train_timesteps"]),
                        meta.get("prediction_type", sched.get("prediction_type", "epsilon")))
    latents, seeds = [], []
    t0 = time.perf_counter()
    for batch in range(request.batch_count):
        batch_seeds = [(seed + batch * request.batch_size + j) % (MAX_SEED + 1) for j in range(request.batch_size)]
        rng = ImageRng(batch_seeds, latent_shape, source=request.randn_source)
        label = f"batch {batch + 1}/{request.batch_count}" if request.batch_count > 1 else "sampling"
        latents.append(sample(request.sampler, denoiser, rng, request.steps, progress(label) if progress else None))
        seeds.extend(batch_seeds)
    timings["sampling_s"] = time.perf_counter() - t0
    del unet, denoiser
    gc.collect()

    t0 = time.perf_counter()
    decoder = _open(folder, "vae_decoder", dev, threads, observe, low_memory)
    scaling = float(meta.get("scaling_factor", 0.18215))
    all_latents = np.concatenate(latents)
    pictures = []
    for latent in all_latents:  # one at a time: the VAE's activations dominate memory at 512px and above
        pictures.extend(images.to_images(_decode(decoder, latent[None] / scaling, tiled=low_memory)))
    del decoder
    timings["vae_decode_s"] = time.perf_counter() - t0

    results = []
    for i, (picture, image_seed, latent) in enumerate(zip(pictures, seeds, all_latents)):
        settings = _settings(request, image_seed, meta, folder, batch_pos=i % request.batch_size)
        results.append(GeneratedImage(picture, image_seed, images.infotext(request.prompt, request.negative_prompt,
                                                                            settings), latent))
    return GenerateResult(results, dev, {k: round(v, 3) for k, v in timings.items()})


def _decode(decoder: Session, z: NDArray, tiled: bool) -> NDArray:
    run = lambda t: decoder.run({"latent_sample": t})[0]  # noqa: E731
    return decode_tiled(run, z) if tiled else run(z)


def _scheduler(folder: Path) -> dict:
    import json

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if config.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise UsageError(f"{folder}: beta_schedule {config['beta_schedule']!r} is not supported (scaled_linear only)")
    return {"beta_start": float(config.get("beta_start", 0.00085)), "beta_end": float(config.get("beta_end", 0.012)),
            "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
            "prediction_type": config.get("prediction_type", "epsilon")}


def _settings(request: GenerateRequest, seed: int, meta: dict, folder: Path, batch_pos: int) -> dict:
    source = meta.get("source", {})
    settings = {
        "Steps": request.steps,
        "Sampler": request.sampler,
        "CFG scale": float(request.cfg_scale),
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": source.get("short_hash", ""),
        "Model": folder.name,
    }
    if request.batch_size > 1:
        settings["Batch size"] = request.batch_size
        settings["Batch pos"] = batch_pos
    if request.randn_source == "cpu":
        settings["RNG"] = "CPU"  # A1111 defaults to its GPU source and marks CPU noise this way
    settings["Version"] = f"sd-onnx {__version__}"
    return settings
