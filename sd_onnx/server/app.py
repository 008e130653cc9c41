"""The FastAPI app: A1111's /sdapi/v1 routes over one loaded model and one job queue, its error bodies, HTTP Basic
auth and request limits, and the web page at /."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from sd_onnx import __version__
from sd_onnx.errors import SdOnnxError
from sd_onnx.home import models_dir
from sd_onnx.runtime import pipeline
from sd_onnx.runtime.infotext import parse_infotext
from sd_onnx.runtime.requests import GenerateRequest, Img2ImgRequest, max_size
from sd_onnx.runtime.samplers import SAMPLER_NAMES
from sd_onnx.runtime.upscale import LATENT_MODES, image_upscaler_names, upscale_image
from sd_onnx.server import schemas
from sd_onnx.server.catalog import Catalog
from sd_onnx.server.codec import cheap_preview, decode_image, encode_png
from sd_onnx.server.errors import ApiError, error_response
from sd_onnx.server.jobs import Job, Worker

log = logging.getLogger("sd_onnx.server")
STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 50 * 2**20  # a 2048x2048 PNG in base64 is well under this
MAX_STEPS = 150  # A1111's UI slider maximum
DRAIN_BYTES = 512 * 2**20  # a larger refused body is not read: the connection is closed on it
POLL_S = 0.1  # how often a waiting request looks for its client having gone
RANDN = {"GPU": "gpu", "NV": "gpu", "CPU": "cpu"}


@dataclass
class Limits:
    max_body_bytes: int = MAX_BODY_BYTES
    max_steps: int = MAX_STEPS


@dataclass
class State:
    catalog: Catalog
    worker: Worker
    limits: Limits
    flags: dict
    options: dict = field(default_factory=dict)


class BodyTooLarge(Exception):
    pass


class Guard:
    """Pure ASGI (a waiting request must still see its client's disconnect): HTTP Basic auth on every path when
    credentials are set, and the request body limit, by Content-Length and by counting."""

    def __init__(self, app, credentials: dict[str, str] | None, max_body: int):
        self.app, self.credentials, self.max_body = app, credentials or {}, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.credentials and not self._authorized(headers.get("authorization", "")):
            response = error_response(401, "HTTPException", "Incorrect username or password",
                                      headers={"WWW-Authenticate": 'Basic realm="sd-onnx"'})
            return await response(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await self._drain(receive, int(length))
            response = error_response(413, "HTTPException", f"the request body of {int(length)} bytes is over the "
                                                             f"limit of {self.max_body} bytes (--max-body-mb)")
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise BodyTooLarge()
            return message

        return await self.app(scope, counted, send)

    async def _drain(self, receive, length: int) -> None:
        """Read (and drop) a refused body up to DRAIN_BYTES, so that a client still sending it reads the answer
        instead of a reset connection."""
        if length > DRAIN_BYTES:
            return
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    def _authorized(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        expected = self.credentials.get(user)
        return expected is not None and secrets.compare_digest(password.encode(), expected.encode())


async def _preview(model, latent):
    """TAESD when the model has one to preview with (a few hundred ms, off the event loop), else the cheap one."""
    if getattr(model, "preview_vae", None) is None:
        return cheap_preview(latent)
    import asyncio

    from sd_onnx.runtime.decode import preview

    return await asyncio.to_thread(preview, model, latent)


def create_app(catalog: Catalog, credentials: dict[str, str] | None = None, limits: Limits | None = None,
               flags: dict | None = None) -> FastAPI:
    limits = limits or Limits()
    worker = Worker()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = FastAPI(title="sd-onnx", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    state = State(catalog, worker, limits, flags or {}, {"randn_source": "GPU", "samples_format": "png"})
    app.state.sd = state
    _errors(app, limits)
    _routes(app, state)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, credentials=credentials, max_body=limits.max_body_bytes)
    return app


def _errors(app: FastAPI, limits: Limits) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e.status, "HTTPException", e.detail, headers=e.headers)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, e: BodyTooLarge):
        return error_response(413, "HTTPException", f"the request body is over the limit of "
                                                    f"{limits.max_body_bytes} bytes (--max-body-mb)")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}"
                    for err in e.errors()]
        body = e.body if isinstance(e.body, (str, type(None))) else ""
        return error_response(422, "RequestValidationError", "; ".join(problems)[:500],
                              body=(body or "")[:200] if isinstance(body, str) else "", errors=problems[:20])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, "HTTPException", e.detail, headers=getattr(e, "headers", None))

    @app.exception_handler(SdOnnxError)
    async def usage(request: Request, e: SdOnnxError):
        return error_response(422, type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")

    @app.exception_handler(Exception)
    async def failure(request: Request, e: Exception):
        log.exception("API error: %s %s", request.method, request.url.path)
        return error_response(500, type(e).__name__, "", errors=str(e)[:500])


async def _run(state: State, request: Request, name: str, work) -> tuple[Any, Job]:
    """Queue `work`, wait for its turn and its result; a client that leaves while queued loses its place."""
    job = state.worker.submit(Job(name, work, asyncio.get_running_loop()))
    try:
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=POLL_S)
            if done:
                return job.future.result(), job
            if job.state == "queued" and await request.is_disconnected() and state.worker.withdraw(job):
                raise _Gone()
    except asyncio.CancelledError:
        state.worker.withdraw(job)
        raise


class _Gone(Exception):
    """The client left while its job waited; nobody reads the answer."""


def _check_steps(state: State, request: GenerateRequest) -> None:
    limit = state.limits.max_steps
    for name, value in (("steps", request.steps), ("hr_second_pass_steps", request.hr_second_pass_steps)):
        if value > limit:
            raise ApiError(422, f"{name} {value} is over the server's limit of {limit} (--max-steps)")


def _routes(app: FastAPI, state: State) -> None:  # noqa: C901 - one flat list of routes, as A1111's Api
    catalog, worker = state.catalog, state.worker

    @app.exception_handler(_Gone)
    async def gone(request: Request, e: _Gone):
        return Response(status_code=499)

    async def generate(request: Request, kind: str, body, request_obj, notes, drop=()):
        _check_steps(state, request_obj)
        def work(control):
            # the model's names are read here: a model switch queued behind this job may run before the answer
            model = catalog.model
            return list(pipeline.run(model, request_obj, control=control)), catalog.title, model.short_hash

        try:
            (images, title, short_hash), job = await _run(state, request, kind, work)
        except SdOnnxError as e:
            raise ApiError(422, str(e).strip().splitlines()[0]) from None
        info = schemas.info_json(request_obj, images, title, short_hash, notes, job.record())
        return {"images": [encode_png(i.image, i.parameters) for i in images] if body.send_images else [],
                "parameters": schemas.echo(body, drop), "info": info}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: schemas.Txt2ImgBody, request: Request):
        request_obj, notes = schemas.to_request(body, GenerateRequest, RANDN[state.options["randn_source"]])
        return await generate(request, "txt2img", body, request_obj, notes)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: schemas.Img2ImgBody, request: Request):
        if not body.init_images:
            raise ApiError(422, "init_images: img2img needs one base64-encoded image")
        picture = decode_image(body.init_images[0], "init_images[0]")
        mask = decode_image(body.mask, "mask") if body.mask else None
        request_obj, notes = schemas.to_request(body, Img2ImgRequest, RANDN[state.options["randn_source"]],
                                                init_image=picture, mask=mask)
        if len(body.init_images) > 1:
            notes.append("only the first of init_images was used")
        drop = () if body.include_init_images else ("init_images", "mask")
        return await generate(request, "img2img", body, request_obj, notes, drop)

    def upscale(picture: Image.Image, body: schemas.ExtrasBase) -> Image.Image:
        available = image_upscaler_names()
        for name in (body.upscaler_1, body.upscaler_2):
            if name not in available:
                raise ApiError(422, f"upscaler {name!r} is not available; image upscalers: {', '.join(available)}")
        if body.resize_mode not in (0, 1):
            raise ApiError(422, "resize_mode must be 0 (by upscaling_resize) or 1 (to upscaling_resize_w/h)")
        if body.resize_mode == 1:
            if body.upscaling_resize_w < 1 or body.upscaling_resize_h < 1:
                raise ApiError(422, "upscaling_resize_w and upscaling_resize_h must be at least 1")
            by = max(body.upscaling_resize_w / picture.width, body.upscaling_resize_h / picture.height)
        else:
            by = body.upscaling_resize
        if not by > 0:
            raise ApiError(422, f"upscaling_resize must be more than 0, got {by}")
        w, h = max(1, int(picture.width * by)), max(1, int(picture.height * by))
        limit = 2 * max_size()
        if max(w, h) > limit:
            raise ApiError(422, f"the upscaled size {w}x{h} is over the limit of {limit} px a side "
                                "(2 x SD_ONNX_MAX_SIZE)")
        picture = picture.convert("RGB")
        out = upscale_image(picture, w, h, body.upscaler_1)
        if body.upscaler_2 != "None" and body.extras_upscaler_2_visibility > 0:
            second = upscale_image(picture, w, h, body.upscaler_2)
            out = Image.blend(out, second, min(1.0, body.extras_upscaler_2_visibility))
        if body.resize_mode == 1 and body.upscaling_crop:
            cw, ch = body.upscaling_resize_w, body.upscaling_resize_h
            left, top = (out.width - cw) // 2, (out.height - ch) // 2
            out = out.crop((left, top, left + cw, top + ch))
        return out

    def extras_note(body: schemas.ExtrasBase) -> str:
        if body.gfpgan_visibility or body.codeformer_visibility:
            return "<p>face restoration (GFPGAN, CodeFormer) is not available in sd-onnx and was skipped</p>"
        return ""

    @app.post("/sdapi/v1/extra-single-image")
    async def extra_single(body: schemas.ExtrasSingleImage, request: Request):
        picture = decode_image(body.image, "image")
        out, _ = await _run(state, request, "extras", lambda control: upscale(picture, body))
        return {"html_info": extras_note(body), "image": encode_png(out) if body.show_extras_results else None}

    @app.post("/sdapi/v1/extra-batch-images")
    async def extra_batch(body: schemas.ExtrasBatchImages, request: Request):
        pictures = [decode_image(item.data, f"imageList[{i}].data") for i, item in enumerate(body.imageList)]
        outs, _ = await _run(state, request, "extras", lambda control: [upscale(p, body) for p in pictures])
        return {"html_info": extras_note(body), "images": [encode_png(o) for o in outs] if body.show_extras_results
                else []}

    @app.post("/sdapi/v1/png-info")
    async def png_info(body: schemas.PngInfoBody):
        picture = decode_image(body.image, "image")
        text = picture.info.get("parameters")
        items = {k: v for k, v in picture.info.items() if isinstance(k, str) and isinstance(v, str)
                 and k != "parameters"}
        if not isinstance(text, str) or not text:
            return {"info": "", "items": items, "parameters": {}}
        prompt, negative, settings = parse_infotext(text)
        parameters: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative, **settings}
        for key in ("Size", "Hires resize"):
            if "x" in settings.get(key, ""):
                parameters[f"{key}-1"], parameters[f"{key}-2"] = settings[key].split("x", 1)
        return {"info": text, "items": items, "parameters": parameters}

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        job = worker.current
        control = job.control if job is not None else None
        queued = worker.pending
        state_dict = {"skipped": bool(control and control.skipped),
                      "interrupted": bool(control and control.interrupted),
                      "stopping_generation": False, "job": job.name if job else "",
                      "job_count": max(control.batches, 1) if control else 0, "job_timestamp": "0",
                      "job_no": control.batch if control else 0, "sampling_step": control.step if control else 0,
                      "sampling_steps": control.total if control else 0, "queue_pending": queued}
        if job is None:
            return {"progress": 0, "eta_relative": 0, "state": state_dict, "current_image": None, "textinfo": None}
        count = max(control.batches, 1)
        value = 0.01 + control.batch / count
        if control.total:
            value += control.step / control.total / count
        elapsed = max(time.time() - job.time_start, 1e-6)
        eta = elapsed / value - elapsed
        image = None
        if not skip_current_image:
            latent = control.preview()
            if latent is not None:
                image = encode_png(await _preview(catalog.model, latent[0]))
        return {"progress": min(value, 1.0), "eta_relative": eta, "state": state_dict, "current_image": image,
                "textinfo": control.label or None}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        job = worker.current
        if job is not None:
            job.control.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        job = worker.current
        if job is not None:
            job.control.skip()
        return None

    @app.get("/sdapi/v1/options")
    async def get_options():
        return {**state.options, "sd_model_checkpoint": catalog.title, "sd_checkpoint_hash": catalog.sha256,
                "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0, "live_previews_enable": True,
                "show_progress_type": "Approx cheap", "show_progress_every_n_steps": 1, "enable_pnginfo": True,
                "sd_vae": "Automatic"}

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any], request: Request):
        if "randn_source" in body and body["randn_source"] not in RANDN:
            raise ApiError(422, f"randn_source must be one of {', '.join(RANDN)}, got {body['randn_source']!r}")
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None:
            folder = catalog.find(wanted)
            try:
                await _run(state, request, "load model", lambda control: catalog.load(folder))
            except SdOnnxError as e:
                raise ApiError(422, f"sd_model_checkpoint: {str(e).strip().splitlines()[0]}") from None
        for key in ("randn_source", "samples_format"):
            if key in body:
                state.options[key] = body[key]
        return None

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return catalog.entries()

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        catalog.refresh()
        return None

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": n, "aliases": schemas.SAMPLER_ALIASES.get(n, []),
                 "options": {"scheduler": "karras"} if n.endswith(" Karras") else {}} for n in SAMPLER_NAMES]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": k, "label": v, "aliases": None, "default_rho": 7.0 if k == "karras" else -1.0,
                 "need_inner_model": k == "uniform"} for k, v in schemas.SCHEDULERS.items()]

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        from sd_onnx.runtime.upscaler_models import find_upscaler, installed_upscalers, read_upscaler_info

        models = set(installed_upscalers())
        return [{"name": n, "model_name": n if n in models else None, "model_path": None, "model_url": None,
                 "scale": read_upscaler_info(find_upscaler(n)).get("scale", 4) if n in models else 4}
                for n in image_upscaler_names()]

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_modes():
        return [{"name": n} for n in LATENT_MODES]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        """A1111's shape: name -> {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}; a file that does not
        load is under "skipped" (it fails only when a prompt names it)."""
        from sd_onnx.home import embeddings_dir
        from sd_onnx.runtime.embeddings import SUFFIXES, load_embedding

        loaded, skipped = {}, {}
        folder = embeddings_dir()
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.suffix.lower() not in SUFFIXES or not path.is_file():
                continue
            try:
                e = load_embedding(path)
                loaded[e.name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                  "shape": int(e.vectors.shape[1]), "vectors": int(e.vectors.shape[0])}
            except SdOnnxError as err:
                skipped[path.stem] = {"error": str(err)}
        return {"loaded": loaded, "skipped": skipped}

    @app.get("/sdapi/v1/loras")
    async def loras():
        """A1111's shape: [{name, alias, path, metadata}] for the files `<lora:NAME:WEIGHT>` can name."""
        from sd_onnx.home import loras_dir
        from sd_onnx.runtime.networks import LORA_SUFFIXES

        folder = loras_dir()
        return [{"name": p.stem, "alias": p.stem, "path": p.name, "metadata": {}}
                for p in (sorted(folder.rglob("*")) if folder.is_dir() else [])
                if p.suffix.lower() in LORA_SUFFIXES and p.is_file()]

    for path, value in (("sd-vae", []), ("hypernetworks", []), ("face-restorers", []), ("realesrgan-models", []),
                        ("prompt-styles", []), ("script-info", []), ("extensions", []),
                        ("scripts", {"txt2img": [], "img2img": []})):
        app.add_api_route(f"/sdapi/v1/{path}", _constant(value), methods=["GET"])

    @app.get("/sdapi/v1/memory")
    async def memory():
        return {"ram": _ram(), "cuda": {"error": "unavailable (sd-onnx reports no CUDA memory)"}}

    @app.get("/sdapi/v1/cmd-flags")
    async def cmd_flags():
        return {**state.flags, "api": True, "nowebui": False, "ckpt_dir": str(models_dir()),
                "lowvram": catalog.low_memory}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")


def _constant(value):
    async def endpoint():
        return value
    return endpoint


def _ram() -> dict:
    """System RAM in bytes (A1111's /memory `ram`: free, used, total), from /proc/meminfo where there is one."""
    try:
        info = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        total, free = info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
        return {"free": free, "used": total - free, "total": total}
    except (OSError, KeyError, ValueError, IndexError):
        return {"error": "unavailable"}
