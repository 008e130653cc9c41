"""`sd-onnx export-upscaler`: an ESRGAN-family .pth/.safetensors read safely, its architecture detected by spandrel,
exported to ONNX with dynamic height and width, checked against torch, and written all-or-nothing under
$SD_ONNX_HOME/upscalers/NAME."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sd_onnx import __version__
from sd_onnx.errors import CheckpointError, SdOnnxError, UsageError
from sd_onnx.export.checkpoint import file_hashes, read_weights_file
from sd_onnx.export.onnx_export import DEFAULT_OPSET
from sd_onnx.home import upscalers_dir
from sd_onnx.runtime.upscaler_models import METADATA, MODEL, SizeRule
from sd_onnx.staging import dump_json, staged_folder

# spandrel architecture id -> the side multiple its graph needs when traced. SwinIR pads to its window inside
# forward() with Python arithmetic that the tracer freezes at the example size, so the runtime pads instead.
SUPPORTED: dict[str, Callable[[torch.nn.Module], int]] = {
    "ESRGAN": lambda model: 1,      # ESRGAN (old and new key layouts), BSRGAN, Real-ESRGAN 4x+/2x+/anime 6B
    "Compact": lambda model: 1,     # Real-ESRGAN compact (SRVGGNetCompact): realesr-general-x4v3, animevideo
    "SwinIR": lambda model: int(model.window_size),
}
# What the export check accepts: ONNX Runtime against torch on the same random input, max |diff| / max |torch|.
CHECK_TOLERANCE = 1e-4
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+()-]{0,99}$")


@dataclass
class UpscalerExport:
    folder: Path
    architecture: str
    scale: int
    seconds: float
    check_error: float


def import_spandrel():
    """spandrel, importable even where torchvision is absent or built for another torch: two architectures we do
    not export (LaMa, RestoreFormer) import torchvision at module level, and nothing else does."""
    try:
        import spandrel
        return spandrel
    except ImportError as e:
        if e.name == "spandrel":
            raise SdOnnxError("export-upscaler needs spandrel: pip install 'sd-onnx[export]'") from None
        if not (e.name or "").startswith("torchvision"):
            raise
    except RuntimeError:  # a torchvision wheel for a CUDA torch fails registering its operators
        pass
    hidden = "torchvision" in sys.modules and sys.modules["torchvision"] is None  # see sd_onnx.export
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith(("torchvision.", "spandrel"))]:
        del sys.modules[name]
    _stand_in_for_torchvision()
    try:
        import spandrel
    finally:  # spandrel's modules keep what they imported; nobody else should find the stand-in
        for name in ("torchvision.transforms.functional", "torchvision.transforms", "torchvision"):
            sys.modules.pop(name, None)
        if hidden or importlib.util.find_spec("torchvision") is not None:
            sys.modules["torchvision"] = None
    return spandrel


def _stand_in_for_torchvision() -> None:
    def unavailable(*args, **kwargs):
        raise SdOnnxError("this architecture needs torchvision, which is not usable here")

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = type("InterpolationMode", (), {"NEAREST": "nearest", "BILINEAR": "bilinear"})
    functional.rotate = functional.normalize = unavailable
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    root = types.ModuleType("torchvision")
    root.transforms = transforms
    sys.modules.update({"torchvision": root, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The upscaler's weights, read without running anything from the file, unwrapped as spandrel unwraps them
    (params_ema, params, state_dict, model, ... and the module./netG. prefixes)."""
    import_spandrel()
    from spandrel.__helpers.canonicalize import canonicalize_state_dict  # spandrel's own unwrapping

    data = read_weights_file(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name}: holds a {type(data).__name__}, not a state dict")
    data = canonicalize_state_dict(data)
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path.name}: contains no tensors")
    return tensors


def describe(path: Path, state_dict: dict[str, torch.Tensor]):
    """spandrel's model descriptor, or one line naming what was found."""
    spandrel = import_spandrel()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            descriptor = spandrel.ModelLoader().load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError:
        raise CheckpointError(f"{path.name}: not an upscaler architecture spandrel knows ({_summary(state_dict)})") from None
    except (KeyError, RuntimeError, ValueError, IndexError, AssertionError, TypeError) as e:
        raise CheckpointError(f"{path.name}: looks like spandrel's architecture but does not load as one "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; "
                              f"{_summary(state_dict)})") from None
    arch = descriptor.architecture.id
    if arch not in SUPPORTED or descriptor.purpose not in ("SR", "Restoration"):
        raise CheckpointError(f"{path.name}: a {arch} model ({descriptor.purpose}); sd-onnx exports "
                              f"{', '.join(SUPPORTED)} upscalers")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise CheckpointError(f"{path.name}: a {arch} model with {descriptor.input_channels} input and "
                              f"{descriptor.output_channels} output channels; only RGB models are supported")
    return descriptor


