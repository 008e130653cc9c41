#!/usr/bin/env bash
# Issue #20 on a GPU, one command: our fp32 and fp16 UNet step and 20-step 512x512 image on CUDA, against ONNX
# Runtime's plain export, ONNX Runtime's own SD fp16 optimization of the same export, and PyTorch fp16; full-size
# SD 1.5 architecture with random weights made on the spot. No downloads. Aimed at under 8 minutes on an H200
# (the preparation, about two thirds of it, is kept in the work folder: a second run only measures).
#
# Needs, beyond this repository (nothing is installed or fetched by this script):
#   - Python 3.10+ with numpy, pillow, onnx, sympy, packaging (the quantize extra), safetensors
#   - onnxruntime-gpu (CUDAExecutionProvider; its wheel may be unpacked on PYTHONPATH instead of installed),
#     CUDA 12/13 and cuDNN 9 libraries it can load (a CUDA torch's nvidia-* wheels serve: onnxruntime.preload_dlls)
#   - torch with CUDA, diffusers, transformers (the export extra, and the PyTorch fp16 peer)
#   - an NVIDIA GPU with 12 GB or more, about 25 GB of disk in the work folder
# Usage:
#   benchmarks/gpu.sh                  # full size on CUDA (work folder: $SD_GPU_BENCH_DIR or /tmp/sd-onnx-gpu-bench)
#   benchmarks/gpu.sh --tiny           # dry run on this machine: tiny model, CPU provider, PyTorch fp32 on the CPU
# Other arguments go to benchmarks/gpu_step.py (--configs, --repeats, --no-images).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
tiny=0
for arg in "$@"; do [ "$arg" = "--tiny" ] && tiny=1; done
if [ "$tiny" = 1 ]; then
    workdir="${SD_GPU_BENCH_DIR:-/tmp/sd-onnx-gpu-dry}"
else
    workdir="${SD_GPU_BENCH_DIR:-/tmp/sd-onnx-gpu-bench}"
    # Fail in the first second, naming what is missing, rather than minutes in.
    "$python" - <<'PY'
import sys
missing = []
try:
    import onnxruntime as ort
    getattr(ort, "preload_dlls", lambda: None)()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        missing.append(f"CUDAExecutionProvider (onnxruntime {ort.__version__} has {ort.get_available_providers()})")
except ImportError:
    missing.append("onnxruntime-gpu")
try:
    import torch
    if not torch.cuda.is_available():
        missing.append("a CUDA device visible to torch")
except ImportError:
    missing.append("torch with CUDA")
for module in ("diffusers", "transformers", "onnx", "sympy", "safetensors"):
    try:
        __import__(module)
    except ImportError:
        missing.append(module)
if missing:
    sys.exit("gpu.sh: missing: " + "; ".join(missing))
PY
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$python" -c 'import onnxruntime, sys; print(f"python {sys.version.split()[0]}, onnxruntime {onnxruntime.__version__}")'
cd "$here"
exec "$python" gpu_step.py --workdir "$workdir" "$@"
