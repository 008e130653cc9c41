"""Where model folders live ($SD_ONNX_HOME/models) and how a --model argument finds one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sd_onnx.errors import ModelFolderError

METADATA = "sd_onnx.json"
REQUIRED = ("model_index.json", "text_encoder/model.onnx", "unet/model.onnx", "vae_decoder/model.onnx",
            "tokenizer/vocab.json", "scheduler/scheduler_config.json")


def home() -> Path:
    return Path(os.environ.get("SD_ONNX_HOME", Path.home() / ".sd-onnx")).expanduser()


def models_dir() -> Path:
    return home() / "models"


def upscalers_dir() -> Path:
    """ESRGAN-family upscalers exported by `sd-onnx export-upscaler`, one folder each (A1111 keeps them beside models)."""
    return home() / "upscalers"


def cache_dir() -> Path:
    """The runtimes' caches (optimized or compiled graphs): safe to delete, rebuilt at the next start."""
    return home() / "cache"


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder` (0 when it is missing)."""
    try:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    except OSError:  # a file removed while counting
        return 0


def installed_models() -> list[Path]:
    """Model folders under models_dir(); precision variants (made by `sd-onnx quantize`) go with their original."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and (p / "model_index.json").is_file() and not _is_variant(p))


def _is_variant(path: Path) -> bool:
    return "variant_of" in read_metadata(path)


def read_metadata(folder: Path) -> dict:
    """The folder's sd_onnx.json, or {} when it has none or it is unreadable (check_folder reports those)."""
    try:
        return json.loads((folder / METADATA).read_text())
    except (OSError, ValueError):
        return {}


def find_model(model: str | Path | None) -> Path:
    """A model folder from a path, a name under models_dir(), or the only installed model."""
    if model is None:
        found = installed_models()
        if len(found) == 1:
            return found[0]
        if not found:
            raise ModelFolderError(f"no model installed in {models_dir()}: run `sd-onnx export MODEL.ckpt` first, or pass --model DIR")
        names = ", ".join(p.name for p in found)
        raise ModelFolderError(f"several models installed in {models_dir()} ({names}): choose one with --model NAME")
    path = Path(model).expanduser()
    if not path.exists() and not path.is_absolute() and (models_dir() / str(model)).exists():
        path = models_dir() / str(model)
    if not path.is_dir():
        raise ModelFolderError(f"model folder not found: {model}")
    return path


def check_folder(path: Path) -> dict:
    """The folder's sd_onnx.json (or a minimal description of a foreign diffusers/optimum folder), if complete."""
    missing = [r for r in REQUIRED if not (path / r).is_file()]
    if missing:
        raise ModelFolderError(f"{path} is not a complete model folder: '{missing[0]}' is missing")
    meta_path = path / METADATA
    if meta_path.is_file():
        try:
            return json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelFolderError(f"{meta_path}: unreadable ({e})") from None
    # A folder written by optimum or diffusers: take what we need from the scheduler config.
    sched = json.loads((path / "scheduler/scheduler_config.json").read_text())
    return {"family": "unknown", "prediction_type": sched.get("prediction_type", "epsilon"),
            "scaling_factor": 0.18215, "default_size": 512, "source": {}}
