"""`sd-onnx quantize`: build a precision variant of an fp32 model folder, measure it, and write it atomically."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sd_onnx import __version__, components
from sd_onnx.errors import UsageError
from sd_onnx.home import METADATA, check_folder, find_model, folder_bytes
from sd_onnx.quantize.graphs import copy_file
from sd_onnx.runtime.variants import base_folder, base_identity, has_bf16, precision_of, variant_path
from sd_onnx.staging import check_free_space, check_output, clean_stale_staging, dump_json, staged_folder

COMPONENTS = components.NAMES
# What each precision converts unless --components says otherwise. int8 touches only the UNet: it is 86% of the
# weights and all of the sampling time, while an int8 VAE decoder shows up directly as pixel noise.
DEFAULT_COMPONENTS = {"int8": ("unet",), "bf16": COMPONENTS, "fp16": COMPONENTS}
MODEL_FILES = ("model.onnx", "model.onnx_data", "model.onnx.data")


@dataclass
class QuantizeOptions:
    precision: str
    components: tuple[str, ...] | None = None
    prompts_file: Path | None = None
    calibration_prompts: int = 2
    calibration_steps: int | None = None  # default: the model's recipe (8 with CFG, 4 for an LCM UNet)
    calibration_size: int | None = None  # default: half the model's native size (activation ranges barely move)
    fidelity_prompts: int = 2
    fidelity_steps: int | None = None  # default: the model's recipe (10 with CFG, 4 for an LCM UNet)
    fidelity_size: int | None = None
    force: bool = False
    any_cpu: bool = False  # build a bf16 variant on a CPU that cannot run it fast (for another machine)
    threads: int | None = None
    sampler: str | None = None  # calibrate and compare with this sampler (default: the model's recipe, LCM for LCM)


@dataclass
class QuantizeResult:
    folder: Path
    precision: str
    components: tuple[str, ...]
    fidelity: dict
    seconds: float


def quantize_model(model: str | Path | None, options: QuantizeOptions, output: Path | None = None,
                   log: Callable[[str], None] = lambda msg: None) -> QuantizeResult:
    from sd_onnx.quantize.calibration import read_prompts, recipe_for, record
    from sd_onnx.quantize.fidelity import compare
    from sd_onnx.runtime.providers import cpu_info

    start = time.perf_counter()
    precision = options.precision
    if precision not in DEFAULT_COMPONENTS:
        raise UsageError(f"unknown precision '{precision}'; choose --int8, --bf16 or --fp16")
    base = find_model(model)
    meta = check_folder(base)
    if precision_of(meta) != "fp32":
        raise UsageError(f"{base} is already a {precision_of(meta)} variant; quantize its fp32 original "
                         f"({base_folder(base, meta)}) instead")
    _check_settings(options)
    recipe = recipe_for(base, options.sampler)  # an LCM model is calibrated and compared on its own few-step path
    calib_steps = options.calibration_steps or recipe.calibration_steps
    fid_steps = options.fidelity_steps or recipe.fidelity_steps
    components = _components(options.components, precision, meta, base, log)
    if precision == "bf16" and not options.any_cpu and not has_bf16(cpu_info()["flags"]):
        raise UsageError("this CPU has no AVX512-BF16 or AMX, so a bf16 variant would run slower than fp32 here; "
                         "make it on the machine that will run it, or pass --any-cpu to build it anyway")
    check_quantize_tools()
    output = Path(output) if output is not None else variant_path(base, precision)
    size = meta.get("default_size", 512)
    calib_size = options.calibration_size or max(64, size // 2 // 8 * 8)
    fid_size = options.fidelity_size or calib_size
    prompts = read_prompts(options.prompts_file, options.calibration_prompts)
    check_output(output, options.force, [base])
    clean_stale_staging(output.parent)  # a killed quantize's leftovers count against the free space below
    # the variant is at most a copy of the folder; typed working copies of a converted graph come on top
    need = folder_bytes(base) + max((folder_bytes(base / c) for c in components), default=0)
    check_free_space(output.parent, need)

    with staged_folder(output, options.force, need) as tmp:
        _copy_unchanged(base, tmp, components)
        recording = None
        if precision in ("int8", "fp16"):
            log(f"recording calibration inputs: {len(prompts)} prompt(s), {calib_steps} {recipe.sampler} steps, "
                f"{calib_size}px")
            recording = record(base, prompts, calib_steps, calib_size, device="cpu", threads=options.threads,
                               recipe=recipe)
        details = {}
        for component in components:
            t0 = time.perf_counter()
            log(f"{precision}: {component}")
            details[component] = _convert(precision, base / component / "model.onnx", tmp / component / "model.onnx",
                                          recording.for_component(component) if recording else [])
            details[component]["seconds"] = round(time.perf_counter() - t0, 1)
        new_meta = dict(meta)
        new_meta.update(precision=precision, variant_of={"folder": base.name, "precision": "fp32",
                                                         "base": base_identity(base, meta)})
        new_meta["components"] = {name: dict(info, precision=precision if name in components else info["precision"])
                                  for name, info in _listed_components(meta).items() if (tmp / info["file"]).is_file()}
        new_meta["quantization"] = {"sd_onnx": __version__, "components": details,
                                    "calibration": {"prompts": prompts, "steps": calib_steps,
                                                    "sampler": recipe.sampler, "cfg_scale": recipe.cfg_scale,
                                                    "guidance": recipe.guidance,
                                                    "size": calib_size} if recording else None}
        dump_json(tmp / METADATA, new_meta)
        log(f"measuring fidelity against fp32 ({options.fidelity_prompts} prompt(s), {fid_steps} {recipe.sampler} steps)")
        fidelity_prompts = read_prompts(None, options.fidelity_prompts) if options.prompts_file is None else prompts
        fidelity = compare(base, tmp, precision, fidelity_prompts[:options.fidelity_prompts], fid_steps,
                           fid_size, threads=options.threads, log=log, recipe=recipe)
        new_meta["fidelity"] = fidelity
        dump_json(tmp / METADATA, new_meta)
    return QuantizeResult(output, precision, components, fidelity, round(time.perf_counter() - start, 1))


def _check_settings(options: QuantizeOptions) -> None:
    for flag, value in (("--calibration-steps", options.calibration_steps), ("--fidelity-steps", options.fidelity_steps)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    for flag, value in (("--calibration-size", options.calibration_size), ("fidelity size", options.fidelity_size)):
        if value is not None and (value < 64 or value % 8):
            raise UsageError(f"{flag} must be a multiple of 8 and at least 64, got {value}")


def _components(requested: tuple[str, ...] | None, precision: str, meta: dict, base: Path,
                log: Callable[[str], None]) -> tuple[str, ...]:
    """The components to convert: those asked for, else the precision's default ones that the folder has (a
    folder without vae_encoder is complete for txt2img)."""
    present = tuple(c for c in COMPONENTS if (base / c / "model.onnx").is_file())
    if not requested:
        missing = [c for c in DEFAULT_COMPONENTS[precision] if c not in present]
        if missing:
            log(f"skipping {', '.join(missing)}: not in {base}")
        return tuple(c for c in DEFAULT_COMPONENTS[precision] if c in present)
    available = tuple(meta.get("components", {})) or COMPONENTS
    unknown = [c for c in requested if c not in available and c not in COMPONENTS]
    if unknown:
        raise UsageError(f"unknown component '{unknown[0]}'; valid: {', '.join(available)}")
    absent = [c for c in requested if c not in present]
    if absent:
        raise UsageError(f"{base} has no {absent[0]} (no {absent[0]}/model.onnx): leave it out of --components")
    return tuple(dict.fromkeys(requested))


def _listed_components(meta: dict) -> dict:
    """sd_onnx.json's components, or the standard ones for a folder that optimum or diffusers wrote."""
    return meta.get("components") or {c: {"file": f"{c}/model.onnx", "precision": "fp32"} for c in COMPONENTS}


