"""A1111's /sdapi/v1 request and response shapes, built from the runtime's request fields so the two cannot drift.

A1111 (modules/api/models.py) makes its request models from the signature of its processing classes; here they are
made from the fields of `GenerateRequest` and `Img2ImgRequest`, under A1111's names and defaults, plus the A1111
fields sd-onnx accepts and ignores (so that clients sending a full A1111 body work) with a note in `info`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from sd_onnx import __version__
from sd_onnx.errors import UsageError
from sd_onnx.runtime.infotext import sampler_for
from sd_onnx.runtime.requests import GenerateRequest, Img2ImgRequest
from sd_onnx.runtime.samplers import SAMPLER_NAMES
from sd_onnx.server.errors import ApiError

# our request field -> A1111's name for it
RENAMED = {"sampler": "sampler_name", "batch_count": "n_iter"}
# ours, not request fields in A1111: the noise source is its `randn_source` option, the picture is `init_images`
NOT_API_FIELDS = {"randn_source", "init_image", "mask"}
# A1111's defaults where they differ from ours (StableDiffusionProcessing: prompt "", steps=50, width/height 512;
# no sampler name, so sampler_index "Euler" applies; no hires upscaler or strength, so the runtime's defaults apply)
A1111_DEFAULTS: dict[str, Any] = {"prompt": "", "steps": 50, "sampler_name": None, "hr_upscaler": None,
                                  "denoising_strength": None, "width": 512, "height": 512,
                                  # StableDiffusionProcessingImg2Img's inpainting defaults: fill, only masked, no pad
                                  "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}

# A1111 request fields sd-onnx reads besides the runtime's
HANDLED: dict[str, tuple[Any, Any]] = {
    "sampler_index": (str, "Euler"),
    "scheduler": (Optional[str], None),
    "send_images": (bool, True),
}
IMG2IMG_HANDLED: dict[str, tuple[Any, Any]] = {
    "init_images": (Optional[list], None),
    "mask": (Optional[str], None),
    "include_init_images": (bool, False),
}
# A1111 request fields accepted and ignored, with A1111's defaults: a value other than the default gets a note
IGNORED: dict[str, Any] = {
    "styles": None, "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
    "restore_faces": None, "tiling": None, "do_not_save_samples": False, "do_not_save_grid": False, "eta": None,
    "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None, "override_settings": None,
    "override_settings_restore_afterwards": True, "refiner_checkpoint": None, "refiner_switch_at": None,
    "disable_extra_networks": False, "firstpass_image": None, "comments": None, "firstphase_width": 0,
    "firstphase_height": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
    "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": None, "script_name": None, "script_args": [],
    "alwayson_scripts": {}, "infotext": None, "save_images": False,
}
# values of ignored fields that change nothing here either: A1111's ancestral eta and noise scale of 1, which clients
# such as webuiapi send by default
NEUTRAL: dict[str, Any] = {"eta": 1.0, "s_noise": 1.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0}
IMG2IMG_IGNORED: dict[str, Any] = {
    "mask_blur_x": 4, "mask_blur_y": 4, "initial_noise_multiplier": None, "latent_mask": None, "mask_round": True,
    "image_cfg_scale": None,
}
# A1111 1.9's schedulers (modules/sd_schedulers.py): name -> label. sd-onnx has the first three.
SCHEDULERS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}
A1111_ONLY_SCHEDULERS = {"exponential": "Exponential", "polyexponential": "Polyexponential",
                         "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
                         "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal",
                         "ddim": "DDIM", "beta": "Beta", "align_your_steps_GITS": "Align Your Steps GITS",
                         "align_your_steps_11": "Align Your Steps 11", "align_your_steps_32": "Align Your Steps 32"}
# A1111's aliases of the samplers sd-onnx has (sd_samplers_kdiffusion.py, sd_samplers_timesteps.py)
SAMPLER_ALIASES = {
    "Euler a": ["k_euler_a", "k_euler_ancestral"], "Euler": ["k_euler"], "LMS": ["k_lms"], "Heun": ["k_heun"],
    "DPM2": ["k_dpm_2"], "DPM++ 2M": ["k_dpmpp_2m"], "DPM++ 2M Karras": ["k_dpmpp_2m_ka"],
    "DPM++ SDE Karras": ["k_dpmpp_sde_ka"], "DDIM": ["ddim"], "PLMS": ["plms"], "LCM": ["k_lcm"],
    "UniPC": ["unipc"],
}


def _api_fields(request_type) -> dict[str, tuple[Any, Any]]:
    out = {}
    for f in dataclasses.fields(request_type):
        if f.name in NOT_API_FIELDS:
            continue
        name = RENAMED.get(f.name, f.name)
        default = A1111_DEFAULTS.get(name, f.default)
        if request_type is Img2ImgRequest and name == "denoising_strength":
            default = f.default  # A1111's img2img API model says 0.75, as ours
        out[name] = (Optional[_TYPES[f.type]], Field(default=default))
    return out


def _model(name: str, request_type, handled: dict, ignored: dict) -> type[BaseModel]:
    fields = _api_fields(request_type)
    fields.update({k: (t, Field(default=d)) for k, (t, d) in handled.items()})
    fields.update({k: (Any, Field(default=d)) for k, d in ignored.items()})
    return create_model(name, __config__=ConfigDict(extra="allow"), **fields)


Txt2ImgBody = _model("StableDiffusionProcessingTxt2Img", GenerateRequest, HANDLED, IGNORED)
Img2ImgBody = _model("StableDiffusionProcessingImg2Img", Img2ImgRequest, {**HANDLED, **IMG2IMG_HANDLED},
                     {**IGNORED, **IMG2IMG_IGNORED})


class ExtrasBase(BaseModel):
    resize_mode: int = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = 0
    codeformer_visibility: float = 0
    codeformer_weight: float = 0
    upscaling_resize: float = 2
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0
    upscale_first: bool = False


class ExtrasSingleImage(ExtrasBase):
    image: str = ""


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImages(ExtrasBase):
    imageList: list[FileData]  # noqa: N815 (A1111's name)


class PngInfoBody(BaseModel):
    image: str


def resolve_sampler(name: str | None, index: str | None, scheduler: str | None) -> str:
    """Our sampler name for A1111's sampler_name (else sampler_index) and 1.9's scheduler field.

    Without a scheduler the name is read as written (A1111 before 1.9: "DPM++ 2M" is uniform); with one, as A1111
    1.9 does (`automatic` is Karras for DPM++ 2M / DPM++ SDE / DPM2). An unknown sampler is a 404, as in A1111."""
    name = name or index or "Euler"
    label = None
    if scheduler not in (None, ""):
        key = str(scheduler).strip()
        by_label = {v.casefold(): k for k, v in {**SCHEDULERS, **A1111_ONLY_SCHEDULERS}.items()}
        key = by_label.get(key.casefold(), key.casefold() if key.casefold() in SCHEDULERS else key)
        if key not in SCHEDULERS:
            known = "an A1111 scheduler sd-onnx does not have" if key in A1111_ONLY_SCHEDULERS else "not a scheduler"
            raise ApiError(422, f"scheduler {scheduler!r} is {known}; available: {', '.join(SCHEDULERS)}")
        label = SCHEDULERS[key]
    bases = {n.removesuffix(" Karras") for n in SAMPLER_NAMES}
    if name not in SAMPLER_NAMES and name.removesuffix(" Karras") not in bases:
        raise ApiError(404, f"Sampler not found: {name!r}; available: {', '.join(SAMPLER_NAMES)}")
    try:
        result = sampler_for(name, label)
    except UsageError:
        raise ApiError(422, f"sampler {name!r} with scheduler {scheduler!r} is not available in sd-onnx; "
                            f"samplers: {', '.join(SAMPLER_NAMES)}") from None
    if result not in SAMPLER_NAMES:
        raise ApiError(404, f"Sampler not found: {name!r}; available: {', '.join(SAMPLER_NAMES)}")
    return result


def to_request(body: BaseModel, request_type, randn_source: str, **extra) -> tuple[GenerateRequest, list[str]]:
    """The runtime request for an API body, and notes on what was ignored; the request is validated (ApiError 422
    naming the field for a bad value)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(request_type):
        if f.name in NOT_API_FIELDS:
            continue
        value = getattr(body, RENAMED.get(f.name, f.name))
        if value is not None:
            values[f.name] = value
    values["sampler"] = resolve_sampler(body.sampler_name, body.sampler_index, body.scheduler)
    values["randn_source"] = randn_source
    values.update(extra)
    request = request_type(**values)
    try:
        request.validate()
    except UsageError as e:
        raise ApiError(422, str(e)) from None
    return request, ignored_notes(body, IGNORED if request_type is GenerateRequest else {**IGNORED, **IMG2IMG_IGNORED})


