"""Export side of runtime patching: which ONNX initializer holds which checkpoint weight, and where its bytes lie.

The TorchScript exporter names most linear weights `onnx::MatMul_*` (stored transposed) and the UNet's attention
fusion rewrites the graph, so names cannot be guessed at run time. Instead each Linear/Conv2d/Embedding weight of the
reference module is matched by content to the initializers of the final graph (after fusion), and the map is written
beside the graph as `weights.json`: module name (diffusers/transformers naming, plus the LDM key when the checkpoint
had one) -> initializer name, whether it is stored transposed, dtype, shape, and the file/offset/length of its bytes,
so the runtime reads a weight with NumPy alone (no onnx, no torch).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

MAP_FILE = "weights.json"
MAP_FORMAT = 1
_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16"}


def _digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def module_fingerprints(module: torch.nn.Module) -> dict[str, dict]:
    """name -> content digests of each patchable weight (as stored, and transposed for linear weights)."""
    out = {}
    for name, sub in module.named_modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
            w = sub.weight.detach().to(torch.float32).numpy()
            out[name] = {"digest": _digest(w), "digest_t": _digest(w.T) if w.ndim == 2 else None,
                         "shape": list(w.shape)}
    return out


def ldm_fingerprints(state_dict: dict) -> dict[str, str]:
    """digest -> LDM key of the checkpoint's 2-D and 4-D float weights (the names A1111-era LoRAs may use)."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith(".weight") and tensor.ndim in (2, 4) and tensor.is_floating_point():
            out.setdefault(_digest(tensor.detach().to(torch.float32).numpy()), key[: -len(".weight")])
    return out


def write_weight_map(onnx_path: Path, fingerprints: dict[str, dict], ldm: dict[str, str] | None = None) -> dict:
    """Match `fingerprints` to the graph's initializers and write weights.json beside it; returns the map."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    wanted = {tuple(f["shape"]) for f in fingerprints.values()} | {tuple(f["shape"][::-1]) for f in fingerprints.values()}
    by_digest: dict[str, dict] = {}
    inline = onnx_path.read_bytes() if any(not uses_external_data(t) for t in proto.graph.initializer) else b""
    cursor = 0
    for tensor in proto.graph.initializer:
        if tensor.data_type not in _ONNX_DTYPES or tuple(tensor.dims) not in wanted:
            continue
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            location = {"file": info.location, "offset": int(info.offset or 0), "length": int(info.length)}
            with open(onnx_path.parent / info.location, "rb") as f:
                f.seek(location["offset"])
                raw = f.read(location["length"])
        else:
            raw = tensor.raw_data
            if not raw:  # values in float_data: no byte range to read at run time; leave the layer unmapped
                continue
            # The tensors are serialized in graph order, so one forward scan finds each one's bytes.
            offset = inline.find(raw, cursor)
            if offset < 0:
                offset = inline.find(raw)
            if offset < 0:
                continue
            cursor = offset + len(raw)
            location = {"file": onnx_path.name, "offset": offset, "length": len(raw)}
        array = np.frombuffer(raw, dtype=np.float32) if tensor.data_type == 1 else numpy_helper.to_array(tensor)
        array = np.asarray(array, dtype=np.float32).reshape(tuple(tensor.dims))
        by_digest.setdefault(_digest(array), {"initializer": tensor.name, "dtype": _ONNX_DTYPES[tensor.data_type],
                                              "shape": list(tensor.dims), **location})
    layers, users = {}, {}
    for name, f in fingerprints.items():
        hit, transposed = by_digest.get(f["digest"]), False
        if hit is None and f["digest_t"]:
            hit, transposed = by_digest.get(f["digest_t"]), True
        if hit is None:
            continue
        entry = dict(hit, transposed=transposed)
        if ldm and f["digest"] in ldm:
            entry["ldm"] = ldm[f["digest"]]
        layers[name] = entry
        users.setdefault(hit["initializer"], []).append(name)
    for names in users.values():  # the exporter merges initializers of equal value: patching one would patch all
        if len(names) > 1:
            for name in names:
                layers[name]["shared_with"] = [n for n in names if n != name]
    data = {"format": MAP_FORMAT, "layers": layers,
            "unmapped": sorted(set(fingerprints) - set(layers))}
    (onnx_path.parent / MAP_FILE).write_text(json.dumps(data, indent=1))
    return data
