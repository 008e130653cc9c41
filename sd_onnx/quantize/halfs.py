"""16-bit variants: fp16 for GPU providers (ops that overflow stay fp32) and bf16-stored weights for CPUs with BF16.

fp16 converts the whole graph with ONNX Runtime's float16 converter, inputs and outputs kept fp32. Which nodes stay
fp32 is measured, not guessed: the fp32 graph runs on the recorded inputs, and every tensor that comes within
FP16_HEADROOM of fp16's largest value (65504) keeps its producer and its consumers in fp32 (the classic case is
the VAE decoder's up-blocks).

bf16 stores every float weight as bfloat16 (half the size) behind a Cast to fp32; compute precision is the
runtime's choice: OpenVINO with INFERENCE_PRECISION_HINT=bf16 keeps the weights bf16 and runs AVX512-BF16/AMX
kernels. bf16 has fp32's exponent range, so nothing overflows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sd_onnx.onnx_files import external_location, quiet_logger, working_dir
from sd_onnx.quantize.graphs import feeds_reader, typed_graph

FP16_MAX = 65504.0
FP16_HEADROOM = 4.0  # a tensor measured above 65504 / 4 on the recorded inputs stays fp32


def activation_peaks(typed: Path, workdir: Path, feeds: list[dict], external: bool) -> dict[str, float]:
    """Largest |value| of every float tensor of a typed graph (see typed_graph) over the feeds, measured with
    ONNX Runtime's MinMax calibrator."""
    import shutil
    import tempfile

    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    # The calibrator saves its augmented copy with external data under a uuid name of onnx's choosing: give it a
    # folder of its own and remove the whole folder (a leftover <uuid>.data beside the variant's model was a second,
    # fp32, copy of every weight: #20's "fp16 UNet 150 % of fp32").
    scratch = Path(tempfile.mkdtemp(prefix="peaks-", dir=workdir))
    try:
        with quiet_logger():
            calibrator = create_calibrator(str(typed), None, augmented_model_path=str(scratch / "peaks.onnx"),
                                           calibrate_method=CalibrationMethod.MinMax,
                                           use_external_data_format=external, providers=["CPUExecutionProvider"])
            try:
                calibrator.collect_data(feeds_reader(feeds))
                ranges = calibrator.compute_data()
            finally:
                del calibrator
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {name: float(max(abs(float(np.min(r.range_value[0]))), abs(float(np.max(r.range_value[1])))))
            for name, r in ranges.data.items()}


def convert_fp16(src: Path, dst: Path, feeds: list[dict]) -> dict:
    import onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    limit = FP16_MAX / FP16_HEADROOM
    # One typed copy serves both the measurement and the converter, which places its Casts by the tensors' types.
    with typed_graph(src, dst.parent) as typed:
        external = external_location(onnx.load(str(typed), load_external_data=False)) is not None
        peaks = activation_peaks(typed, dst.parent, feeds, external)
        proto = onnx.load(str(typed))
    wide = _wide_initializers(proto)  # weights fp16 cannot hold: stored fp32, read by fp32 nodes only
    big = {name for name, peak in peaks.items() if peak > limit} | set(wide)
    # A tensor too big for fp16 must never be one: its producer and its consumers both stay fp32.
    blocked = sorted({n.name for n in proto.graph.node if big.intersection(n.output) or big.intersection(n.input)})
    fp32_weights = half_weights(proto, blocked, wide)
    dropped = _drop_cast_round_trips(proto)
    # The typed copy's value_info served the converter; ONNX Runtime infers types itself, and the tiny graphs'
    # size ratio would otherwise carry a second description of every tensor.
    del proto.graph.value_info[:]
    _save(proto, dst, external=external)
    return {"method": "every float weight stored once in fp16 (onnxruntime.transformers.float16 with "
                      "force_fp16_initializers), fp32 nodes read them through one shared Cast; fp32 inputs/outputs",
            "cast_round_trips_removed": dropped, "fp32_weights": fp32_weights,
            "fp32_nodes": blocked, "fp32_rule": f"touches a tensor measured above |{limit:g}| on the recorded inputs",
            "largest_activation": max(peaks.values(), default=0.0)}


