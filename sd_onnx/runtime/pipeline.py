"""txt2img, img2img and hires fix as short compositions of the runtime's stages; images come out one batch at a time."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from sd_onnx import __version__
from sd_onnx.errors import UsageError
from sd_onnx.runtime import decode, masks
from sd_onnx.runtime.control import RunControl, StopSampling
from sd_onnx.runtime.fewstep import guided_unet
from sd_onnx.runtime.encode import Conditioning, encode_prompts
from sd_onnx.runtime.images import flatten
from sd_onnx.runtime.infotext import format_infotext
from sd_onnx.runtime.model import LoadedModel, Observer
from sd_onnx.runtime.networks import activate_extra_networks
from sd_onnx.runtime.noise import ImageRng
from sd_onnx.runtime.providers import Device
from sd_onnx.runtime.requests import MAX_SEED, RESIZE_MODES, GenerateRequest, Img2ImgRequest
from sd_onnx.runtime.samplers import Start, img2img_start, sample
from sd_onnx.runtime.upscale import (IMAGE_UPSCALERS, LATENT_MODES, open_upscaler, resize_image, resize_latent,
                                    upscale_image)

__all__ = ["GenerateRequest", "Img2ImgRequest", "GeneratedImage", "GenerateResult", "generate", "run"]

ProgressFactory = Callable[[str], Callable[[int, int], None] | None]


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


def run(model: LoadedModel, request: GenerateRequest, progress: ProgressFactory | None = None,
        timings: dict[str, float] | None = None, control: RunControl | None = None) -> Iterator[GeneratedImage]:
    """Generate for `request` (txt2img, with hires fix if asked, or img2img), yielding each image as soon as its
    batch is decoded, so a caller saves it before the next batch starts. `control` lets another thread follow the
    steps and interrupt or skip (what was made so far is decoded and yielded, as in A1111)."""
    request.validate()
    timings = {} if timings is None else timings
    control = RunControl() if control is None else control
    control.batches = request.batch_count
    seed = random.randint(0, MAX_SEED) if request.seed == -1 else request.seed
    clock = lambda name: _timed(timings, name)  # noqa: E731

    networks = activate_extra_networks(model, request.prompt, request.negative_prompt)  # <lora:...>, embeddings
    with clock("text_encoder_s"):
        cond = encode_prompts(model, networks.prompt, networks.negative_prompt, networks.embeddings)
    init = _img2img_init(model, request, seed, clock) if isinstance(request, Img2ImgRequest) else None
    concat = init.concat if init is not None else _txt2img_concat(model, request, clock)
    guided = guided_unet(model, cond, request.cfg_scale)  # no reference of its own: release() frees the weights
    with clock("unet_load_s"):
        model.session("unet")
        # the shapes of the first batch's calls, for a UNet that compiles for them (OpenVINO static)
        guided.concat = None if concat is None else np.repeat(concat, request.batch_size, axis=0)
        guided.prepare(request.batch_size, model.unet_in_channels, request.height // 8, request.width // 8)
    denoiser = model.denoiser(guided)
    for batch in range(request.batch_count):
        control.batch, control.skipped = batch, False
        # A1111 keeps counting past 2**32 - 1: seeds beyond it still seed torch's generators (low 32 bits on the CPU)
        seeds = [seed + batch * request.batch_size + j for j in range(request.batch_size)]
        label = f"batch {batch + 1}/{request.batch_count}" if request.batch_count > 1 else "sampling"
        with clock("sampling_s"):
            guided.concat = None if concat is None else np.repeat(concat, len(seeds), axis=0)
            start = None if init is None else img2img_start(np.repeat(init.latent, len(seeds), axis=0),
                                                             request.steps, request.denoising_strength)
            if init is not None and init.nmask is not None:
                denoiser.inpaint = (start.latent, init.nmask)
            latents = _sample(denoiser, request, seeds, control.watch(label, denoiser, progress(label) if progress
                                                                      else None), start,
                              (request.height // 8, request.width // 8))
            if init is not None and init.nmask is not None:  # A1111 blends the final latent once more
                latents = latents * init.nmask + start.latent * (1 - init.nmask)
        last = batch == request.batch_count - 1 or control.interrupted
        if request.enable_hr and not (control.interrupted or control.skipped):
            latents = _hires(model, request, cond, latents, seeds, progress, clock, last, control)
        elif last:
            model.release("unet")  # before the VAE's activations: a 512px run never holds both
        with clock("vae_decode_s"):
            pictures = decode.decode(model, latents)
            if last or request.enable_hr:
                model.release("vae_decoder")
        if init is not None and init.mask is not None:
            pictures = [masks.apply_overlay(picture, init.mask) for picture in pictures]
        for j, (picture, image_seed, latent) in enumerate(zip(pictures, seeds, latents)):
            extra = {**(init.settings if init is not None else {}), **networks.infotext}
            yield GeneratedImage(picture, image_seed, format_infotext(
                request.prompt, request.negative_prompt, settings(request, image_seed, model, j, extra)), latent)
        if control.interrupted:
            break
    model.release("unet")
    model.release("vae_preview")


def generate(folder: Path | str, request: GenerateRequest, device: str | Device = "auto", threads: int | None = None,
             progress: ProgressFactory | None = None, observe: Observer | None = None,
             low_memory: bool = False) -> GenerateResult:
    """Every image of `request` at once, for callers that do not stream (calibration, tests, benchmarks).

    `observe(component, feeds)`, if given, sees every input fed to text_encoder, unet and the VAE.
    `low_memory` (A1111's --lowvram for the CPU): no ONNX Runtime memory arenas, and the VAE works in tiles."""
    request.validate()
    model = LoadedModel(folder, device, threads, low_memory, observe=observe)
    timings: dict[str, float] = {}
    images = list(run(model, request, progress, timings))
    return GenerateResult(images, model.device, {k: round(v, 3) for k, v in timings.items()})


def _sample(denoiser, request: GenerateRequest, seeds: list[int], callback, start: Start | None,
            latent_hw: tuple[int, int], steps: int | None = None) -> NDArray:
    """One sampling pass; stopped early (interrupt, skip), it gives the latest clean-latent prediction."""
    rng = ImageRng(seeds, (4, *latent_hw), source=request.randn_source)
    try:
        return sample(request.sampler, denoiser, rng, steps or request.steps, callback, start)
    except StopSampling:
        latest = denoiser.last_denoised()
        return (start.latent if start is not None else rng.first()) if latest is None else latest


@dataclass
class _Init:
    """img2img's start: the encoded picture, and for inpainting the prepared mask, the latent blend mask and (for a
    9-channel inpainting UNet) the extra input channels."""

    latent: NDArray
    mask: masks.PreparedMask | None = None
    nmask: NDArray | None = None  # [1,4,h,w], 1 = repaint
    concat: NDArray | None = None
    settings: dict = field(default_factory=dict)


def _img2img_init(model: LoadedModel, request: Img2ImgRequest, seed: int, clock) -> _Init:
    """A1111's img2img init: the picture resized by the resize mode and encoded; mode 3 encodes it at its own size
    (rounded to whole latent pixels) and resizes the latent bilinearly. With a mask: A1111's mask preparation, the
    masked-content fill, and for an inpainting model its conditioning."""
    with clock("vae_encode_s"):
        image = flatten(request.init_image)
        prepared = None
        if request.mask is not None:
            prepared = masks.prepare(image, request.mask, request.width, request.height, request.resize_mode,
                                     request.mask_blur, request.inpainting_mask_invert, request.inpaint_full_res,
                                     request.inpaint_full_res_padding, request.inpainting_fill)
            latent = decode.encode(model, [prepared.image])
        elif request.resize_mode == 3:
            image = image.resize((max(8, image.width // 8 * 8), max(8, image.height // 8 * 8)), Image.Resampling.LANCZOS)
            latent = resize_latent(decode.encode(model, [image]), request.width // 8, request.height // 8, "Latent")
        else:
            latent = decode.encode(model, [resize_image(request.resize_mode, image, request.width, request.height)])
        init = _Init(latent)
        if prepared is not None:
            init.mask, init.settings = prepared, dict(prepared.settings)
            init.nmask = np.broadcast_to(prepared.latent_mask, latent.shape).astype(np.float32)
            if request.inpainting_fill == 2:  # A1111 draws it once, from the first batch's seeds
                noise = ImageRng([seed], latent.shape[1:], source=request.randn_source).first()
                init.latent = latent * (1 - init.nmask) + noise * init.nmask
            elif request.inpainting_fill == 3:
                init.latent = latent * (1 - init.nmask)
        if model.unet_in_channels > 4:
            init.concat = _inpainting_conditioning(model, prepared.image if prepared else None,
                                                   prepared.pixel_mask if prepared else None, init.latent.shape,
                                                   request.inpainting_mask_weight)
            init.settings["Conditional mask weight"] = request.inpainting_mask_weight
        elif request.inpainting_mask_weight != 1.0:
            raise UsageError("--inpainting-mask-weight is for inpainting models (a UNet with 9 input channels); "
                             f"{model.name}'s takes {model.unet_in_channels}")
        model.release("vae_encoder")
    return init


def _inpainting_conditioning(model: LoadedModel, picture: Image.Image | None, mask: Image.Image | None,
                             latent_shape: tuple, weight: float) -> NDArray:
    """A1111's inpainting_image_conditioning: [mask, latent of the picture with the masked part blanked by
    `weight`], the mask rounded and resized (nearest) to the latent. Without a mask, the whole picture counts as
    masked (what A1111 gives an inpainting model in txt2img is the grey-picture case of this)."""
    _, _, h, w = latent_shape
    if mask is None:
        cond_mask = np.ones((1, 1, h * 8, w * 8), dtype=np.float32)
    else:
        cond_mask = np.round(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
    source = decode.from_image(picture) if picture is not None else np.zeros((1, 3, h * 8, w * 8), np.float32)
    blanked = source + (source * (1.0 - cond_mask) - source) * weight  # torch.lerp
    latent = decode.encode_pixels(model, blanked)
    rows = (np.arange(h) * cond_mask.shape[2] / h).astype(int)
    cols = (np.arange(w) * cond_mask.shape[3] / w).astype(int)
    small = cond_mask[:, :, rows][:, :, :, cols]
    return np.concatenate([small, latent], axis=1).astype(np.float32)


def _txt2img_concat(model: LoadedModel, request: GenerateRequest, clock) -> NDArray | None:
    """An inpainting model in txt2img: a mask of ones over the latent of a mid-grey picture (A1111's
    txt2img_image_conditioning)."""
    if model.unet_in_channels <= 4:
        return None
    with clock("vae_encode_s"):
        concat = _inpainting_conditioning(model, None, None, (1, 4, request.height // 8, request.width // 8), 1.0)
        model.release("vae_encoder")
    return concat


def _hires(model: LoadedModel, request: GenerateRequest, cond: Conditioning, latents: NDArray, seeds: list[int],
           progress, clock, last: bool, control: RunControl) -> NDArray:
    """A1111's sample_hr_pass: upscale the first pass (latent, or decoded picture re-encoded), then img2img at the
    hires size with fresh seeded noise of that size and exactly hr_steps steps."""
    w, h = request.hr_size
    up_w, up_h = request.hr_upscale_to
    if request.hr_upscaler in LATENT_MODES:
        latents = resize_latent(latents, up_w // 8, up_h // 8, request.hr_upscaler)
    else:
        if last:
            model.release("unet")
        with clock("vae_decode_s"):
            pictures = decode.decode(model, latents)
        with clock("upscale_s"):  # a model upscaler's session is opened once for the batch
            upscaler = (request.hr_upscaler if request.hr_upscaler in IMAGE_UPSCALERS
                        else open_upscaler(request.hr_upscaler, model.device))
            pictures = [upscale_image(p, up_w, up_h, upscaler) for p in pictures]
            del upscaler
        with clock("vae_encode_s"):
            latents = decode.encode(model, pictures)
            model.release("vae_encoder")
    # both resize sides given: A1111 truncates the latent to the box, centred
    ty, tx = (up_h - h) // 8, (up_w - w) // 8
    latents = latents[:, :, ty // 2: latents.shape[2] - (ty + 1) // 2, tx // 2: latents.shape[3] - (tx + 1) // 2]
    if request.denoising_strength == 0:
        return latents
    with clock("sampling_s"):
        denoiser = model.denoiser(guided_unet(model, cond, request.cfg_scale))
        start = img2img_start(latents, request.hr_steps, request.denoising_strength, fixed_steps=True)
        label = "hires pass"
        callback = control.watch(label, denoiser, progress(label) if progress else None)
        latents = _sample(denoiser, request, seeds, callback, start, (h // 8, w // 8), request.hr_steps)
    if last:
        model.release("unet")
    return latents


def settings(request: GenerateRequest, seed: int, model: LoadedModel, batch_pos: int, extra: dict | None = None) -> dict:
    """A1111's generation parameters for one image, in its order."""
    out: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": request.sampler,
        # A1111 1.9+ reads a missing schedule as "Automatic", which is Karras for these two
        "Schedule type": "Uniform" if request.sampler in ("DPM++ 2M", "DPM2") else None,
        "CFG scale": float(request.cfg_scale),
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model.short_hash,
        "Model": model.name,
    }
    if request.batch_size > 1:
        out["Batch size"] = request.batch_size
        out["Batch pos"] = batch_pos
    if isinstance(request, Img2ImgRequest):
        out["Denoising strength"] = request.denoising_strength
        if request.resize_mode:
            out["Resize mode"] = RESIZE_MODES[request.resize_mode]
    if request.enable_hr:
        out["Denoising strength"] = request.denoising_strength
        if request.hr_resize_x == 0 and request.hr_resize_y == 0:
            out["Hires upscale"] = request.hr_scale
        else:
            out["Hires resize"] = f"{request.hr_resize_x}x{request.hr_resize_y}"
        if request.hr_second_pass_steps:
            out["Hires steps"] = request.hr_second_pass_steps
        out["Hires upscaler"] = request.hr_upscaler
    out.update(extra or {})
    if getattr(model, "vae_approx", None) is not None:  # A1111 1.6+'s names for its TAESD decode/encode methods
        out["VAE Decoder"] = "TAESD"
        if isinstance(request, Img2ImgRequest) and model.has("vae_encoder") and model.vae_scaling("vae_encoder") != \
                model.scaling_factor:
            out["VAE Encoder"] = "TAESD"
    if request.randn_source == "cpu":
        out["RNG"] = "CPU"  # A1111 defaults to its GPU source and marks CPU noise this way
    out["Version"] = f"sd-onnx {__version__}"
    return out


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str):
    """Adds the seconds spent in the block to timings[name]."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