def _summary(state_dict: dict[str, torch.Tensor]) -> str:
    keys = list(state_dict)
    shown = ", ".join(f"{k} {tuple(state_dict[k].shape)}" for k in keys[:3])
    return f"{len(keys)} tensors, first: {shown}"


def export_upscaler(source: Path, name: str | None = None, output: Path | None = None, force: bool = False,
                    opset: int = DEFAULT_OPSET, log: Callable[[str], None] = lambda m: None) -> UpscalerExport:
    start = time.perf_counter()
    source = Path(source)
    name = name or source.stem
    if not NAME_RE.match(name) or name in (".", ".."):
        raise UsageError(f"upscaler name {name!r}: use letters, digits, spaces and ._+()- (at most 100)")
    output = Path(output) if output else upscalers_dir() / name
    state_dict = read_state_dict(source)
    descriptor = describe(source, state_dict)
    arch = descriptor.architecture.id
    model = descriptor.model.eval().float()
    rule = SizeRule(math.lcm(SUPPORTED[arch](model), descriptor.size_requirements.multiple_of),
                    max(1, descriptor.size_requirements.minimum))
    log(f"{source.name}: {arch} {descriptor.scale}x ({', '.join(descriptor.tags)})")
    with staged_folder(output, force) as tmp:
        export_graph(model, tmp / MODEL, rule, opset)
        error = check_export(model, tmp / MODEL, rule, descriptor.scale)
        log(f"ONNX Runtime vs torch: max relative difference {error:.2e}")
        dump_json(tmp / METADATA, {
            "name": output.name, "architecture": arch, "scale": descriptor.scale, "tags": descriptor.tags,
            "purpose": descriptor.purpose, "multiple_of": rule.multiple_of, "minimum": rule.minimum,
            "input": "RGB in [0, 1], [1, 3, H, W]", "precision": "fp32", "check_max_relative_error": error,
            "source": {"file": source.name, **file_hashes(source)},
            "exporter": {"sd_onnx": __version__, "torch": torch.__version__,
                         "spandrel": import_spandrel().__version__, "opset": opset},
        })
    return UpscalerExport(output, arch, descriptor.scale, time.perf_counter() - start, error)


def _example_size(rule: SizeRule) -> tuple[int, int]:
    """An example input that needs no padding, is not square (a traced size equal to a model's own training size
    would freeze SwinIR's precomputed mask), and is small."""
    m = rule.multiple_of
    return rule.padded(5 * m if m > 1 else 24), rule.padded(7 * m if m > 1 else 40)


def export_graph(model: torch.nn.Module, target: Path, rule: SizeRule, opset: int = DEFAULT_OPSET) -> None:
    h, w = _example_size(rule)
    example = torch.rand(1, 3, h, w)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(target), input_names=["image"], output_names=["upscaled"],
                          dynamic_axes={"image": {2: "height", 3: "width"},
                                        "upscaled": {2: "out_height", 3: "out_width"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def check_export(model: torch.nn.Module, path: Path, rule: SizeRule, scale: int) -> float:
    """The exported graph against torch at the example size and at another one (a size frozen into the graph by
    tracing shows up here, not in the user's picture); raises if they differ beyond CHECK_TOLERANCE."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    eh, ew = _example_size(rule)
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for h, w in ((eh, ew), (rule.padded(eh + 3 * rule.multiple_of), rule.padded(ew - rule.multiple_of))):
        x = torch.rand(1, 3, h, w, generator=generator)
        with torch.inference_mode():
            expected = model(x).numpy()
        try:
            got = session.run(None, {"image": x.numpy()})[0]
        except Exception as e:  # noqa: BLE001 -- onnxruntime's own error types
            raise SdOnnxError(f"the exported graph does not run at {w}x{h} ({str(e).splitlines()[0][:200]})") from None
        if got.shape != expected.shape or expected.shape[2:] != (h * scale, w * scale):
            raise SdOnnxError(f"the exported graph gives {got.shape} at {w}x{h}, torch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12)))
    if worst > CHECK_TOLERANCE:
        raise SdOnnxError(f"the exported graph differs from torch by {worst:.2e} (relative), over {CHECK_TOLERANCE}")
    return worst
