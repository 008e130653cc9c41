"""Would Winograd convolution bring the fp32 UNet closer to the compute limit? Winograd F(2x2, 3x3) written with
plain ONNX ops (strided Slices, a Kronecker-matrix MatMul for each transform, 16 batched GEMMs) against the Conv
that our CPU path runs (ONNX Runtime, ORT_ENABLE_ALL: MLAS NCHWc kernels).

    python benchmarks/winograd_conv.py                       # the SD 1.5 3x3 conv shapes, one at a time
    python benchmarks/winograd_conv.py --unet /tmp/bench/sd15 --levels 32 --levels 32,16 --rounds 3

The first form times each conv shape (batch 2, as with guidance) in this process and prints its time, GFLOP/s
counted as the direct convolution's FLOPs (Winograd does 2.25x fewer multiplications in its GEMMs), the ratio and
the largest relative difference. The second rewrites every 3x3/stride-1 conv of an exported UNet whose input is
at one of the given latent sizes (for a 64x64 latent) into a copy in a temporary folder, then times one 512x512
step of the original and of each copy in interleaved child processes, with the output difference (fp32 rounding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import measure, run_child  # benchmarks/timing.py

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)
# (in channels, out channels, latent-level size) of SD 1.5's 3x3 convolutions at 512x512
SHAPES = [(320, 320, 64), (960, 320, 64), (640, 640, 32), (1920, 640, 32), (1280, 1280, 16), (2560, 1280, 16),
          (1280, 1280, 8), (2560, 1280, 8)]


class Nodes:
    """Collects the nodes and initializers of a rewritten conv; names start with the conv's own name."""

    def __init__(self):
        self.nodes, self.initializers, self.prefix, self._count = [], [], "", 0

    def const(self, value, dtype=np.int64) -> str:
        from onnx import numpy_helper
        self._count += 1
        tensor = numpy_helper.from_array(np.asarray(value, dtype), f"{self.prefix}/winograd_c{self._count}")
        self.initializers.append(tensor)
        return tensor.name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        from onnx import helper
        self._count += 1
        name = f"{self.prefix}/winograd_{op_type}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [output or name], name=name, **attrs))
        return output or name


