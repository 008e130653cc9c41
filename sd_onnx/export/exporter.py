"""`sd-onnx export`: checkpoint -> complete model folder, written to a temporary sibling and renamed into place."""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sd_onnx import __version__, components
from sd_onnx.home import METADATA, folder_bytes, models_dir
from sd_onnx.staging import (check_free_space, check_output, check_writable, clean_stale_staging, dump_json,
                              staged_folder)

COMPONENT_ORDER = components.NAMES
PATCHABLE = ("text_encoder", "unet")  # components LoRA and textual inversion patch at run time (weights.json)


@dataclass
class ExportResult:
    folder: Path
    family: str
    prediction_type: str
    seconds: float
    component_seconds: dict[str, float] = field(default_factory=dict)


def default_output(source: Path) -> Path:
    return models_dir() / (source.stem if source.is_file() else source.name)


def export_model(
    source: Path,
    output: Path | None = None,
    family: str = "auto",
    config: Path | None = None,
    opset: int | None = None,
    force: bool = False,
    optimize: bool = True,
    log: Callable[[str], None] = lambda msg: None,
    merge_lora: list[str] | None = None,
) -> ExportResult:
    """`merge_lora`: `FILE:WEIGHT` items (export --merge-lora), folded into the UNet and text encoder before export."""
    from sd_onnx.export.checkpoint import file_hashes, load_checkpoint
    from sd_onnx.export.convert import build_from_diffusers, build_reference_model
    from sd_onnx.export.onnx_export import COMPONENTS, check_opset, export_component
    from sd_onnx.export.weight_map import ldm_fingerprints, module_fingerprints, write_weight_map

    start = time.perf_counter()
    source = Path(source)
    output = Path(output) if output is not None else default_output(source)
    opset = check_opset(opset)
    # checked again when staging; this spares loading the checkpoint
    check_output(output, force, [source] + ([Path(config)] if config is not None else []))
    check_writable(output.parent)
    clean_stale_staging(output.parent)  # a killed export's leftovers count against the free space below
    merges = []
    if merge_lora:
        from sd_onnx.export.merge import read_merge_loras

        merges = read_merge_loras(merge_lora)  # before the checkpoint: a bad LoRA fails in a second

    if source.is_dir():
        model = build_from_diffusers(source, family)
        hashes: dict = {}
        ldm_names: dict = {}
        need = folder_bytes(source)
    else:
        log(f"reading {source}")
        ckpt = load_checkpoint(source)
        need = export_bytes(ckpt.state_dict)
        check_free_space(output.parent, need)  # before the minutes of conversion
        _warn_non_finite(ckpt.state_dict, source)
        model = build_reference_model(ckpt, family, config)
        hashes = file_hashes(source)
        ldm_names = ldm_fingerprints(ckpt.state_dict)  # LoRAs name layers by LDM key too (weights.json)
        del ckpt
        gc.collect()
    log(f"family {model.family.name} ({model.family_reason}); config: {model.config_source}")
    merged: list[dict] = []
    if merges:
        from sd_onnx.export.merge import merge_loras

        merged = merge_loras({"unet": model.unet, "text_encoder": model.text_encoder}, merges, ldm_names, source.name)
        for record in merged:
            log(f"merged LoRA {record['name']} at {record['weight']:g} ("
                + ", ".join(f"{n} {c} layers" for c, n in record["layers"].items()) + ")")

    with staged_folder(output, force, need) as tmp:
        seconds = {}
        fused: dict[str, int] = {}
        unet_config = dict(model.unet.config)
        modules = {"text_encoder": model.text_encoder, "unet": model.unet, "vae_encoder": model.vae,
                   "vae_decoder": model.vae}
        for spec in COMPONENTS:
            t0 = time.perf_counter()
            log(f"exporting {spec.name}")
            if spec.name == "unet":  # an LCM UNet takes its guidance embedding as a fourth input
                from sd_onnx.export.fewstep import unet_spec

                spec = unet_spec(spec, modules["unet"])
            patchable = (module_fingerprints(modules[spec.name]) if spec.name in PATCHABLE else None)
            export_component(spec, modules[spec.name], tmp / spec.name, opset)
            seconds[spec.name] = round(time.perf_counter() - t0, 2)
            if spec.name == "unet":
                model.unet = modules["unet"] = None  # release 3.4 GB before the VAE export
                gc.collect()
                if optimize:
                    from sd_onnx.export.optimize import optimize_unet

                    log("fusing attention and LayerNorm in the UNet graph")
                    fused = optimize_unet(tmp / "unet" / "model.onnx")
            if patchable is not None:  # after the fusion: the map names the initializers of the final graph
                write_weight_map(tmp / spec.name / "model.onnx", patchable, ldm_names)
        _write_configs(tmp, model, unet_config)
        _write_metadata(tmp, model, source, hashes, opset, fused, int(unet_config["in_channels"]), merged)
    _report_stale_variants(output, log)
    return ExportResult(output, model.family.name, model.prediction_type, round(time.perf_counter() - start, 2), seconds)