def half_weights(proto, blocked: list[str], wide: dict) -> list[str]:
    """Convert `proto` to fp16 in place, each float weight stored once: fp16, except the `wide` ones (name -> fp32
    TensorProto) that fp16 cannot hold, which stay fp32 and are read only by the `blocked` (fp32) nodes. Returns the
    names of the weights kept fp32.

    ORT's converter by default keeps an fp32 copy of any weight a blocked node reads; force_fp16_initializers
    stores it fp16 instead and gives the blocked readers one shared Cast(to=float) of it."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    graph = proto.graph
    # Taken out for the conversion, so the converter neither rounds them nor Casts them; put back after, unchanged.
    kept = [t for t in graph.initializer if t.name in wide]
    for tensor in kept:
        graph.initializer.remove(tensor)
    described = [v for v in graph.value_info if v.name in wide]
    for info in described:
        graph.value_info.remove(info)
    convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True, op_block_list=DEFAULT_OP_BLOCK_LIST,
                             node_block_list=blocked, force_fp16_initializers=True)
    graph.initializer.extend(kept)
    return sorted(wide)


def _wide_initializers(proto) -> dict:
    """Float weights with a value beyond fp16's range (±65504), by name."""
    from onnx import TensorProto, numpy_helper

    wide = {}
    for tensor in proto.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            values = numpy_helper.to_array(tensor)
            if values.size and float(np.max(np.abs(values))) > FP16_MAX:
                wide[tensor.name] = tensor
    return wide


def _drop_cast_round_trips(proto) -> int:
    """The converter puts fp32 -> fp16 -> fp32 Casts between two fp32 nodes, which would overflow exactly the
    tensors that were kept fp32. Let the second node read the fp32 tensor directly."""
    from onnx import TensorProto

    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}
    types.update({t.name: t.data_type for t in graph.initializer})

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rename, removed = {}, set()
    for node in graph.node:
        first = producer.get(node.input[0]) if node.input else None
        if (cast_to(node) == TensorProto.FLOAT and first is not None and cast_to(first) == TensorProto.FLOAT16
                and types.get(first.input[0]) == TensorProto.FLOAT and node.output[0] not in graph_outputs):
            rename[node.output[0]] = first.input[0]
            removed.add(id(node))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {i for n in graph.node if id(n) not in removed for i in n.input} | graph_outputs
    for node in graph.node:  # the fp16 Casts whose only readers were the removed ones
        if cast_to(node) == TensorProto.FLOAT16 and node.output[0] not in used:
            removed.add(id(node))
    kept = [n for n in graph.node if id(n) not in removed]
    count = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(kept)
    return count


def convert_bf16_weights(src: Path, dst: Path) -> dict:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    external = external_location(onnx.load(str(src), load_external_data=False)) is not None
    with working_dir(src.parent):
        proto = onnx.load(src.name)
    graph = proto.graph
    casts, converted = [], 0
    for tensor in graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or int(np.prod(tensor.dims)) < 16:
            continue
        values = numpy_helper.to_array(tensor)
        name = tensor.name
        tensor.CopyFrom(_bf16_tensor(values, name + "_bf16"))
        casts.append(helper.make_node("Cast", [name + "_bf16"], [name], name=name + "_to_fp32", to=TensorProto.FLOAT))
        converted += 1
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    _save(proto, dst, external=external)
    return {"method": "weights stored as bfloat16 (round to nearest even) behind Cast to fp32",
            "bf16_tensors": converted}


def _bf16_tensor(values: np.ndarray, name: str):
    from onnx import TensorProto

    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    tensor = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(values.shape))
    tensor.raw_data = rounded.tobytes()
    return tensor


def bf16_to_float(raw: bytes, shape) -> np.ndarray:
    """Decode a BFLOAT16 tensor's raw bytes (for checks and tests)."""
    return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)


def _save(proto, dst: Path, external: bool) -> None:
    import onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + "_data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(dst))
