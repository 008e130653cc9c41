"""`sd-onnx info`: the machine, the installed runtimes, the models, and what --device auto would do and why."""

from __future__ import annotations

import os

from sd_onnx.errors import SdOnnxError
from sd_onnx.home import cache_dir, check_folder, folder_bytes, installed_models, models_dir, upscalers_dir
from sd_onnx.runtime.providers import ORT_DEVICES, OPENVINO_PACKAGE, cpu_info, openvino_devices, ort_providers, resolve_device
from sd_onnx.runtime.upscaler_models import installed_upscalers


def machine_report() -> dict:
    cpu = cpu_info()
    available = ort_providers()
    models, broken = _check_models(installed_models())
    report = {
        "cpu": cpu,
        "ram_gb": _ram_gb(),
        "onnxruntime": {"version": _version("onnxruntime"), "providers": available},
        "openvino": {"version": _version("openvino"), "devices": openvino_devices()},
        "models_dir": str(models_dir()),
        "models": [p.name for p in models],
        "variants": {p.name: _variants(p) for p in models},
        "broken_models": broken,
        "upscalers_dir": str(upscalers_dir()),
        "upscalers": installed_upscalers(),
        "cache_dir": str(cache_dir()),
        "cache_gb": folder_bytes(cache_dir()) / 1e9,
        "missing": {name: f"pip install {package}" for name, (provider, package) in ORT_DEVICES.items()
                    if provider not in available},
    }
    if not report["openvino"]["devices"]:
        report["missing"]["openvino"] = f"pip install {OPENVINO_PACKAGE}"
    try:
        auto = resolve_device("auto", available, arithmetic="auto")  # what generate/serve --precision auto do
        report["auto"] = {"device": auto.name, "providers": list(auto.providers), "reason": auto.reason}
    except SdOnnxError as e:
        report["auto"] = {"device": None, "reason": str(e)}
    report["auto_models"] = {p.name: _auto_choice(p, available, cpu["flags"]) for p in models}
    if "AVX" not in cpu["flags"]:
        report["note"] = "no AVX: ONNX Runtime and OpenVINO fall back to their SSE4.2 kernels (slower, still correct)"
    return report


def format_report(r: dict) -> str:
    cpu = r["cpu"]
    lines = [
        f"CPU:         {cpu['model']}, {cpu['usable_cores']} usable of {cpu['logical_cores']} logical cores, "
        f"{r['ram_gb']:.1f} GB RAM",
        f"Instructions: {', '.join(cpu['flags']) or 'none of SSE4.2 and later'}",
        f"onnxruntime: {r['onnxruntime']['version'] or 'not installed'} "
        f"({', '.join(r['onnxruntime']['providers']) or 'no providers'})",
        f"openvino:    {r['openvino']['version'] or 'not installed'} ({', '.join(r['openvino']['devices']) or 'no devices'})",
        f"models:      {', '.join(_with_variants(m, r['variants'].get(m, [])) for m in r['models']) or 'none'} "
        f"in {r['models_dir']}",
        f"upscalers:   {', '.join(r['upscalers']) or 'none'} in {r['upscalers_dir']} (and the built-in Lanczos, Nearest)",
        f"caches:      {r['cache_gb']:.2f} GB in {r['cache_dir']} (optimized graphs; safe to delete, "
        "SD_ONNX_NO_CACHE=1 keeps none)",
        f"--device auto: {r['auto']['device']} ({r['auto']['reason']})",
    ]
    for name, choice in r.get("auto_models", {}).items():
        lines.append(f"  {name}: {choice}")
    for name, reason in r.get("broken_models", {}).items():
        lines.append(f"broken:      {name}: {reason}")
    if r.get("note"):
        lines.append(f"note:        {r['note']}")
    for name, command in r["missing"].items():
        lines.append(f"to add {name + ':':<10} {command}")
    return "\n".join(lines)


def _check_models(folders: list) -> tuple[list, dict[str, str]]:
    """The folders that check_folder accepts, and why each other one is broken (one bad folder must not stop the
    report)."""
    good, broken = [], {}
    for folder in folders:
        try:
            check_folder(folder)
            good.append(folder)
        except SdOnnxError as e:
            broken[folder.name] = str(e)
    return good, broken


def _variants(model) -> list[str]:
    """Precision variants that `sd-onnx quantize` left beside a model (what `--precision` can choose)."""
    from sd_onnx.runtime.variants import PRECISIONS, is_variant, variant_path

    return [p for p in PRECISIONS[1:] if is_variant(variant_path(model, p), p)]


def _auto_choice(model, available: list[str], cpu_flags: list[str]) -> str:
    """What generate --device auto --precision auto runs for `model`: which folder, on which path, and why."""
    from sd_onnx.runtime.variants import choose_variant, precision_of

    try:
        folder, why = choose_variant(model, "auto", "auto", cpu_flags, notice=lambda message: None)
        device = resolve_device("auto", available, precision=precision_of(check_folder(folder)), arithmetic="auto",
                                cpu_flags=cpu_flags)
    except SdOnnxError as e:
        return f"cannot run here: {e}"
    return f"{why.split(' (')[0]} on {device.name} ({device.reason})"


def _with_variants(name: str, variants: list[str]) -> str:
    return f"{name} (+{', '.join(variants)})" if variants else name


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 0.0
