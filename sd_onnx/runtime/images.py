"""Image files: init images read with one-line errors, PNGs that carry A1111's `parameters` text, written whole."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from sd_onnx.errors import SdOnnxError, UsageError

MAX_CLAIM_TRIES = 1000


def open_image(path: Path, keep_alpha: bool = False) -> Image.Image:
    """A picture file, fully read, flattened to RGB (see flatten). `keep_alpha` (masks, whose alpha may be the
    painted part): RGBA when the file has transparency."""
    try:
        with Image.open(path) as im:
            im.load()
            if keep_alpha and (im.mode in ("RGBA", "LA") or "transparency" in im.info):
                return im.convert("RGBA")
            return flatten(im)
    except FileNotFoundError:
        raise UsageError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not an image") from None
    except Image.DecompressionBombError as e:
        raise UsageError(f"{path}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"cannot read {path} as an image ({type(e).__name__}: {str(e)[:120]})") from None


def flatten(image: Image.Image) -> Image.Image:
    """RGB; transparent parts go on white, A1111's default img2img background (images.flatten)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def read_parameters(path: Path) -> str:
    """The A1111 `parameters` text of a PNG (PNG Info)."""
    try:
        with Image.open(path) as im:
            text = im.info.get("parameters") or getattr(im, "text", {}).get("parameters")
    except FileNotFoundError:
        raise UsageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"cannot read {path} as an image ({type(e).__name__})") from None
    if not text:
        raise UsageError(f"{path} carries no generation parameters (no A1111 'parameters' text chunk)")
    return text


def next_index(outdir: Path) -> int:
    """A1111 numbers images NNNNN-SEED.png, continuing after the highest number already in the folder."""
    return max(_numbers(outdir), default=-1) + 1


def _numbers(outdir: Path) -> set[int]:
    return {int(m.group(1)) for p in outdir.glob("*.png") if (m := re.match(r"(\d+)-", p.name))}


def save_png(image: Image.Image, outdir: Path, index: int, seed: int | str, parameters: str | None,
             extra_text: dict[str, str] | None = None) -> Path:
    """Write NNNNN-SEED.png complete or not at all, at the first free number from `index` on. `extra_text`: more
    PNG text chunks (Extras writes its `postprocessing` fields there, beside the source's `parameters`).

    The PNG is written to a hidden temporary name, then hard-linked to its final name, which fails if the name
    exists: two runs saving into one folder never overwrite each other, and a reader never sees half a file."""
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    for key, text in (extra_text or {}).items():
        info.add_text(key, text)
    tmp = outdir / f".{uuid.uuid4().hex[:12]}.png.partial"
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        taken = _numbers(outdir)
        for _ in range(MAX_CLAIM_TRIES):
            while index in taken:
                index += 1
            path = outdir / f"{index:05d}-{seed}.png"
            try:
                _claim(tmp, path)
                return path
            except FileExistsError:
                taken.add(index)
        raise SdOnnxError(f"cannot find a free file name in {outdir}")
    except OSError as e:
        raise SdOnnxError(f"cannot write an image to {outdir}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _claim(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network shares): claim the name, then move the file over it
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(fd)
        os.replace(tmp, path)


def prepare_outdir(outdir: Path) -> Path:
    outdir = Path(outdir).expanduser()
    if outdir.exists() and not outdir.is_dir():
        raise SdOnnxError(f"output folder {outdir} is a file, not a folder")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = outdir / f".sd-onnx-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SdOnnxError(f"cannot write to output folder {outdir}: {e.strerror or e}") from None
    return outdir
