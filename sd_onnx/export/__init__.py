"""Checkpoint -> ONNX model folder (needs the `export` extra: torch, diffusers, transformers)."""

import importlib.util
import sys


def _hide_broken_torchvision() -> None:
    """spandrel (upscalers) depends on torchvision, and pip may install PyPI's CUDA build of it beside a CPU torch,
    where `import torchvision` raises. diffusers and transformers import it whenever it is installed, so such a
    torchvision is marked absent (None in sys.modules, which find_spec reports as missing); none of our code
    needs it."""
    if "torchvision" in sys.modules:
        return
    try:
        if importlib.util.find_spec("torchvision") is None:
            return
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 -- RuntimeError from operator registration, OSError from missing libraries
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None


_hide_broken_torchvision()
