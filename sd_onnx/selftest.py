"""`sd-onnx selftest`: what works on this machine, proven end to end on a tiny random checkpoint, and how fast."""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from sd_onnx.errors import SdOnnxError, UsageError
from sd_onnx.runtime.providers import ORT_DEVICES, cpu_info, openvino_devices, ort_providers, resolve_device


def candidate_devices() -> list[str]:
    """Every --device value this machine's installed runtimes offer."""
    available = ort_providers()
    names = [name for name, (provider, _) in ORT_DEVICES.items() if provider in available]
    names += ["openvino" if d == "CPU" else f"openvino:{d}" for d in openvino_devices()]
    return names


def run_selftest(log: Callable[[str], None] = print, workdir: Path | None = None) -> bool:
    cpu = cpu_info()
    log(f"CPU: {cpu['model']} ({cpu['usable_cores']} usable cores); instruction sets: {', '.join(cpu['flags']) or 'none of SSE4.2/AVX'}")
    log(f"ONNX Runtime providers: {', '.join(ort_providers()) or 'onnxruntime not installed'}")
    log(f"OpenVINO devices: {', '.join(openvino_devices()) or 'openvino not installed'}")
    auto = resolve_device("auto")
    log(f"--device auto -> {auto.name} ({auto.reason})")
    with tempfile.TemporaryDirectory(prefix="sd-onnx-selftest-") as tmp:
        root = Path(workdir or tmp)
        folder = _tiny_model(root, log)
        if folder is None:
            return False
        ok = _generate_everywhere(folder, root, log)
        _try_int8(folder, root, log)
        log("self-test passed: export and generate work on this machine" if ok
            else "self-test FAILED on the CPU provider")
        log("next: sd-onnx export your-model.ckpt && sd-onnx generate \"a prompt\"")
        return ok


def _tiny_model(root: Path, log: Callable[[str], None]) -> Path | None:
    try:
        from sd_onnx.export.exporter import export_model
        from sd_onnx.export.synthetic import write_checkpoint
    except ImportError as e:
        log(f"export: unavailable ({e.name} missing; pip install 'sd-onnx[export]'); cannot build the test model")
        return None
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt = write_checkpoint(root / "tiny-sd1.ckpt", "sd1", seed=0)
        result = export_model(ckpt, root / "tiny-sd1")
    log(f"export: OK, tiny SD 1.x checkpoint (random weights, LDM layout) -> ONNX in {time.perf_counter() - t0:.1f} s")
    return result.folder


def _generate_everywhere(folder: Path, root: Path, log: Callable[[str], None]) -> bool:
    from sd_onnx.runtime.images import save_png
    from sd_onnx.runtime.pipeline import GenerateRequest, generate

    request = GenerateRequest("a black house cat typing on a computer", steps=8, sampler="Euler a", seed=42,
                              width=64, height=64)
    reference = None
    ok = False
    log(f"{'device':<16}{'result':<8}{'time':>9}  max diff vs cpu (of 255)")
    for name in candidate_devices():
        t0 = time.perf_counter()
        try:
            image = generate(folder, request, device=name).images[0]
        except SdOnnxError as e:
            log(f"{name:<16}{'FAIL':<8}{'':>9}  {e}")
            continue
        seconds = time.perf_counter() - t0
        pixels = np.asarray(image.image).astype(int)
        if reference is None:
            reference = pixels
            save_png(image.image, root, 0, image.seed, image.parameters)
        diff = int(np.abs(pixels - reference).max())
        log(f"{name:<16}{'OK':<8}{seconds:>8.2f}s  {diff}")
        ok = ok or name == "cpu"
    return ok


def _try_int8(folder: Path, root: Path, log: Callable[[str], None]) -> None:
    """Whether int8 quantization and its integer kernels work here (an optional extra; never fails the test)."""
    from sd_onnx.quantize.variant import QuantizeOptions, check_quantize_tools, quantize_model

    try:
        check_quantize_tools()
    except UsageError as e:
        log(f"quantize --int8: unavailable ({e})")
        return
    try:
        t0 = time.perf_counter()
        options = QuantizeOptions("int8", calibration_prompts=1, calibration_steps=3, calibration_size=64,
                                  fidelity_prompts=1, fidelity_steps=3, fidelity_size=64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fid = quantize_model(folder, options, root / "tiny-sd1-int8").fidelity
        log(f"quantize --int8: OK in {time.perf_counter() - t0:.1f} s; tiny UNet {fid['size_mb']['unet']['fp32']} -> "
            f"{fid['size_mb']['unet']['int8']} MB, image SSIM vs fp32 {fid['ssim_min']} (random weights)")
    except SdOnnxError as e:
        log(f"quantize --int8: FAIL ({e})")
