"""A batch job's input: its JSONL of A1111 txt2img / img2img payloads (or a prompt file and seeds) read into units,
each keyed on a hash of its request."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sd_onnx.errors import SdOnnxError, UsageError
from sd_onnx.runtime.requests import GenerateRequest, Img2ImgRequest

# A1111's API default noise source is its GPU one (options["randn_source"] = "GPU"), as `serve` uses
RANDN_SOURCE = "gpu"


@dataclass(frozen=True)
class Unit:
    """One batch of one line: what a worker runs (batch_count 1, the batch's first seed)."""

    line: int
    request_id: str
    request: GenerateRequest

    @property
    def seeds(self) -> list[int]:
        return [self.request.seed + j for j in range(self.request.batch_size)]

    @property
    def keys(self) -> list[str]:
        return [item_key(self.request_id, s) for s in self.seeds]


def item_key(request_id: str, seed: int) -> str:
    return f"{request_id}-{seed}"


def _picture_hash(picture: Image.Image) -> str:
    """The pixels, not the encoding: the same picture sent as another PNG (or JPEG of the same pixels) is the same."""
    digest = hashlib.sha256(f"{picture.mode} {picture.width}x{picture.height}\0".encode())
    digest.update(picture.tobytes())
    return digest.hexdigest()


def _request_id(request: GenerateRequest) -> str:
    fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
    fields = {k: {"picture": _picture_hash(v)} if isinstance(v, Image.Image) else v for k, v in fields.items()}
    if isinstance(request, Img2ImgRequest):
        fields["mode"] = "img2img"  # never the key of a txt2img line with equal fields
    text = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_seeds(text: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    try:
        a, b = int(first), int(last if sep else first)
    except ValueError:
        raise UsageError(f"--seeds expects A-B (whole numbers), got {text!r}") from None
    if a < 0 or b < a:
        raise UsageError(f"--seeds A-B needs 0 <= A <= B, got {text!r}")
    return a, b


def read_job(path: Path, seeds: tuple[int, int] | None = None, params: dict | None = None) -> list[Unit]:
    """The units of a job file, every line checked before anything runs; a bad line is one error naming it.

    JSONL: one A1111 payload per line, txt2img's, or img2img's when it has `init_images` (base64 pictures, the first
    used, as /sdapi/v1/img2img does; `mask` for inpainting). With `seeds`: a prompt file, one prompt per line,
    expanded to one request per seed. `params`: fields every line starts from (a line's own fields win)."""
    try:
        from sd_onnx.server import schemas
        from sd_onnx.server.errors import ApiError
    except ImportError as e:
        raise SdOnnxError(f"batch reads A1111 payloads with the server's models ({e.name} is missing): "
                          "pip install 'sd-onnx[server]'") from None
    from pydantic import ValidationError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"job file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read job file {path}: {e}") from None
    units: list[Unit] = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        if seeds is not None:
            payloads = [{**(params or {}), "prompt": text.strip(), "seed": s} for s in range(seeds[0], seeds[1] + 1)]
        else:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{where}: expected a JSON object (an A1111 txt2img or img2img payload), got "
                                 f"{type(obj).__name__}")
            payloads = [{**(params or {}), **obj}]
        for payload in payloads:
            img2img = "init_images" in payload
            body_type = schemas.Img2ImgBody if img2img else schemas.Txt2ImgBody
            unknown = sorted(set(payload) - set(body_type.model_fields))
            if unknown:
                kind = "img2img" if img2img else "txt2img"
                raise UsageError(f"{where}: unknown field '{unknown[0]}' (not an A1111 {kind} field)")
            try:
                body = body_type.model_validate(payload)
                if img2img:
                    request, _ = schemas.to_request(body, Img2ImgRequest, RANDN_SOURCE, **_pictures(body))
                else:
                    request, _ = schemas.to_request(body, GenerateRequest, RANDN_SOURCE)
            except ValidationError as e:
                err = e.errors()[0]
                name = ".".join(str(p) for p in err["loc"])
                raise UsageError(f"{where}: field '{name}': {err['msg']} (got {_short(err.get('input'))})") from None
            except ApiError as e:
                raise UsageError(f"{where}: {e.detail}") from None
            units.extend(_units(number, request))
    if not units:
        raise UsageError(f"{path}: no requests in the job file")
    return units


def _pictures(body) -> dict:
    """img2img's init image (the first of init_images) and mask, decoded and checked as the API does."""
    from sd_onnx.server.codec import decode_image
    from sd_onnx.server.errors import ApiError

    if not isinstance(body.init_images, list) or not body.init_images:
        raise ApiError(422, "init_images: img2img needs one base64-encoded image")
    return {"init_image": decode_image(body.init_images[0], "init_images[0]"),
            "mask": decode_image(body.mask, "mask") if body.mask else None}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."  # a base64 picture is no help in an error line


def _units(line: int, request: GenerateRequest) -> list[Unit]:
    if request.seed == -1:
        # A1111 draws a random seed; a batch must make the same images when it resumes, so the seed comes from the
        # request itself (same line, same seed), as A1111's random draw would have fixed it in the infotext.
        request = dataclasses.replace(request, seed=int(_request_id(request), 16) % 2**32)
    rid = _request_id(request)
    bs = request.batch_size
    return [Unit(line, rid, dataclasses.replace(request, seed=request.seed + b * bs, batch_count=1))
            for b in range(request.batch_count)]