# What the quantize extra adds (sympy: ONNX Runtime's symbolic shape inference), and ONNX Runtime's quantizer.
QUANTIZE_MODULES = ("onnx", "sympy", "onnxruntime.quantization")


def check_quantize_tools() -> None:
    """Fail before any work when the quantize extra is missing (sympy was otherwise first needed minutes in)."""
    import importlib

    for module in QUANTIZE_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UsageError(f"quantize needs the quantize extra ({e.name or module} is missing): "
                             "pip install 'sd-onnx[quantize]'") from None


def _copy_unchanged(base: Path, tmp: Path, components: tuple[str, ...]) -> None:
    """Copy every file of the fp32 folder except the model files of the converted components, so the variant is
    a complete folder of its own (diffusers/optimum can load it too)."""
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if path.is_dir() or rel.name == METADATA and len(rel.parts) == 1:
            continue
        if len(rel.parts) == 2 and rel.parts[0] in components and rel.name in MODEL_FILES:
            continue
        copy_file(path, tmp / rel)


def _convert(precision: str, src: Path, dst: Path, feeds: list[dict]) -> dict:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if precision == "int8":
        from sd_onnx.quantize.int8 import quantize_int8

        return quantize_int8(src, dst, feeds)
    if precision == "fp16":
        from sd_onnx.quantize.halfs import convert_fp16

        return convert_fp16(src, dst, feeds)
    from sd_onnx.quantize.halfs import convert_bf16_weights

    return convert_bf16_weights(src, dst)