# The bytes an export writes per weight byte of the checkpoint, at its peak: every weight once in fp32, the UNet's
# (about 80% of them) a second time while the attention fusion rewrites its data file.
PEAK_COPIES = 2.0
LDM_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


def export_bytes(state_dict: dict) -> int:
    """What an export of these weights writes at its peak (fp32 weights, the UNet's twice), from their count."""
    total = sum(t.numel() * 4 for k, t in state_dict.items() if k.startswith(LDM_PREFIXES) and t.is_floating_point())
    return int(total * PEAK_COPIES)


def _report_stale_variants(output: Path, log: Callable[[str], None]) -> None:
    """Variants of the folder's previous contents stay beside it: say which, and that generate now ignores them."""
    from sd_onnx.home import check_folder
    from sd_onnx.runtime.variants import PRECISIONS, is_variant, stale_reason, variant_path

    stale = [variant_path(output, p) for p in PRECISIONS[1:] if is_variant(variant_path(output, p), p)]
    stale = [path for path in stale if stale_reason(path, check_folder(path))]
    if stale:
        names = ", ".join(path.name for path in stale)
        log(f"left stale: {names} (made from the previous {output.name}; generate ignores them: remake them with "
            f"`sd-onnx quantize {output} --<precision> --force`)")


def _warn_non_finite(state_dict: dict, source: Path) -> None:
    """A checkpoint with NaN or infinite weights exports, but every image from it would be NaN: say so now (the
    runtime stops such a run with one line, as A1111's NaN check does)."""
    import torch

    bad = [k for k, t in state_dict.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        print(f"sd-onnx: warning: {source.name}: {len(bad)} tensor(s) hold NaN or infinite values (first: {bad[0]}); "
              "images made with this model will fail", file=sys.stderr)


def _write_configs(folder: Path, model, unet_config: dict) -> None:
    import diffusers

    from sd_onnx.runtime.tokenizer import write_tokenizer_folder

    write_tokenizer_folder(folder / "tokenizer", pad_token=model.family.pad_token)
    (folder / "scheduler").mkdir(exist_ok=True)
    sched = dict(model.scheduler_config, _diffusers_version=diffusers.__version__)
    dump_json(folder / "scheduler" / "scheduler_config.json", sched)
    dump_json(folder / "text_encoder" / "config.json", model.text_encoder.config.to_dict())
    for name in ("vae_encoder", "vae_decoder"):
        dump_json(folder / name / "config.json", dict(model.vae.config))
    dump_json(folder / "unet" / "config.json", unet_config)
    onnx_model = ["diffusers", "OnnxRuntimeModel"]
    dump_json(folder / "model_index.json", {
        "_class_name": "OnnxStableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": onnx_model,
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": onnx_model,
        "vae_decoder": onnx_model,
        "vae_encoder": onnx_model,
    })


def _write_metadata(folder: Path, model, source: Path, hashes: dict, opset: int, fused: dict[str, int],
                    unet_in_channels: int, merged_loras: list[dict] | None = None) -> None:
    import diffusers
    import onnx
    import torch
    import transformers

    extra = {"merged_loras": merged_loras} if merged_loras else {}  # export --merge-lora: name, sha256, hash, weight
    dump_json(folder / METADATA, {
        "format": 1,
        "family": model.family.name,
        "family_reason": model.family_reason,
        "prediction_type": model.prediction_type,
        "scaling_factor": model.scaling_factor,
        "default_size": model.default_size,
        # 9: an inpainting UNet, fed [latent, mask, masked-picture latent]; the runtime reads unet/config.json
        "unet_in_channels": unet_in_channels,
        "config_source": model.config_source,
        "source": {"name": source.name, **hashes},
        **extra,
        "components": {name: {"file": f"{name}/model.onnx", "precision": "fp32"} for name in COMPONENT_ORDER},
        "opset": opset,
        "graph_optimizations": {"unet": fused},
        "versions": {"sd_onnx": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "onnx": onnx.__version__},
    })
