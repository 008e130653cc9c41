"""Run a command and report its wall time and peak resident memory (the child's ru_maxrss).

    python benchmarks/peak_rss.py -- sd-onnx export /tmp/bench/sd15-random.safetensors -o /tmp/bench/sd15
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(__doc__)
        return 2
    t0 = time.perf_counter()
    rc = subprocess.call(argv)
    seconds = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB on Linux
    print(f"exit {rc}, wall {seconds:.1f} s, peak RSS {peak_gb:.2f} GB: {' '.join(argv)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
