"""The one place that knows the hardware: CPU features, installed execution providers, and the --device choice."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from sd_onnx.errors import UsageError

# --device name -> (ONNX Runtime provider, pip package that brings it)
ORT_DEVICES = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "onnxruntime-gpu"),
    "rocm": ("ROCMExecutionProvider", "onnxruntime-rocm (AMD's build, see onnxruntime.ai ROCm install notes)"),
    "migraphx": ("MIGraphXExecutionProvider", "onnxruntime-migraphx (AMD's build)"),
    "dml": ("DmlExecutionProvider", "onnxruntime-directml (Windows)"),
}
OPENVINO_PACKAGE = "openvino"
# What --device auto tries, best first: GPUs, then the CPU.
AUTO_ORDER = ("cuda", "rocm", "migraphx", "dml", "cpu")
# Instruction sets that decide which kernels run. Read from CPUID through NumPy's own dispatcher (correct under
# emulators such as qemu-user, where /proc/cpuinfo shows the host); /proc/cpuinfo only for what NumPy lacks.
NUMPY_FEATURES = {"SSE42": "SSE4.2", "AVX": "AVX", "AVX2": "AVX2", "FMA3": "FMA", "AVX512F": "AVX-512",
                  "AVX512VNNI": "AVX512-VNNI", "AVX512BF16": "AVX512-BF16"}
PROC_FLAGS = {"avx_vnni": "AVX-VNNI", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}

@dataclass(frozen=True)
class Device:
    """Where sessions run: backend 'ort' with a provider list, or backend 'openvino' with an OpenVINO device."""

    name: str
    backend: str
    providers: tuple[str, ...] = ()
    openvino_device: str = "CPU"
    reason: str = ""
    # OpenVINO's INFERENCE_PRECISION_HINT for fp32 components: "" keeps each component's own precision (f32 for fp32
    # weights); "bf16" computes fp32 weights in bf16 (what --device auto picks on BF16 CPUs: cpu_arithmetic below).
    inference_precision: str = ""


def cpu_info() -> dict:
    """CPU model, cores and instruction sets (CPUID via NumPy; model name and AMX from /proc/cpuinfo on Linux)."""
    model, proc_flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    proc_flags = set(value.split())
                    break
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as cpuid
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as cpuid
    flags = [name for key, name in NUMPY_FEATURES.items() if cpuid.get(key)]
    flags += [name for flag, name in PROC_FLAGS.items() if flag in proc_flags and cpuid.get("AVX2")]
    return {
        "model": model,
        "logical_cores": os.cpu_count() or 1,
        "usable_cores": usable_cores(),
        "flags": flags,
    }

def usable_cores() -> int:
    """The cores this process may run on (the default thread count of every session)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def openvino_devices() -> list[str]:
    try:
        import openvino as ov
    except ImportError:
        return []
    try:
        return list(ov.Core().available_devices)
    except RuntimeError:
        return []


def resolve_device(name: str = "auto", available: list[str] | None = None,
                   ov_devices: list[str] | None = None, precision: str = "fp32",
                   arithmetic: str = "fp32", cpu_flags: list[str] | None = None) -> Device:
    """Turn a --device value into a Device, or a UsageError naming what to install.

    `precision` is the model folder's: a bf16 variant on a CPU goes to OpenVINO when it is installed, since that
    is the runtime that computes in bf16 (ONNX Runtime's CPU provider widens the weights back to fp32).
    `arithmetic`: "auto" lets an fp32 folder compute in bf16 where that is the fastest measured CPU path
    (cpu_arithmetic); "fp32" (the default, and --precision fp32) never lowers it."""
    name = (name or "auto").lower()
    available = ort_providers() if available is None else available
    if name == "auto":
        gpu = [c for c in AUTO_ORDER[:-1] if ORT_DEVICES[c][0] in available]
        if arithmetic == "auto" and precision == "fp32" and not gpu:
            fast = cpu_arithmetic(cpu_info()["flags"] if cpu_flags is None else cpu_flags,
                                  openvino_devices() if ov_devices is None else ov_devices)
            if fast is not None:
                return fast
        if precision == "bf16" and not gpu:
            ov = openvino_devices() if ov_devices is None else ov_devices
            if "CPU" in ov:
                return Device("openvino", "openvino", openvino_device="CPU",
                              reason="bf16 variant: OpenVINO computes in bf16 on the CPU")
        for candidate in AUTO_ORDER:
            provider, _ = ORT_DEVICES[candidate]
            if provider in available:
                providers = (provider,) if provider == "CPUExecutionProvider" else (provider, "CPUExecutionProvider")
                reason = f"best installed provider: {provider}"
                return Device(candidate, "ort", providers, reason=reason)
        ov = openvino_devices() if ov_devices is None else ov_devices
        if ov:
            return Device("openvino", "openvino", openvino_device="CPU", reason="onnxruntime is missing; OpenVINO CPU")
        raise UsageError("no runtime found: install onnxruntime (`pip install onnxruntime`) or openvino")
    if name.startswith("openvino"):
        ov = openvino_devices() if ov_devices is None else ov_devices
        target = name.split(":", 1)[1].upper() if ":" in name else "CPU"
        if not ov:
            raise UsageError(f"--device {name}: OpenVINO is not installed; install it with `pip install {OPENVINO_PACKAGE}`")
        if not any(d == target or d.startswith(target + ".") for d in ov):
            raise UsageError(f"--device {name}: OpenVINO has no {target} device here (it has: {', '.join(ov)})")
        return Device(name, "openvino", openvino_device=target, reason="requested")
    if name not in ORT_DEVICES:
        valid = ", ".join(["auto", *ORT_DEVICES, "openvino", "openvino:GPU"])
        raise UsageError(f"unknown device '{name}'; valid: {valid}")
    provider, package = ORT_DEVICES[name]
    if provider not in available:
        raise UsageError(f"--device {name}: ONNX Runtime's {provider} is not available here; install `{package}` "
                         f"(available: {', '.join(available) or 'none'})")
    providers = (provider,) if name == "cpu" else (provider, "CPUExecutionProvider")
    return Device(name, "ort", providers, reason="requested")



# UNet step at 512x512 with CFG, fp32 export, on a 2-core Zen 5 (AVX512-BF16, no AMX): docs/benchmarks.md "#22".
MEASURED_BF16 = "UNet step 2.35 s against 4.3 s with ONNX Runtime fp32 on a 2-core Zen 5"


def cpu_arithmetic(cpu_flags: list[str], ov_devices: list[str]) -> Device | None:
    """The fastest measured CPU path for an fp32 folder, when it is not ONNX Runtime fp32: on a CPU with
    AVX512-BF16 or AMX-BF16 and OpenVINO installed, OpenVINO with its bf16 inference-precision hint (fp32 weights,
    bf16 arithmetic: the same arithmetic as a bf16 variant, without a quantize step). None elsewhere: CPUs without
    BF16 keep fp32 (bf16 would be emulated there, slower than fp32)."""
    bf16 = [flag for flag in ("AMX-BF16", "AVX512-BF16") if flag in cpu_flags]
    if not bf16 or "CPU" not in ov_devices:
        return None
    return Device("openvino", "openvino", openvino_device="CPU", inference_precision="bf16",
                  reason=f"fp32 weights, bf16 arithmetic (OpenVINO, this CPU has {bf16[0]}; measured "
                         f"{MEASURED_BF16}); --precision fp32 keeps fp32 arithmetic")
