"""Precision variants of a model folder (written by `sd-onnx quantize` beside it): which one a run uses."""

from __future__ import annotations

from pathlib import Path

from sd_onnx.errors import ModelFolderError, UsageError
from sd_onnx.home import check_folder

PRECISIONS = ("fp32", "int8", "bf16", "fp16")
GPU_DEVICES = ("cuda", "rocm", "migraphx", "dml", "openvino:gpu")
BF16_FLAGS = ("AVX512-BF16", "AMX-BF16")


def precision_of(meta: dict) -> str:
    return meta.get("precision", "fp32")


def variant_path(base: Path, precision: str) -> Path:
    """Where `sd-onnx quantize` puts a variant by default: a sibling named <base>-<precision>."""
    return base.with_name(f"{base.name}-{precision}")


def base_folder(folder: Path, meta: dict) -> Path:
    name = meta.get("variant_of", {}).get("folder")
    return folder.with_name(name) if name else folder


def has_bf16(cpu_flags: list[str]) -> bool:
    return any(flag in cpu_flags for flag in BF16_FLAGS)


def auto_preference(device: str, cpu_flags: list[str]) -> tuple[str, ...]:
    """Variants worth using on this hardware, best first (fp32 is the fallback and is not listed)."""
    if device.lower() in GPU_DEVICES:
        return ("fp16",)
    if device.lower() in ("auto", "cpu", "openvino", "openvino:cpu"):
        return ("bf16", "int8") if has_bf16(cpu_flags) else ("int8",)
    return ()


def choose_variant(folder: Path, precision: str, device: str, cpu_flags: list[str]) -> tuple[Path, str]:
    """The folder to run for --precision (auto or one of PRECISIONS), and a line saying why."""
    if precision != "auto" and precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'; valid: auto, {', '.join(PRECISIONS)}")
    meta = check_folder(folder)
    own = precision_of(meta)
    if precision == own:
        return folder, f"{own} (requested)"
    if precision == "auto":
        if own != "fp32":
            return folder, f"{own} (the folder given is the {own} variant)"
        for candidate in auto_preference(device, cpu_flags):
            path = variant_path(folder, candidate)
            if is_variant(path, candidate):
                return path, f"{candidate} (variant found beside the model; --precision fp32 for the original)"
        return folder, "fp32"
    base = base_folder(folder, meta)
    path = base if precision == "fp32" else variant_path(base, precision)
    if is_variant(path, precision):
        return path, f"{precision} (requested)"
    hint = (f"the original of this variant is not at {path}" if precision == "fp32"
            else f"make it with `sd-onnx quantize {base} --{precision}`")
    raise ModelFolderError(f"no {precision} variant of {base.name} at {path}: {hint}")


def is_variant(path: Path, precision: str) -> bool:
    if not path.is_dir():
        return False
    try:
        return precision_of(check_folder(path)) == precision
    except ModelFolderError:
        return False
