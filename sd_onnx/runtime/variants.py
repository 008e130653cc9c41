"""Precision variants of a model folder (written by `sd-onnx quantize` beside it): which one a run uses."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Callable

from sd_onnx.errors import ModelFolderError, UsageError
from sd_onnx.home import METADATA, check_folder, read_metadata
from sd_onnx.runtime.providers import BF16_FLAGS, VNNI_FLAGS, auto_gpu, openvino_devices

PRECISIONS = ("fp32", "int8", "bf16", "fp16")
GPU_DEVICES = ("cuda", "rocm", "migraphx", "dml", "openvino:gpu")


def precision_of(meta: dict) -> str:
    return meta.get("precision", "fp32")


def variant_path(base: Path, precision: str) -> Path:
    """Where `sd-onnx quantize` puts a variant by default: a sibling named <base>-<precision>."""
    return base.with_name(f"{base.name}-{precision}")


def base_folder(folder: Path, meta: dict) -> Path:
    name = meta.get("variant_of", {}).get("folder")
    return folder.with_name(name) if isinstance(name, str) and name else folder


def base_identity(folder: Path, meta: dict) -> str:
    """What a variant records of the fp32 folder it was made from: the source checkpoint's sha256 (and those of the
    LoRAs merged into it, with their weights), or, for a folder
    exported from a diffusers folder (no hash), a stamp of its files' names, sizes and modification times."""
    sha = meta.get("source", {}).get("sha256")
    if isinstance(sha, str) and sha:
        # LoRAs merged at export make another model from the same checkpoint: a variant of the plain export (or of
        # another merge) must read as stale
        merged = meta.get("merged_loras") or []
        return f"sha256:{sha}" + "".join(f"+lora:{m.get('sha256', '')[:16]}@{m.get('weight')}" for m in merged
                                         if isinstance(m, dict))
    stamp = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != METADATA):
        stat = path.stat()
        stamp.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return f"files:{stamp.hexdigest()[:32]}"


def stale_reason(variant: Path, meta: dict) -> str | None:
    """Why a variant no longer matches the fp32 folder beside it (re-exported from another checkpoint since), or
    None when it matches or its original is gone (a standalone variant is a complete folder of its own)."""
    base = base_folder(variant, meta)
    if base == variant or not (base / "model_index.json").is_file():
        return None
    recorded = meta.get("variant_of", {}).get("base")
    base_meta = read_metadata(base)
    if recorded is None:  # made before variants recorded their base: only a base written after it is suspect
        try:
            newer = (base / METADATA).stat().st_mtime > (variant / METADATA).stat().st_mtime
        except OSError:
            return None
        return f"{base.name} was exported again after {variant.name} was made" if newer else None
    if recorded != base_identity(base, base_meta):
        return f"{variant.name} was made from another export of {base.name} (re-exported since)"
    return None


def has_bf16(cpu_flags: list[str]) -> bool:
    return any(flag in cpu_flags for flag in BF16_FLAGS)


def auto_preference(device: str, cpu_flags: list[str], ov_devices: list[str] | None = None,
                    available: list[str] | None = None) -> tuple[str, ...]:
    """Variants worth using on this hardware, fastest first (fp32 is the fallback and is not listed). `--device auto`
    is the device it resolves to: a GPU when an ONNX Runtime GPU provider is installed (`available`: the provider
    list, read from ONNX Runtime when None). On a CPU, by the UNet steps measured (docs/benchmarks.md "#22"): an int8
    variant on OpenVINO where the CPU has VNNI beats the bf16 variant (1.93 against 2.32 s on a Zen 5 with both),
    ONNX Runtime computes a bf16 variant in fp32 (so `--device cpu` takes int8 only), and OpenVINO's bf16 needs BF16
    instructions."""
    device = device.lower()
    if device in GPU_DEVICES or device == "auto" and auto_gpu(available):
        return ("fp16",)
    if device == "cpu":
        return ("int8",)
    if device not in ("auto", "openvino", "openvino:cpu"):
        return ()
    if not has_bf16(cpu_flags):
        return ("int8",)
    openvino = "CPU" in (openvino_devices() if ov_devices is None else ov_devices)
    if openvino and any(flag in cpu_flags for flag in VNNI_FLAGS):
        return ("int8", "bf16")
    return ("bf16", "int8")


def _notice(message: str) -> None:
    print(message, file=sys.stderr)


def choose_variant(folder: Path, precision: str, device: str, cpu_flags: list[str],
                   notice: Callable[[str], None] = _notice) -> tuple[Path, str]:
    """The folder to run for --precision (auto or one of PRECISIONS), and a line saying why. A variant made from
    another export of its original is skipped by auto (with a notice) and refused when asked for."""
    if precision != "auto" and precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'; valid: auto, {', '.join(PRECISIONS)}")
    meta = check_folder(folder)
    own = precision_of(meta)
    if own != "fp32" and precision in (own, "auto"):  # a variant named by its folder is used as given
        stale = stale_reason(folder, meta)
        if stale:
            notice(f"note: {stale}; using it as given (remake it with `sd-onnx quantize "
                   f"{base_folder(folder, meta)} --{own} --force`)")
        return folder, f"{own} (requested)" if precision == own else f"{own} (the folder given is the {own} variant)"
    if precision == own:
        return folder, f"{own} (requested)"
    if precision == "auto":
        for candidate in auto_preference(device, cpu_flags):
            path = variant_path(folder, candidate)
            if is_variant(path, candidate):
                stale = stale_reason(path, check_folder(path))
                if stale is None:
                    return path, f"{candidate} (variant found beside the model; --precision fp32 for the original)"
                notice(f"note: ignoring {path.name}: {stale} (remake it with `sd-onnx quantize {folder} "
                       f"--{candidate} --force`)")
        return folder, "fp32"
    base = base_folder(folder, meta)
    path = base if precision == "fp32" else variant_path(base, precision)
    if is_variant(path, precision):
        stale = stale_reason(path, check_folder(path)) if precision != "fp32" else None
        if stale:
            raise ModelFolderError(f"{path} is stale: {stale}; remake it with `sd-onnx quantize {base} "
                                   f"--{precision} --force`")
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
