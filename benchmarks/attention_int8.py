"""One SD 1.5 64x64-level self-attention (batch 2, 4096 tokens, 8 heads x 40): ORT's fp32 MultiHeadAttention
(MLAS flash attention) against the same attention with both products in int8 (MatMulInteger u8 x u8, static
scales), which has to materialise the 4096x4096 scores. Answers whether int8 attention could lift the int8
UNet further on a CPU: it prints the int8 result's relative error, both times and the process's peak RSS.
    python benchmarks/attention_int8.py
"""
import resource
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

B, N, H, D = 2, 4096, 8, 40
def sess(nodes, inits, opsets):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, T.FLOAT, [B, N, H * D]) for n in "qkv"],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid(d, v) for d, v in opsets])
    o = ort.SessionOptions(); o.intra_op_num_threads = 2
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
mha = sess([h.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=H)], [],
           [("", 17), ("com.microsoft", 1)])
c = lambda name, arr: nh.from_array(np.asarray(arr), name)
inits = [c("s4", np.array([B, N, H, D], np.int64)), c("s3", np.array([B, N, H * D], np.int64)),
         c("sq", np.float32(4 / 127)), c("zq", np.uint8(128)), c("sp", np.float32(1 / 255)), c("zp", np.uint8(0)),
         c("scale", np.float32((4 / 127) ** 2 / D ** 0.5)), c("pv", np.float32(4 / 127 / 255))]
nodes = []
for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
    nodes += [h.make_node("Reshape", [n, "s4"], [n + "4"]), h.make_node("Transpose", [n + "4"], [n + "t"], perm=perm),
              h.make_node("QuantizeLinear", [n + "t", "sq", "zq"], [n + "8"])]
nodes += [h.make_node("MatMulInteger", ["q8", "k8", "zq", "zq"], ["s32"]), h.make_node("Cast", ["s32"], ["sf"], to=T.FLOAT),
          h.make_node("Mul", ["sf", "scale"], ["ss"]), h.make_node("Softmax", ["ss"], ["p"], axis=-1),
          h.make_node("QuantizeLinear", ["p", "sp", "zp"], ["p8"]),
          h.make_node("MatMulInteger", ["p8", "v8", "zp", "zq"], ["o32"]), h.make_node("Cast", ["o32"], ["of"], to=T.FLOAT),
          h.make_node("Mul", ["of", "pv"], ["o"]), h.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
          h.make_node("Reshape", ["ot", "s3"], ["y"])]
q8 = sess(nodes, inits, [("", 17)])
rng = np.random.default_rng(0)
feeds = {n: rng.standard_normal((B, N, H * D), dtype=np.float32) for n in "qkv"}
ref = mha.run(None, feeds)[0]; out = q8.run(None, feeds)[0]
print("int8 vs fp32 relative error", float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))
for _ in range(2):
    for name, s in (("fp32 MultiHeadAttention", mha), ("int8 products, scores materialised", q8)):
        ts = []
        for _ in range(3):
            t = time.perf_counter(); s.run(None, feeds); ts.append(time.perf_counter() - t)
        print(f"{name}: min {min(ts):.3f} s")
print("peak RSS GB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
