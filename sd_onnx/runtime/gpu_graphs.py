"""CUDA graphs of a model's components: ONNX Runtime's transformer fusions for GPUs, made at the first start, cached.

ONNX Runtime's transformers optimizer has CUDA-only fused ops for this architecture (GroupNorm and SkipGroupNorm,
NhwcConv, BiasSplitGelu, BiasAdd, SkipLayerNorm; MultiHeadAttention runs its flash / memory-efficient kernels) that
its own Stable Diffusion pipeline applies before running on CUDA (models/stable_diffusion/optimize_pipeline.py). They
cannot be in the model folder, which must also run on CPUs, so the fused graph is made here at the first CUDA start
and kept in the optimized-graph cache (ort_cache), keyed by the provider list so it never meets a CPU graph.

The fusions need the `onnx` and `sympy` packages (the quantize extra); without them the plain graph runs, with a
note. The whole graph is loaded into memory for the pass (3.4 GB for an fp32 UNet, once per machine).
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Iterator

from sd_onnx import components
from sd_onnx.onnx_files import quiet_logger
from sd_onnx.runtime import ort_cache
from sd_onnx.runtime.ort_cache import OptimizedModelCache

# Providers whose kernels include the fused ops; ROCm, MIGraphX and DirectML compile or fuse graphs themselves.
FUSING_PROVIDERS = ("CUDAExecutionProvider",)


def model_type(component: str) -> str | None:
    """The optimizer's model type of a model-folder component (components.py), None for anything else."""
    entry = components.BY_NAME.get(component)
    return entry.ort_model_type or None if entry else None


def wants_fusion(providers: tuple[str, ...], component: str) -> bool:
    return bool(providers) and providers[0] in FUSING_PROVIDERS and model_type(component) is not None


def fusion_options(kind: str, fp16: bool):
    """ONNX Runtime's FusionOptions for the GPU, as its SD pipeline sets them: packed QKV/KV attention only for fp16
    graphs (its fp32 MultiHeadAttention kernels take separate Q, K, V)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(kind)
    if kind == "unet":
        options.enable_packed_kv = fp16 and options.enable_packed_kv
        options.enable_packed_qkv = fp16 and options.enable_packed_qkv
        options.enable_bias_add = True
    return options


def fuse_for_gpu(src: Path, dst: Path, component: str) -> dict[str, int]:
    """Write the GPU-fused graph of `src` to `dst` (weights in dst's model.onnx_data); the fused op counts."""
    import onnx
    from onnx import TensorProto

    import onnxruntime.transformers.optimizer as ort_optimizer

    kind = model_type(component)
    proto = onnx.load(str(src))
    fp16 = any(t.data_type == TensorProto.FLOAT16 for t in proto.graph.initializer)
    with _fusions_accept_fp16_constants(), quiet_logger("onnxruntime.transformers"), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        model = ort_optimizer.optimize_model(proto, model_type=kind, opt_level=0,
                                             optimization_options=fusion_options(kind, fp16), use_gpu=True)
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    onnx.save_model(model.model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ort_cache.DATA, size_threshold=1024)
    return stats


@contextlib.contextmanager
def _fusions_accept_fp16_constants() -> Iterator[None]:
    """ONNX Runtime's fusions write the parameters they read (GroupNorm's gamma and beta) as fp32 tensors from the
    graph's arrays; in an fp16 variant those arrays are fp16, and half the bytes fail the fp32 tensor's size check.
    Convert the array to the tensor's own type first (ORT's GroupNorm kernel takes fp32 gamma/beta either way)."""
    from onnx import helper

    import fusion_base  # ORT's module, importable once its optimizer is imported

    original = fusion_base.Fusion.add_initializer

    def add_initializer(self, name, data_type, dims, vals, raw=True):
        if raw and hasattr(vals, "astype"):
            vals = vals.astype(helper.tensor_dtype_to_np_dtype(data_type))
        return original(self, name, data_type, dims, vals, raw)

    fusion_base.Fusion.add_initializer = add_initializer
    try:
        yield
    finally:
        fusion_base.Fusion.add_initializer = original


def fused_graph(path: Path, component: str, cache: OptimizedModelCache) -> Path | None:
    """The cached GPU graph of `path`, made now if there is none (or it is stale); None when it cannot be made
    (no onnx/sympy, no room for the cache, a fusion that fails): the caller runs the plain graph."""
    stamp = cache.stamp(path)
    cached = cache.lookup(stamp)
    if cached is not None:
        return cached
    try:
        import onnx  # noqa: F401
        import sympy  # noqa: F401
    except ImportError as e:
        _note(f"GPU graph fusions need {e.name} (pip install 'sd-onnx[quantize]'); running {path.parent.name}'s "
              "plain graph")
        return None
    staged = cache.staging(stamp)
    if staged is None:
        _note(f"no room in {cache.root} for {path.parent.name}'s GPU graph; running the plain graph")
        return None
    _note(f"fusing {path.parent.name} for {cache.providers[0]}, once (kept in {cache.root})")
    try:
        fuse_for_gpu(path, staged / ort_cache.MODEL, component)
    except Exception as e:  # noqa: BLE001 -- a fusion pattern ONNX Runtime did not expect: the plain graph still runs
        cache.discard(staged)
        _note(f"GPU graph fusions failed on {path.parent.name} ({type(e).__name__}: {str(e)[:200]}); "
              "running the plain graph")
        return None
    return cache.commit(staged, stamp)


def _note(message: str) -> None:
    print(f"sd-onnx: {message}", file=sys.stderr)
