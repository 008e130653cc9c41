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
    # chosen by --device auto as this CPU's fastest path (cpu_path), not named by the user: a session that OpenVINO
    # cannot open (LoRA/TI weight overrides) may go to ONNX Runtime instead
    chosen_by_auto: bool = False


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

    `precision` is the model folder's; without a GPU, auto runs it on the fastest CPU path measured for this
    CPU's instructions (cpu_path). `arithmetic`: "auto" lets an fp32 folder compute in bf16 where that is the
    fastest path; "fp32" (the default, and --precision fp32) never lowers it."""
    name = (name or "auto").lower()
    available = ort_providers() if available is None else available
    if name == "auto":
        gpu = [c for c in AUTO_ORDER[:-1] if ORT_DEVICES[c][0] in available]
        if not gpu:
            fast = cpu_path(precision, arithmetic, cpu_info()["flags"] if cpu_flags is None else cpu_flags,
                            openvino_devices() if ov_devices is None else ov_devices)
            if fast is not None:
                return fast
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



BF16_FLAGS = ("AMX-BF16", "AVX512-BF16")
VNNI_FLAGS = ("AMX-INT8", "AVX512-VNNI", "AVX-VNNI")
# UNet step at 512x512 with CFG on a 2-core Zen 5 (AVX512-BF16, AVX512-VNNI, no AMX): docs/benchmarks.md "#22".
MEASURED = {
    "fp32": "UNet step 2.35 s against 4.3 s with ONNX Runtime fp32 on a 2-core Zen 5",
    "int8": "UNet step 1.86 s against 2.42 s with ONNX Runtime on a 2-core Zen 5",
    "int8-bf16": "UNet step 1.47 s against 1.72 s with fp32 float ops and 2.42 s with ONNX Runtime on a 2-core Zen 5",
}


def cpu_path(precision: str, arithmetic: str, cpu_flags: list[str], ov_devices: list[str]) -> Device | None:
    """What --device auto runs a folder of `precision` on when no GPU is there, where that is not ONNX Runtime's CPU
    provider: the fastest path measured for this CPU's instructions. None: ONNX Runtime.
    - a bf16 variant: OpenVINO, the runtime that computes in bf16 (ONNX Runtime widens the weights back to fp32);
    - an int8 variant on a CPU with VNNI (AVX512-VNNI, AVX-VNNI or AMX-INT8): OpenVINO's u8s8 kernels, and with
      BF16 too and `arithmetic="auto"`, its float ops in bf16;
    - an fp32 folder on a CPU with AVX512-BF16 or AMX-BF16, `arithmetic="auto"`: OpenVINO with its bf16
      inference-precision hint (fp32 weights, bf16 arithmetic: a bf16 variant's arithmetic without a quantize step).
    CPUs without BF16 keep fp32 arithmetic (bf16 would be emulated there, slower than fp32)."""
    if "CPU" not in ov_devices:
        return None
    bf16 = [flag for flag in BF16_FLAGS if flag in cpu_flags]
    vnni = [flag for flag in VNNI_FLAGS if flag in cpu_flags]
    if precision == "bf16":
        return Device("openvino", "openvino", openvino_device="CPU", chosen_by_auto=True,
                      reason="bf16 variant: OpenVINO computes in bf16 on the CPU")
    if precision == "int8" and vnni:
        if bf16 and arithmetic == "auto":  # its float ops (attention products, norms, the fp32 convolutions) in bf16
            return Device("openvino", "openvino", openvino_device="CPU", inference_precision="bf16",
                          chosen_by_auto=True,
                          reason=f"int8 variant, its float ops in bf16 (OpenVINO, this CPU has {vnni[0]} and "
                                 f"{bf16[0]}; measured {MEASURED['int8-bf16']}); --precision int8 keeps them fp32")
        return Device("openvino", "openvino", openvino_device="CPU", chosen_by_auto=True,
                      reason=f"int8 variant: OpenVINO's int8 kernels (this CPU has {vnni[0]}; measured "
                             f"{MEASURED['int8']})")
    if precision == "fp32" and bf16 and arithmetic == "auto":
        return Device("openvino", "openvino", openvino_device="CPU", inference_precision="bf16",
                      chosen_by_auto=True,
                      reason=f"fp32 weights, bf16 arithmetic (OpenVINO, this CPU has {bf16[0]}; measured "
                             f"{MEASURED['fp32']}); --precision fp32 keeps fp32 arithmetic")
    return None


def cpu_arithmetic(cpu_flags: list[str], ov_devices: list[str]) -> Device | None:
    """The device --device auto --precision auto gives an fp32 folder on this CPU when it is not ONNX Runtime's."""
    return cpu_path("fp32", "auto", cpu_flags, ov_devices)


def auto_gpu(available: list[str] | None = None) -> str | None:
    """The GPU device `--device auto` picks from the installed ONNX Runtime providers, or None (then the CPU)."""
    available = ort_providers() if available is None else available
    return next((c for c in AUTO_ORDER[:-1] if ORT_DEVICES[c][0] in available), None)


# A VRAM ceiling for ONNX Runtime's GPU arena (the 2 GB laptop card): bytes, or a number with K/M/G (powers of 1024).
GPU_MEM_LIMIT_ENV = "SD_ONNX_GPU_MEM_LIMIT"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def gpu_mem_limit() -> int | None:
    """SD_ONNX_GPU_MEM_LIMIT in bytes ("2G", "1536M", "2147483648"), None when unset; a bad value is a UsageError."""
    raw = os.environ.get(GPU_MEM_LIMIT_ENV, "").strip()
    if not raw:
        return None
    text = raw.upper().removesuffix("IB").removesuffix("B")
    unit = text[-1] if text and text[-1] in _UNITS else ""
    number = text[:-1] if unit else text
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = 0
    if value < 1 << 20:
        raise UsageError(f"{GPU_MEM_LIMIT_ENV}={raw!r} is not a memory size of at least 1M (examples: 2G, 1536M)")
    return int(value)


def provider_options(device: Device, low_memory: bool = False) -> list:
    """What onnxruntime.InferenceSession gets as `providers`: each provider of the device with the options that suit
    it. CUDA: the fastest cuDNN convolution found by trying them all once per shape (EXHAUSTIVE; HEURISTIC with
    --low-memory, as the search itself takes workspace), an arena that grows by what is asked instead of doubling
    (kSameAsRequested: doubling can reserve up to twice what is used), copies on the compute stream. ROCm: the
    MIOpen equivalents; MIGraphX the arena policy. DirectML takes none of these (sessions.py sets the session
    options it needs). The VRAM ceiling (SD_ONNX_GPU_MEM_LIMIT) goes to the providers that take one."""
    limit = gpu_mem_limit()
    options = []
    for provider in device.providers:
        opts: dict[str, str] = {}
        if provider == "CUDAExecutionProvider":
            opts = {"cudnn_conv_algo_search": "HEURISTIC" if low_memory else "EXHAUSTIVE",
                    "cudnn_conv_use_max_workspace": "0" if low_memory else "1",
                    "arena_extend_strategy": "kSameAsRequested", "do_copy_in_default_stream": "1"}
        elif provider == "ROCMExecutionProvider":
            opts = {"miopen_conv_exhaustive_search": "0" if low_memory else "1",
                    "arena_extend_strategy": "kSameAsRequested", "do_copy_in_default_stream": "1"}
        elif provider == "MIGraphXExecutionProvider":  # MIGraphX compiles and tunes the graph itself
            opts = {"migraphx_arena_extend_strategy": "kSameAsRequested"}
        if limit is not None and provider in ("CUDAExecutionProvider", "ROCMExecutionProvider"):
            opts["gpu_mem_limit"] = str(limit)
        elif limit is not None and provider == "MIGraphXExecutionProvider":
            opts["migraphx_mem_limit"] = str(limit)
        options.append((provider, opts) if opts else provider)
    return options
