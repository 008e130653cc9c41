"""Graph pass on the exported UNet: ONNX Runtime's transformer fusions that have CPU kernels (attention, LayerNorm)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from sd_onnx.onnx_files import external_location, quiet_logger, working_dir

# Fusions whose fused ops exist only as CUDA kernels; enabling them would make the model unloadable on the CPU.
CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                     "enable_packed_qkv", "enable_packed_kv", "enable_bias_add")


def optimize_unet(model_path: Path) -> dict[str, int]:
    """Fuse attention (Attention / MultiHeadAttention) and LayerNorm in place; returns the fused op counts.

    The graph is loaded without its external weights and the fusions run from the model's folder, so ONNX reads
    from model.onnx_data only the tensors a fusion packs (Q/K/V); the new packed tensors are appended to the same
    file and the untouched weights keep their offsets. Peak memory stays near the size of the attention
    weights instead of twice the UNet's 3.4 GB.
    """
    import onnx
    import onnxruntime.transformers.optimizer as ort_optimizer  # also puts its helper modules on sys.path
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("unet")
    for name in CUDA_ONLY_FUSIONS:
        if hasattr(options, name):
            setattr(options, name, False)
    model_path = Path(model_path).resolve()  # the fusions run from the model's folder; keep our paths valid there
    folder = model_path.parent
    proto = onnx.load(str(model_path), load_external_data=False)
    external = external_location(proto)
    if external is None:
        raise ValueError(f"{model_path}: expected its weights in an external data file")
    with _numpy2_num_heads(), _self_attention_as_mha(), quiet_logger("onnxruntime.transformers"), \
            contextlib.redirect_stderr(io.StringIO()), working_dir(folder):
        model = ort_optimizer.optimize_model(proto, model_type="unet", opt_level=0,
                                             optimization_options=options, use_gpu=False)
        stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
        if not any(o.domain == "com.microsoft" for o in model.model.opset_import):
            model.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        _append_new_tensors(model.model, folder / external, external)
        _compact(model.model, folder / external, external)
        tmp = model_path.with_name(model_path.name + ".tmp")
        onnx.save_model(model.model, str(tmp))
        tmp.replace(model_path)
    return stats


def _append_new_tensors(proto, data_path: Path, location: str, threshold: int = 1024) -> None:
    """Move the tensors the fusions created (held in memory) to the end of the existing external data file."""
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data

    with open(data_path, "ab") as f:
        for tensor in proto.graph.initializer:
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= threshold:
                offset = f.tell()
                f.write(tensor.raw_data)
                set_external_data(tensor, location=location, offset=offset, length=len(tensor.raw_data))
                tensor.ClearField("raw_data")
                tensor.data_location = TensorProto.EXTERNAL


def _compact(proto, data_path: Path, location: str, block: int = 64 << 20) -> None:
    """Rewrite the external data file with only the tensors the graph still uses (the fused-away Q/K/V go)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    tensors = sorted((t for t in proto.graph.initializer if uses_external_data(t)),
                     key=lambda t: ExternalDataInfo(t).offset)
    tmp = data_path.with_name(data_path.name + ".tmp")
    offsets = []
    try:
        with open(data_path, "rb") as src, open(tmp, "wb") as dst:
            for tensor in tensors:
                info = ExternalDataInfo(tensor)
                src.seek(info.offset)
                offsets.append(dst.tell())
                remaining = info.length
                while remaining:
                    chunk = src.read(min(block, remaining))
                    dst.write(chunk)
                    remaining -= len(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for tensor, offset in zip(tensors, offsets):
        for entry in tensor.external_data:
            if entry.key == "offset":
                entry.value = str(offset)
    tmp.replace(data_path)


@contextlib.contextmanager
def _numpy2_num_heads():
    """ORT's FusionAttentionUnet.get_num_heads calls int() on a 1-element array, which NumPy 2 refuses.

    Read the same constant with .reshape(-1)[0] for the torch-2 export pattern, and defer to ORT otherwise."""
    import fusion_attention_unet as fau  # ORT's module, importable once its optimizer is imported

    original = fau.FusionAttentionUnet.get_num_heads

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        if is_torch2:
            parent = self.model.get_parent(reshape_q, 1)
            if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                value = self.model.get_constant_value(parent.input[2])
                if isinstance(value, np.ndarray) and value.size == 1:
                    return max(int(value.reshape(-1)[0]), 0)
        return original(self, reshape_q, is_torch2)

    fau.FusionAttentionUnet.get_num_heads = get_num_heads
    try:
        yield
    finally:
        fau.FusionAttentionUnet.get_num_heads = original


@contextlib.contextmanager
def _self_attention_as_mha():
    """Fuse self-attention like cross-attention: MultiHeadAttention over the separate Q, K and V MatMuls.

    ORT's default for the CPU is an Attention node with one packed QKV weight. MultiHeadAttention runs
    MLAS flash attention on the CPU, and keeping Q/K/V as plain MatMuls lets int8 quantization reach them."""
    import fusion_attention_unet as fau
    import onnx

    original = fau.FusionAttentionUnet.create_attention_node

    def create_attention_node(self, q_matmul, k_matmul, v_matmul, num_heads, hidden_size, input, output):
        if self.is_cross_attention:
            return original(self, q_matmul, k_matmul, v_matmul, num_heads, hidden_size, input, output)
        if not q_matmul.input[0] == k_matmul.input[0] == v_matmul.input[0] == input:
            return None
        if num_heads <= 0 or (hidden_size > 0 and hidden_size % num_heads):
            return None
        node = onnx.helper.make_node("MultiHeadAttention", [q_matmul.output[0], k_matmul.output[0], v_matmul.output[0]],
                                     [output], name=self.model.create_node_name("MultiHeadAttention"),
                                     domain="com.microsoft", num_heads=num_heads)
        self.increase_counter("MultiHeadAttention (self attention)")
        return node

    fau.FusionAttentionUnet.create_attention_node = create_attention_node
    try:
        yield
    finally:
        fau.FusionAttentionUnet.create_attention_node = original
