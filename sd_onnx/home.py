"""Where model folders live ($SD_ONNX_HOME/models) and how a --model argument finds one."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from sd_onnx import components
from sd_onnx.errors import ModelFolderError

METADATA = "sd_onnx.json"
REQUIRED = ("model_index.json", *(f"{name}/model.onnx" for name in components.REQUIRED), "tokenizer/vocab.json",
            "scheduler/scheduler_config.json")


def home() -> Path:
    return Path(os.environ.get("SD_ONNX_HOME", Path.home() / ".sd-onnx")).expanduser()


def models_dir() -> Path:
    return home() / "models"


def upscalers_dir() -> Path:
    """ESRGAN-family upscalers exported by `sd-onnx export-upscaler`, one folder each (A1111 keeps them beside models)."""
    return home() / "upscalers"


def loras_dir() -> Path:
    """LoRA files named by `<lora:NAME:WEIGHT>` in prompts (A1111's models/Lora)."""
    return home() / "loras"


def embeddings_dir() -> Path:
    """Textual-inversion embeddings, used by typing their file name in a prompt (A1111's embeddings/)."""
    return home() / "embeddings"


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
    """Model folders under models_dir(); precision variants (made by `sd-onnx quantize`) go with their original,
    unless that original is gone. Hidden folders (an export or quantize being written, or killed) are not models."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir()
                  and (p / "model_index.json").is_file() and not _is_variant_with_base(p))


def _is_variant_with_base(path: Path) -> bool:
    base = read_metadata(path).get("variant_of")
    if not isinstance(base, dict):
        return False
    name = base.get("folder")
    return not isinstance(name, str) or name in ("", path.name) or (path.with_name(name) / "model_index.json").is_file()


def read_metadata(folder: Path) -> dict:
    """The folder's sd_onnx.json, or {} when it has none or it is unreadable (check_folder reports those)."""
    try:
        meta = json.loads((folder / METADATA).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


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
    sched = read_scheduler_config(path)
    meta_path = path / METADATA
    if meta_path.is_file():
        return _read_json(meta_path, METADATA_TYPES)
    # A folder written by optimum or diffusers: take what we need from the scheduler config (the latent scaling comes
    # from its VAE config, read by the runtime's LoadedModel: no family's default is assumed here).
    return {"family": "unknown", "prediction_type": sched.get("prediction_type", "epsilon"), "default_size": 512,
            "source": {}}


_NUMBER = (int, float)
# The keys the runtime reads, and the JSON types they must have when present.
METADATA_TYPES = {"family": str, "prediction_type": str, "scaling_factor": _NUMBER, "default_size": int,
                  "precision": str, "source": dict, "components": dict, "variant_of": dict}
SCHEDULER_TYPES = {"beta_start": _NUMBER, "beta_end": _NUMBER, "num_train_timesteps": int,
                   "prediction_type": str, "beta_schedule": str}
_TYPE_NAMES = {str: "a string", int: "an integer", _NUMBER: "a number", dict: "an object"}


def read_scheduler_config(folder: Path) -> dict:
    """scheduler/scheduler_config.json, checked as check_folder checks it (one ModelFolderError line if not)."""
    return _read_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_TYPES)


def _read_json(path: Path, types: dict) -> dict:
    """A JSON object file whose known keys have the types the runtime expects, else one ModelFolderError line."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: holds {type(data).__name__ if data is not None else 'null'}, "
                               "not a JSON object")
    for key, kind in types.items():
        if key not in data:
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ModelFolderError(f"{path}: '{key}' must be {_TYPE_NAMES[kind]}, got {json.dumps(value)[:60]}")
        if kind in (int, _NUMBER) and not (math.isfinite(value) and value > 0):
            raise ModelFolderError(f"{path}: '{key}' must be a positive number, got {json.dumps(value)[:60]}")
    return data