def winograd_conv(b: Nodes, x: str, y: str, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """y = Conv(x, weight, bias) with a 3x3 kernel, stride 1, padding 1, any N, H, W (odd sizes are padded to even
    and the output cropped)."""
    co, ci = weight.shape[:2]
    u = np.einsum("ak,oikl,bl->aboi", G, weight.astype(np.float64), G).reshape(16, 1, co, ci)
    shape = b.op("Shape", [x])
    hw = b.op("Slice", [shape, b.const([2]), b.const([4])])
    n = b.op("Slice", [shape, b.const([0]), b.const([1])])
    odd = b.op("Mod", [hw, b.const([2, 2])])
    padded = b.op("Pad", [x, b.op("Concat", [b.const([0, 0, 1, 1, 0, 0]), b.op("Add", [odd, b.const([1, 1])])],
                                  axis=0)])
    ends = [-3, -2, -1, 1 << 62]  # tile row i of every 4x4 window: padded rows i, i+2, ... (h2 of them)
    tiles = [b.op("Unsqueeze", [b.op("Slice", [padded, b.const([i, j]), b.const([ends[i], ends[j]]),
                                               b.const([2, 3]), b.const([2, 2])]), b.const([0])])
             for i in range(4) for j in range(4)]
    d = b.op("Concat", tiles, axis=0)  # [16, N, ci, h2, w2]
    v = b.op("MatMul", [b.const(np.kron(BT, BT), np.float32), b.op("Reshape", [d, b.const([16, -1])])])
    v = b.op("Reshape", [b.op("Reshape", [v, b.op("Shape", [d])]), b.const([16, 0, ci, -1])])  # [16, N, ci, T]
    m = b.op("MatMul", [b.const(u, np.float32), v])  # [16, N, co, T]
    out = b.op("MatMul", [b.const(np.kron(AT, AT), np.float32), b.op("Reshape", [m, b.const([16, -1])])])
    half = b.op("Slice", [b.op("Shape", [d]), b.const([3]), b.const([5])])
    out = b.op("Reshape", [out, b.op("Concat", [b.const([2, 2]), n, b.const([co]), half], axis=0)])
    out = b.op("Transpose", [out], perm=[2, 3, 4, 0, 5, 1])  # [N, co, h2, 2, w2, 2]
    if bias is not None:
        out = b.op("Add", [out, b.const(bias.reshape(1, co, 1, 1, 1, 1), np.float32)])
    out = b.op("Reshape", [out, b.op("Concat", [n, b.const([co]), b.op("Mul", [half, b.const([2, 2])])], axis=0)])
    b.op("Slice", [out, b.const([0, 0]), hw, b.const([2, 3])], output=y)


def conv_graph(weight: np.ndarray, bias: np.ndarray, winograd: bool) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    b = Nodes()
    if winograd:
        winograd_conv(b, "x", "y", weight, bias)
    else:
        b.initializers += [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
        b.op("Conv", ["x", "w", "b"], "y", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph(b.nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              ["N", weight.shape[1], "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], b.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def session(model, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def shapes(repeats: int) -> None:
    print("| conv (batch 2) | direct GFLOP | ORT Conv ms | GFLOP/s | Winograd ms | GFLOP/s (direct count) | "
          "Winograd / Conv | max rel diff |\n|---|---|---|---|---|---|---|---|")
    for ci, co, size in SHAPES:
        rng = np.random.default_rng(0)
        weight = (rng.standard_normal((co, ci, 3, 3)) / np.sqrt(9 * ci)).astype(np.float32)
        bias = rng.standard_normal(co).astype(np.float32)
        x = rng.standard_normal((2, ci, size, size)).astype(np.float32)
        flop = 2 * 2 * size * size * ci * co * 9
        results = []
        for winograd in (False, True):
            s = session(conv_graph(weight, bias, winograd))
            r = measure(lambda s=s, x=x: lambda: s.run(None, {"x": x}), warmup=1, repeats=repeats)
            results.append((min(r["times"]), s.run(None, {"x": x})[0]))
        (tc, yc), (tw, yw) = results
        print(f"| {ci}->{co} at {size}x{size} | {flop / 1e9:.1f} | {tc * 1e3:.0f} | {flop / tc / 1e9:.0f} | "
              f"{tw * 1e3:.0f} | {flop / tw / 1e9:.0f} | {tw / tc:.2f} | "
              f"{np.abs(yw - yc).max() / np.abs(yc).max():.1e} |", flush=True)


def rewrite_unet(src: Path, dst: Path, levels: set[int]) -> int:
    """Copy src (a UNet model.onnx with external weights) to dst with its 3x3 stride-1 convs at `levels` rewritten;
    returns how many were."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from sd_onnx.onnx_files import working_dir

    proto = onnx.load(str(src), load_external_data=False)
    for graph_input in proto.graph.input:
        if graph_input.name == "sample":
            for dim, value in zip(graph_input.type.tensor_type.shape.dim, (2, 4, 64, 64)):
                dim.dim_value = value
    with working_dir(src.parent):  # inference reads small constants from the external data
        typed = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    sizes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in typed.graph.value_info}
    proto = onnx.load(str(src))
    weights = {t.name: t for t in proto.graph.initializer}
    b, nodes, count = Nodes(), [], 0
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain_3x3 = (node.op_type == "Conv" and node.input[1] in weights and list(attrs.get("kernel_shape", ())) ==
                     [3, 3] and list(attrs.get("strides", [1, 1])) == [1, 1] and attrs.get("group", 1) == 1
                     and list(attrs.get("pads", ())) == [1, 1, 1, 1] and list(attrs.get("dilations", [1, 1])) == [1, 1])
        dims = sizes.get(node.input[0], []) if node.input else []
        size = dims[2] if len(dims) == 4 else 0
        if not (plain_3x3 and size in levels):
            nodes.append(node)
            continue
        b.prefix, count = node.name or f"conv{count}", count + 1
        bias = numpy_helper.to_array(weights[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        winograd_conv(b, node.input[0], node.output[0], numpy_helper.to_array(weights[node.input[1]]), bias)
        nodes += b.nodes
        b.nodes = []
    used = {name for node in nodes for name in node.input}
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    kept = [t for t in proto.graph.initializer if t.name in used] + b.initializers
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dst), save_as_external_data=True, location=dst.name + "_data", size_threshold=1024)
    return count


def step_child(model: str, out: str, repeats: int) -> dict:
    from unet_step import inputs  # benchmarks/unet_step.py

    sample, timestep, text = inputs()
    feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text}
    result = {}

    def build():
        s = session(model)
        result["out"] = s.run(None, feeds)[0]
        return lambda: s.run(None, feeds)

    timing = measure(build, warmup=0, repeats=repeats)
    np.save(out, result["out"])
    return timing


def unet(folder: Path, level_sets: list[str], rounds: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory(prefix="winograd-unet-") as work:
        compare(folder, Path(work), level_sets, rounds, repeats)


def compare(folder: Path, work: Path, level_sets: list[str], rounds: int, repeats: int) -> None:
    from sd_onnx.home import folder_bytes

    models = {"ORT Conv (our fp32 graph)": folder / "unet" / "model.onnx"}
    for levels in level_sets:
        t0 = time.perf_counter()
        path = work / f"levels-{levels.replace(',', '-')}" / "model.onnx"
        count = rewrite_unet(folder / "unet" / "model.onnx", path, {int(v) for v in levels.split(",")})
        name = f"Winograd F(2,3) at levels {levels}"
        models[name] = path
        print(f"{name}: {count} convs rewritten in {time.perf_counter() - t0:.0f} s")
    runs = {name: [] for name in models}
    outputs = {name: work / f"output-{i}.npy" for i, name in enumerate(models)}
    for r in range(rounds):
        for name, path in models.items():
            result = run_child([sys.executable, __file__, "--child", str(path), "--out", str(outputs[name]),
                                "--repeats", str(repeats)], name)
            if result:
                runs[name].append(result)
                print(f"round {r + 1} {name}: {[round(t, 2) for t in result['times']]} s", flush=True)
    reference = np.load(outputs[next(iter(models))])
    print("\n| UNet graph | weights GB | median s | min s | vs Conv | load s (optimized at start) | max rel diff |\n"
          "|---|---|---|---|---|---|---|")
    base = statistics.median(t for r in runs[next(iter(models))] for t in r["times"])
    for name, path in models.items():
        times = [t for r in runs[name] for t in r["times"]]
        if not times:
            continue
        diff = np.abs(np.load(outputs[name]) - reference).max() / np.abs(reference).max()
        print(f"| {name} | {folder_bytes(path.parent) / 1e9:.2f} | {statistics.median(times):.2f} | "
              f"{min(times):.2f} | {statistics.median(times) / base:.3f} | "
              f"{statistics.median(r['load_s'] for r in runs[name]):.1f} | {diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", type=Path, help="an exported model folder: time whole UNet steps instead")
    parser.add_argument("--levels", action="append", help="latent sizes whose convs are rewritten, e.g. 32,16 "
                                                          "(repeatable; default 32 and 32,16)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per shape, or steps per round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(step_child(args.child, args.out, args.repeats)))
    elif args.unet:
        unet(args.unet, args.levels or ["32", "32,16"], args.rounds, args.repeats)
    else:
        shapes(args.repeats)


if __name__ == "__main__":
    main()