def ignored_notes(body: BaseModel, ignored: dict[str, Any]) -> list[str]:
    notes = []
    for key in sorted(body.model_fields_set & set(ignored)):
        value = getattr(body, key)
        if value not in (None, "", [], {}, False) and value != ignored[key] and value != NEUTRAL.get(key) and not (
                isinstance(value, (int, float)) and value in (0, -1)):
            notes.append(f"'{key}' is not supported by sd-onnx and was ignored")
    for key in sorted(body.model_extra or {}):
        notes.append(f"unknown field '{key}' was ignored")
    return notes


def echo(body: BaseModel, drop: tuple[str, ...] = ()) -> dict:
    """A1111's `parameters`: the request as the server read it, defaults filled in."""
    out = body.model_dump()
    for key in drop:
        out[key] = None
    return out


def info_json(request: GenerateRequest, images: list, model_title: str, model_hash: str, notes: list[str],
              job: dict) -> str:
    """A1111's `info` (Processed.js()): a JSON string describing the run, with sd-onnx's notes and job record."""
    seeds = [img.seed for img in images] or [request.seed]
    n = len(images)
    return json.dumps({
        "prompt": request.prompt, "all_prompts": [request.prompt] * n,
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * n,
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": request.width, "height": request.height, "sampler_name": request.sampler,
        "cfg_scale": request.cfg_scale, "steps": request.steps, "batch_size": request.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model_title,
        "sd_model_hash": model_hash, "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": request.denoising_strength if request.uses_strength else None,
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [img.parameters for img in images], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1, "is_using_inpainting_conditioning": False,
        "version": f"sd-onnx {__version__}", "notes": notes, "sd_onnx": job,
    })
