"""OpenVINO start time of a model folder's UNet, cold (empty model cache) and warm (cache filled by the first start).

    python benchmarks/openvino_cache.py /tmp/bench/sd15
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys, time
from pathlib import Path
from sd_onnx.runtime.providers import resolve_device
from sd_onnx.runtime.sessions import OpenVinoSession
t0 = time.perf_counter()
OpenVinoSession(Path(sys.argv[1]) / "unet" / "model.onnx", resolve_device("openvino"), cache_dir=Path(sys.argv[2]))
print(time.perf_counter() - t0)
"""


def start_seconds(folder: Path, cache: Path) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(cache)], check=True, capture_output=True,
                         text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    folder = Path(sys.argv[1])
    cache = Path(tempfile.mkdtemp(prefix="sd-onnx-ov-cache-"))
    try:
        cold = start_seconds(folder, cache)
        warm = start_seconds(folder, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"OpenVINO UNet start: cold {cold:.1f} s, warm (cached) {warm:.1f} s, {cold / warm:.1f}x faster")


if __name__ == "__main__":
    main()
