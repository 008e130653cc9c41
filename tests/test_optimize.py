"""The UNet graph pass: attention and LayerNorm fused with CPU kernels, same outputs, one copy of every weight."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from sd_onnx.export.exporter import export_model


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_fused_unet_equals_plain_export(tiny_model, tiny_checkpoint, tmp_path, family):
    """Tolerance 1e-5 absolute: the fused kernels reorder float32 sums; outputs are O(1)."""
    fused_dir = tiny_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_dir = export_model(tiny_checkpoint(family), tmp_path / "plain", optimize=False).folder
    fused_graph = onnx.load(str(fused_dir / "unet" / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in fused_graph.graph.node]
    plain_ops = [n.op_type for n in onnx.load(str(plain_dir / "unet" / "model.onnx"), load_external_data=False).graph.node]
    # every attention, self and cross, becomes MultiHeadAttention over plain Q/K/V MatMuls (flash attention on the
    # CPU, and MatMuls that int8 quantization can reach); none is left as Softmax or packed-QKV Attention
    assert "Softmax" not in ops and "Attention" not in ops and "SkipLayerNormalization" in ops
    assert ops.count("MultiHeadAttention") == plain_ops.count("Softmax") > 0
    assert any(o.domain == "com.microsoft" for o in fused_graph.opset_import)
    meta = json.loads((fused_dir / "sd_onnx.json").read_text())
    assert meta["graph_optimizations"]["unet"]["MultiHeadAttention"] == ops.count("MultiHeadAttention")

    rng = np.random.default_rng(1)
    width = json.loads((fused_dir / "unet" / "config.json").read_text())["cross_attention_dim"]
    feeds = {"sample": rng.standard_normal((2, 4, 8, 12), dtype=np.float32),
             "timestep": np.array([321.5, 17.25], dtype=np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 154, width), dtype=np.float32)}
    outs = [ort.InferenceSession(str(d / "unet" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for d in (fused_dir, plain_dir)]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_fusion_pass_takes_a_relative_path(tiny_model, tiny_checkpoint, tmp_path, monkeypatch):
    """`sd-onnx export m.ckpt -o out` hands the pass a path relative to the cwd, which it changes to the model's
    folder while fusing: it once failed to find model.onnx_data there."""
    import shutil

    from sd_onnx.export.optimize import optimize_unet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_dir = export_model(tiny_checkpoint("sd1"), tmp_path / "plain", optimize=False).folder
    shutil.copytree(plain_dir / "unet", tmp_path / "work" / "unet")
    monkeypatch.chdir(tmp_path / "work")
    stats = optimize_unet(Path("unet") / "model.onnx")
    assert stats.get("MultiHeadAttention", 0) > 0
    fused = onnx.load(str(tiny_model("sd1") / "unet" / "model.onnx"), load_external_data=False)
    ours = onnx.load("unet/model.onnx", load_external_data=False)
    assert [n.op_type for n in ours.graph.node] == [n.op_type for n in fused.graph.node]


def test_fused_unet_keeps_one_copy_of_each_weight(tiny_model):
    """The external data file holds exactly the tensors the graph uses: no orphaned unfused Q/K/V bytes."""
    unet = tiny_model("sd1") / "unet"
    graph = onnx.load(str(unet / "model.onnx"), load_external_data=False)
    spans = sorted((ExternalDataInfo(t).offset, ExternalDataInfo(t).length)
                   for t in graph.graph.initializer if uses_external_data(t))
    assert spans and sum(length for _, length in spans) == (unet / "model.onnx_data").stat().st_size
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:])), "overlapping tensors"
