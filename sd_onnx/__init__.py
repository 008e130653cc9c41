"""sd-onnx: Stable Diffusion checkpoints exported to ONNX and run without torch."""

from sd_onnx.errors import SdOnnxError

__version__ = "0.1.0"
__all__ = ["SdOnnxError", "__version__"]
