"""`sd-onnx quantize` on tiny models: valid variant folders that generate runs, integer kernels really present,
16-bit storage really 16-bit, a stored fidelity report, and bad input refused without leftovers."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from sd_onnx.cli import main
from sd_onnx.quantize.variant import QuantizeOptions, quantize_model

FAST = dict(calibration_prompts=1, calibration_steps=3, calibration_size=64, fidelity_prompts=1, fidelity_steps=3,
            fidelity_size=64)


def _quantize(folder: Path, precision: str, output: Path | None = None, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_model(folder, QuantizeOptions(precision, **{**FAST, **kw}), output).folder


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory) -> Path:
    """A private copy of the tiny sd1 folder, so its variants land beside it and nowhere else."""
    root = tmp_path_factory.mktemp("quantize")
    return Path(shutil.copytree(tiny_model("sd1"), root / "tiny"))


@pytest.fixture(scope="module")
def int8(base) -> Path:
    return _quantize(base, "int8")


@pytest.fixture(scope="module")
def bf16(base) -> Path:
    return _quantize(base, "bf16", any_cpu=True)


@pytest.fixture(scope="module")
def fp16(base) -> Path:
    return _quantize(base, "fp16")


def _meta(folder: Path) -> dict:
    return json.loads((folder / "sd_onnx.json").read_text())


def _initializer_types(path: Path) -> dict[int, int]:
    import onnx

    counts: dict[int, int] = {}
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        counts[t.data_type] = counts.get(t.data_type, 0) + 1
    return counts


def test_int8_variant_is_a_sibling_with_metadata_and_fidelity(base, int8):
    from sd_onnx.home import check_folder

    assert int8 == base.with_name("tiny-int8")
    meta = check_folder(int8)
    sha = _meta(base)["source"]["sha256"]
    assert meta["precision"] == "int8"
    assert meta["variant_of"] == {"folder": "tiny", "precision": "fp32", "base": f"sha256:{sha}"}
    assert meta["components"]["unet"]["precision"] == "int8"
    assert meta["components"]["vae_decoder"]["precision"] == "fp32"
    fid = meta["fidelity"]
    for key in ("psnr_db_mean", "ssim_mean", "latent_cosine_min", "unet_speedup"):
        assert math.isfinite(fid[key]), key
    assert 0 < fid["ssim_min"] <= 1 and -1 <= fid["latent_cosine_min"] <= 1
    assert fid["size_mb"]["unet"]["int8"] < fid["size_mb"]["unet"]["fp32"]
    assert meta["quantization"]["calibration"]["steps"] == FAST["calibration_steps"]
    # untouched components are byte-identical copies
    assert (int8 / "vae_decoder" / "model.onnx").read_bytes() == (base / "vae_decoder" / "model.onnx").read_bytes()
    assert not list(base.parent.glob(".*partial*"))


def test_int8_unet_runs_integer_kernels(int8, tmp_path):
    """The stored graph is QDQ with int8 weights; ONNX Runtime's optimized graph runs integer kernels: QLinearConv
    for convolutions, MatMulIntegerToFloat for the matmuls, whose outputs stay float (no QuantizeLinear after them)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    path = int8 / "unet" / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert _initializer_types(path).get(TensorProto.INT8, 0) > 10
    # the sensitive first/last convolutions stay float: no DequantizeLinear feeds them
    producers = {o: n.op_type for n in graph.node for o in n.output}
    edge_convs = [n for n in graph.node if n.op_type == "Conv" and ("/conv_in/" in n.name or "/conv_out/" in n.name)]
    assert len(edge_convs) == 2
    for node in edge_convs:
        assert producers.get(node.input[0]) != "DequantizeLinear" and producers.get(node.input[1]) != "DequantizeLinear"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node}
    assert {"QLinearConv", "MatMulIntegerToFloat"} <= optimized, optimized
    assert "MatMul" not in optimized and "QLinearMatMul" not in optimized, optimized
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert matmuls and not quantized & {n.output[0] for n in matmuls}


def test_int8_output_stays_close_to_fp32(int8):
    """A regression guard on random tiny weights (64px, 3 DPM++ 2M Karras steps), a harsh case for int8.

    Measured: int8 vs fp32 PSNR 19.8 dB, SSIM 0.73, final-latent cosine 0.86; two fp32 images of different seeds:
    13.3 dB, SSIM 0.08, cosine 0.13. A broken quantization (wrong scales, saturated kernels) lands near the latter."""
    fid = _meta(int8)["fidelity"]
    assert fid["psnr_db_min"] > 16
    assert fid["ssim_min"] > 0.5
    assert fid["latent_cosine_min"] > 0.7


@pytest.mark.parametrize("precision,devices", [("int8", ["cpu", "openvino"]), ("bf16", ["cpu", "openvino"])])
def test_variants_generate_on_both_backends(request, precision, devices, tmp_path):
    folder = request.getfixturevalue(precision)
    for device in devices:
        out = tmp_path / device
        rc = main(["generate", "a red fox", "--model", str(folder), "--steps", "2", "--width", "64", "--height",
                   "64", "--seed", "3", "--device", device, "-o", str(out), "-q"])
        assert rc == 0 and len(list(out.glob("*.png"))) == 1


def test_bf16_stores_bfloat16_weights_and_asks_openvino_for_bf16(base, bf16):
    import onnx
    from onnx import TensorProto, numpy_helper

    from sd_onnx.quantize.halfs import bf16_to_float
    from sd_onnx.runtime.providers import resolve_device
    from sd_onnx.runtime.sessions import open_session

    src = onnx.load(str(base / "vae_decoder" / "model.onnx"))
    dst = onnx.load(str(bf16 / "vae_decoder" / "model.onnx"))
    originals = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer if t.data_type == TensorProto.FLOAT}
    halves = [t for t in dst.graph.initializer if t.data_type == TensorProto.BFLOAT16]
    assert len(halves) > 10
    for t in halves:
        original = originals[t.name[:-len("_bf16")]]
        decoded = bf16_to_float(t.raw_data, tuple(t.dims))
        np.testing.assert_allclose(decoded, original, rtol=2**-8, atol=1e-30)  # bf16 keeps 8 significant bits
    session = open_session(bf16, "vae_decoder", resolve_device("openvino"))
    assert session._compiled.get_property("INFERENCE_PRECISION_HINT") is not None
    # the UNet compiles at its first run, for that run's shapes (sessions.static_shapes): asked for in bf16
    assert open_session(bf16, "unet", resolve_device("openvino"))._config["INFERENCE_PRECISION_HINT"] == "bf16"
    meta = _meta(bf16)
    assert all(c["precision"] == "bf16" for c in meta["components"].values())
    assert meta["fidelity"]["psnr_db_min"] > 30  # weight rounding only


def test_fp16_stores_half_weights_and_keeps_float_io(fp16):
    import onnx
    from onnx import TensorProto

    for component in ("text_encoder", "unet", "vae_decoder"):
        model = onnx.load(str(fp16 / component / "model.onnx"), load_external_data=False)
        types = _initializer_types(fp16 / component / "model.onnx")
        assert types.get(TensorProto.FLOAT16, 0) > types.get(TensorProto.FLOAT, 0), component
        assert all(i.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64)
                   for i in model.graph.input)
    # The fidelity report generates the same seeds with fp32 and fp16 on the CPU provider. Measured 59.7 dB (fp16
    # rounding of weights and activations only); 40 dB is an RMS error of 2.6 levels of 255, the "within 2 levels"
    # the issue measured on CUDA. A weight stored wrongly (clamped, truncated, wrong dtype) lands far below.
    assert _meta(fp16)["fidelity"]["psnr_db_min"] > 40


def _float_weights(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
            if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}


def _model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def test_fp16_stores_each_weight_once_at_half_the_size(base, fp16):
    """#20: the fp16 variant held an fp32 copy of every weight beside the fp16 one (150 % of fp32). Every float
    weight of the base must appear exactly once in the variant, in fp16 (values rounded, not clamped), with no other
    float weight added, and the weights take at most 52 % of fp32's bytes."""
    total = {"fp32": 0, "fp16": 0}
    for component in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        original = _float_weights(base / component / "model.onnx")
        half = _float_weights(fp16 / component / "model.onnx")
        assert set(half) == set(original), component  # nothing missing, nothing stored a second time
        for name, values in original.items():
            assert half[name].dtype == np.float16, (component, name)
            # fp16 keeps 11 significant bits; ORT's converter lifts values below fp16's smallest subnormal
            # (5.96e-8) to it instead of flushing them to zero
            np.testing.assert_allclose(half[name].astype(np.float32), values, rtol=2**-11, atol=6e-8)
        assert sorted(fp16.joinpath(component).iterdir()) == sorted(fp16 / component / p.name
                                                                  for p in (base / component).iterdir())
        weights = {k: sum(a.nbytes for a in w.values()) for k, w in (("fp32", original), ("fp16", half))}
        assert weights["fp16"] <= 0.52 * weights["fp32"], component
        total["fp32"] += _model_bytes(base / component)
        total["fp16"] += _model_bytes(fp16 / component)
    # Whole files, graph structure included: 0.507 measured on the tiny folder (the UNet's own file 0.523: its
    # 140 KB of node definitions do not halve, a share that is 4 % here and 0.004 % at full size).
    assert total["fp16"] <= 0.52 * total["fp32"], total



def _chain_model(tmp_path: Path, nodes: list, **constants: float) -> Path:
    """A one-input graph x [1, 8] -> out [1, 8] of `nodes`, with each constant as a [1, 8] weight and `one`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = [numpy_helper.from_array(np.full((1, 8), v, np.float32), k) for k, v in {**constants, "one": 1}.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8])], weights)
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    return src

def test_fp16_keeps_overflowing_nodes_in_fp32(tmp_path):
    """A node whose output exceeds fp16's range is measured and kept fp32, so the result stays finite."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from sd_onnx.quantize.halfs import convert_fp16

    src = _chain_model(tmp_path, [helper.make_node("Mul", ["x", "big"], ["y"], name="scale_up"),
                                  helper.make_node("ReduceMean", ["y"], ["m"], name="mean", keepdims=1),
                                  helper.make_node("Div", ["y", "m"], ["z"], name="normalise"),
                                  helper.make_node("Add", ["z", "one"], ["out"], name="shift")], big=3e4)
    x = np.linspace(1, 4, 8, dtype=np.float32)[None]
    info = convert_fp16(src, tmp_path / "dst" / "model.onnx", [{"x": x}])
    assert {"scale_up", "mean", "normalise"} <= set(info["fp32_nodes"]) and "shift" not in info["fp32_nodes"]
    out = ort.InferenceSession(str(tmp_path / "dst" / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    expected = x * 3e4 / np.mean(x * 3e4) + 1
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=2e-3)
    half = onnx.load(str(tmp_path / "dst" / "model.onnx"))
    types = {t.name: t.data_type for t in half.graph.initializer}
    assert types == {"big": TensorProto.FLOAT16, "one": TensorProto.FLOAT16}  # the fp32 node's weight too: once, fp16
    casts = {n.output[0]: n for n in half.graph.node if n.op_type == "Cast"}
    # One fp32 island: the blocked chain reads fp32 tensors directly, no fp32 -> fp16 -> fp32 pair between its nodes.
    assert not [n for n in casts.values() if n.input[0] in casts]
    assert [n.input[1] for n in half.graph.node if n.name == "scale_up"] == [casts["big_cast_to_fp32"].output[0]]


def test_fp16_keeps_a_weight_beyond_fp16_range_in_fp32_once(tmp_path):
    """A weight that fp16 cannot hold (1e5 > 65504) is stored once, in fp32, and only fp32 nodes read it."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from sd_onnx.quantize.halfs import convert_fp16

    src = _chain_model(tmp_path, [helper.make_node("Mul", ["x", "huge"], ["y"], name="up"),
                                  helper.make_node("Div", ["y", "huge"], ["z"], name="down"),
                                  helper.make_node("Add", ["z", "one"], ["out"], name="shift")], huge=1e5)
    x = np.linspace(-1, 1, 8, dtype=np.float32)[None] / 1e4  # y stays small: only the weight itself is too wide
    info = convert_fp16(src, tmp_path / "dst" / "model.onnx", [{"x": x}])
    assert info["fp32_weights"] == ["huge"] and {"up", "down"} <= set(info["fp32_nodes"])
    half = onnx.load(str(tmp_path / "dst" / "model.onnx"))
    assert {t.name: t.data_type for t in half.graph.initializer} == {"huge": TensorProto.FLOAT,
                                                                     "one": TensorProto.FLOAT16}
    out = ort.InferenceSession(str(tmp_path / "dst" / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    np.testing.assert_allclose(out, x + 1, rtol=1e-3)


def test_generate_precision_choice(base, int8, bf16, fp16, tmp_path, monkeypatch):
    import sd_onnx.runtime.providers as providers
    from sd_onnx.errors import ModelFolderError
    from sd_onnx.runtime.variants import choose_variant

    monkeypatch.setattr(providers, "ort_providers", lambda: ["CPUExecutionProvider"])  # auto: the CPU (test_gpu: GPUs)
    assert choose_variant(base, "auto", "auto", [])[0] == int8  # a CPU without BF16: int8 when it exists
    assert choose_variant(base, "auto", "auto", ["AVX512-BF16"])[0] == bf16  # BF16 without VNNI: bf16 first
    assert choose_variant(base, "auto", "cpu", ["AVX512-BF16"])[0] == int8  # ORT widens bf16 weights to fp32
    assert choose_variant(base, "auto", "cuda", [])[0] == fp16
    assert choose_variant(base, "fp32", "auto", [])[0] == base
    assert choose_variant(int8, "fp32", "cpu", [])[0] == base  # back from a variant to its original
    assert choose_variant(int8, "auto", "cuda", [])[0] == int8  # a variant named explicitly is used as given
    lonely = Path(shutil.copytree(base, tmp_path / "lonely"))
    assert choose_variant(lonely, "auto", "cpu", [])[0] == lonely
    with pytest.raises(ModelFolderError, match="sd-onnx quantize .*lonely --int8"):
        choose_variant(lonely, "int8", "cpu", [])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd-onnx: error:"), err
    return err[0]


def test_bad_input_is_one_line_and_leaves_nothing(base, int8, tmp_path, capsys, monkeypatch):
    import sd_onnx.runtime.providers as providers

    assert main(["quantize", str(tmp_path / "missing"), "--int8"]) == 2
    assert "not found" in _error_line(capsys)
    assert main(["quantize", str(int8), "--int8"]) == 2
    assert "already a int8 variant" in _error_line(capsys)
    assert main(["quantize", str(base), "--int8", "--components", "unet,vae"]) == 2
    assert "unknown component 'vae'" in _error_line(capsys)
    monkeypatch.setattr(providers, "cpu_info", lambda: {"flags": ["SSE4.2", "AVX", "AVX2"]})
    out = tmp_path / "bf16-here"
    assert main(["quantize", str(base), "--bf16", "-o", str(out)]) == 2
    assert "no AVX512-BF16" in _error_line(capsys)
    assert main(["quantize", str(base), "--int8", "-o", str(int8)]) == 2
    assert "already exists" in _error_line(capsys)
    assert main(["quantize", str(base), "--int8", "-o", str(out), "--calibration-size", "100"]) == 2
    assert "--calibration-size must be a multiple of 8" in _error_line(capsys)
    assert main(["quantize", str(base), "--int8", "-o", str(out), "--fidelity-steps", "0"]) == 2
    assert "--fidelity-steps must be at least 1" in _error_line(capsys)
    assert main(["quantize", str(base), "--int8", "--calibration-prompts", str(tmp_path / "none.txt")]) == 2
    assert "cannot read calibration prompts" in _error_line(capsys)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    assert main(["quantize", str(base), "--int8", "--calibration-prompts", str(tmp_path / "empty.txt")]) == 2
    assert "holds no prompts" in _error_line(capsys)
    monkeypatch.setitem(sys.modules, "sympy", None)  # the quantize extra half-installed: found before any work
    assert main(["quantize", str(base), "--int8", "-o", str(out)]) == 2
    assert "quantize extra (sympy is missing)" in _error_line(capsys)
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_a_failure_midway_removes_the_partial_folder(base, tmp_path, capsys):
    broken = Path(shutil.copytree(base, tmp_path / "broken"))
    (broken / "unet" / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(Exception):
        _quantize(broken, "int8", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial*"))


def test_auto_device_sends_bf16_variants_to_openvino():
    from sd_onnx.runtime.providers import resolve_device

    cpu = ["CPUExecutionProvider"]
    assert resolve_device("auto", cpu, ["CPU"], precision="bf16").backend == "openvino"
    assert resolve_device("auto", cpu, [], precision="bf16").name == "cpu"  # no OpenVINO: ORT widens to fp32
    assert resolve_device("auto", ["CUDAExecutionProvider", *cpu], ["CPU"], precision="bf16").name == "cuda"
    # without VNNI, ONNX Runtime's int8 kernels (test_cpu_arithmetic has the CPUs with VNNI)
    assert resolve_device("auto", cpu, ["CPU"], precision="int8", cpu_flags=["AVX2", "FMA"]).name == "cpu"


def test_the_only_installed_model_stays_the_default_after_quantizing(base, int8, tmp_path, monkeypatch):
    """A variant beside its original is not a second model: `generate` without --model still finds one."""
    from sd_onnx.home import find_model, installed_models

    monkeypatch.setenv("SD_ONNX_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    for folder in (base, int8):
        (tmp_path / "models" / folder.name).symlink_to(folder)
    assert installed_models() == [tmp_path / "models" / base.name]
    assert find_model(None).name == base.name
    from sd_onnx.info import format_report, machine_report

    report = machine_report()
    assert report["variants"] == {base.name: ["int8"]}
    assert f"{base.name} (+int8)" in format_report(report)


def test_quantize_runs_without_torch(base, tmp_path):
    """quantize needs onnx and onnxruntime only: a subprocess where torch, diffusers and transformers are
    unimportable (None in sys.modules, which is also what makes importlib's find_spec report them missing)."""
    import subprocess

    code = (
        "import sys; sys.modules.update(torch=None, diffusers=None, transformers=None); "
        "from sd_onnx.cli import main; "
        f"rc = main(['quantize', {str(base)!r}, '--int8', '-o', {str(tmp_path / 'int8')!r}, '--calibration-steps', "
        "'2', '--calibration-size', '64', '--fidelity-steps', '2', '-q']); "
        "assert not any(sys.modules.get(m) for m in ('torch', 'diffusers', 'transformers')); sys.exit(rc)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "int8" / "unet" / "model.onnx").is_file()


def test_int8_unet_session_runs_without_the_memory_arena(base, int8):
    """The int8 UNet is there to save memory: its session has no arena (measured 2.19 -> 1.89 GB at full size)."""
    from sd_onnx.runtime.providers import resolve_device
    from sd_onnx.runtime.sessions import open_session

    cpu = resolve_device("cpu")
    arena = lambda folder, c="unet", **kw: open_session(folder, c, cpu, **kw)._session.get_session_options().enable_cpu_mem_arena  # noqa: E731
    assert arena(int8) is False
    assert arena(base) is True and arena(int8, "vae_decoder") is True
    assert arena(base, low_memory=True) is False


def test_int8_unet_runs_at_sizes_not_a_multiple_of_64(base, int8):
    """The exported UNet upsamples to its skip connections' sizes (latent 9x17 = 72x136 px); quantization keeps
    that graph working and close to fp32."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, 4, 9, 17), dtype=np.float32), "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 77, 64), dtype=np.float32)}
    outs = [ort.InferenceSession(str(f / "unet" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for f in (base, int8)]
    assert outs[1].shape == (1, 4, 9, 17)
    cosine = float((outs[0] * outs[1]).sum() / np.linalg.norm(outs[0]) / np.linalg.norm(outs[1]))
    assert cosine > 0.9, cosine


def test_info_names_what_auto_runs_for_each_model(base, int8, bf16, tmp_path, monkeypatch):
    """#22: `sd-onnx info` shows, per installed model, the variant and the path --device auto picks, and why."""
    import sd_onnx.info as info
    import sd_onnx.runtime.providers as providers

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    for folder in (base, int8, bf16):
        (home / "models" / folder.name).symlink_to(folder)
    monkeypatch.setenv("SD_ONNX_HOME", str(home))
    monkeypatch.setattr(providers, "openvino_devices", lambda: ["CPU"])
    monkeypatch.setattr(info, "openvino_devices", lambda: ["CPU"])
    zen5 = ["SSE4.2", "AVX", "AVX2", "FMA", "AVX-512", "AVX512-VNNI", "AVX512-BF16"]
    for flags, expected in ((zen5, f"  {base.name}: int8 on openvino (int8 variant, its float ops in bf16"),
                            (["SSE4.2", "AVX", "AVX2", "FMA"], f"  {base.name}: int8 on cpu (best installed")):
        monkeypatch.setattr(providers, "cpu_info", lambda flags=flags: {"model": "fake", "logical_cores": 2,
                                                                        "usable_cores": 2, "flags": flags})
        monkeypatch.setattr(info, "cpu_info", providers.cpu_info)
        text = info.format_report(info.machine_report())
        assert expected in text, text


def test_batch_runs_the_variant_generate_picks(base, int8, tmp_path):
    """`sd-onnx batch` chooses the variant as generate --precision auto does (#21 with #22): with an int8 variant
    beside the model and --device cpu, both run it, and the images are the same."""
    import json

    from PIL import Image

    from sd_onnx.batch import run_batch
    from sd_onnx.cli import main

    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "a cat", "seed": 3, "steps": 2, "width": 64, "height": 64,
                               "sampler_name": "Euler", "cfg_scale": 7}) + "\n")
    said: list[str] = []
    run_batch(job, tmp_path / "batch", str(base), device="cpu", workers=1, say=said.append)
    assert f"model: {int8.name}, precision int8 (variant found beside the model; --precision fp32 for the original)" \
        in said
    record = json.loads((tmp_path / "batch" / "manifest.jsonl").read_text())
    assert main(["generate", "a cat", "--model", str(base), "--device", "cpu", "--seed", "3", "--steps", "2",
                 "--width", "64", "--height", "64", "--sampler", "Euler", "--cfg", "7", "--randn-source", "gpu",
                 "-o", str(tmp_path / "gen"), "-q"]) == 0
    made = np.asarray(Image.open(tmp_path / "batch" / record["file"]))
    np.testing.assert_array_equal(made, np.asarray(Image.open(next((tmp_path / "gen").glob("*.png")))))


def test_int8_float_ops_in_bf16_fidelity(base, int8):
    """#22: auto runs an int8 variant on OpenVINO with its float ops in bf16 on CPUs with BF16 and VNNI. Its images
    are held to what the int8 variant gave before on ONNX Runtime, both against the fp32 image (tiny model, 8 Euler
    steps, 64x64, CFG 7, two seeds). int8 noise dominates both: measured on this tiny model, PSNR against fp32
    20-23 dB for each of ORT int8, OpenVINO int8 and OpenVINO int8 with bf16 float ops (bf16 within 1 dB of ORT on
    average), and 13 dB for an fp32 image of another seed; so: within 3 dB of ORT's int8, and 5 dB above another
    seed. On a CPU without BF16, OpenVINO ignores the hint (fp32 float ops)."""
    from dataclasses import replace

    from sd_onnx.runtime.pipeline import GenerateRequest, generate
    from sd_onnx.runtime.providers import openvino_devices, resolve_device

    if "CPU" not in openvino_devices():
        pytest.skip("OpenVINO has no CPU device here")
    bf16_ops = replace(resolve_device("openvino", ["CPUExecutionProvider"], ["CPU"]), inference_precision="bf16")

    def image(folder, device, seed):
        request = GenerateRequest("a black house cat", "blurry", steps=8, cfg_scale=7.0, sampler="Euler", seed=seed,
                                  width=64, height=64)
        return np.asarray(generate(folder, request, device=device).images[0].image, dtype=np.float64)

    def psnr(a, b):
        return 10 * np.log10(255.0**2 / float(np.mean((a - b) ** 2)))

    scores = {"ort": [], "bf16": [], "other": []}
    for seed in (1234, 7):
        fp32 = image(base, "cpu", seed)
        scores["ort"].append(psnr(fp32, image(int8, "cpu", seed)))
        scores["bf16"].append(psnr(fp32, image(int8, bf16_ops, seed)))
        scores["other"].append(psnr(fp32, image(base, "cpu", seed + 1)))
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    print(f"PSNR against fp32: int8 on ORT {mean['ort']:.1f} dB, int8 with bf16 float ops on OpenVINO "
          f"{mean['bf16']:.1f} dB, another seed {mean['other']:.1f} dB")
    assert mean["bf16"] >= mean["ort"] - 3.0
    assert mean["bf16"] >= mean["other"] + 5.0


def test_int8_unet_on_openvino_is_static_and_generates_as_the_dynamic_one(base, int8, monkeypatch):
    """#22: OpenVINO compiles an int8 UNet for the request's shapes (sessions.static_shapes), and its other
    components dynamic. A generation and a hires fix (whose second pass changes the UNet's shapes: one dynamic
    compile after the static one) match the same int8 variant run all dynamic: static and dynamic kernels sum in
    other orders, and where that moves an activation across an int8 rounding boundary the step differs by one
    quantum, and over the steps (and the hires pass) that grows (measured: max 2 levels, mean 0.28; with hires max 4,
    mean 0.64; fp32 graphs agree within 1 level). Bound: at most 8 levels, mean under 1.5, a tenth of the int8
    variant's own distance to fp32 on this model (22 dB, about 15 levels RMS); a stale or wrongly shaped compile is
    tens of levels off."""
    import sd_onnx.runtime.sessions as sessions
    from sd_onnx.runtime.pipeline import GenerateRequest, generate
    from sd_onnx.runtime.providers import openvino_devices, resolve_device

    if "CPU" not in openvino_devices():
        pytest.skip("OpenVINO has no CPU device here")
    ov = resolve_device("openvino", ["CPUExecutionProvider"], ["CPU"])
    assert sessions.open_session(int8, "unet", ov)._static == {}  # compiled at its first run
    assert sessions.open_session(int8, "vae_decoder", ov)._static is None
    for extra in ({}, {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6,
                       "hr_second_pass_steps": 2}):
        request = GenerateRequest("a cat", "", steps=3, cfg_scale=7.0, sampler="Euler", seed=5, width=64, height=64,
                                  **extra)
        static = np.asarray(generate(int8, request, device=ov).images[0].image, dtype=np.int16)
        with monkeypatch.context() as patch:
            patch.setattr(sessions, "static_shapes", lambda folder, component, device: False)
            dynamic = np.asarray(generate(int8, request, device=ov).images[0].image, dtype=np.int16)
        assert static.shape == dynamic.shape
        diff = np.abs(static - dynamic)
        print(f"static against dynamic int8: max {diff.max()} levels, mean {diff.mean():.3f}")
        assert diff.max() <= 8 and diff.mean() < 1.5


def test_static_unet_compiles_while_loading_not_in_the_first_step(base, int8):
    """The pipeline asks a static OpenVINO UNet to compile for the run's shapes before sampling (GuidedUNet.prepare):
    the compile is counted as the UNet's load, and the first step runs the compiled model it made (no fallback to
    the dynamic one, which would mean prepare guessed other shapes than the sampler feeds)."""
    from sd_onnx.runtime.model import LoadedModel
    from sd_onnx.runtime.pipeline import GenerateRequest, run
    from sd_onnx.runtime.providers import openvino_devices, resolve_device

    if "CPU" not in openvino_devices():
        pytest.skip("OpenVINO has no CPU device here")
    ov = resolve_device("openvino", ["CPUExecutionProvider"], ["CPU"])
    for cfg, batch in ((7.0, 1), (7.0, 2), (1.0, 2)):
        model = LoadedModel(int8, ov, keep_loaded=True)
        runs = []
        unet = model.session("unet")
        real_run = unet.run
        unet.run = lambda feeds: runs.append(unet._static) or real_run(feeds)
        request = GenerateRequest("a cat", "", steps=2, cfg_scale=cfg, sampler="Euler", seed=5, width=64, height=64,
                                  batch_size=batch)
        list(run(model, request))
        assert runs and all(static is not None and static["sample"][0] == batch * (1 if cfg == 1.0 else 2)
                            for static in runs), runs


def test_quantize_a_hard_linked_model_folder(base, tmp_path):
    """A model folder copied with `cp -al` (every file hard-linked): ONNX refuses to read external weights from a
    file with several links (its hardlink-attack guard), which ended quantize in a traceback; the typed graph now
    reads the working copy it makes anyway."""
    linked = tmp_path / "linked"
    for path in base.rglob("*"):
        target = linked / path.relative_to(base)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    assert (linked / "unet" / "model.onnx_data").stat().st_nlink > 1
    variant = _quantize(linked, "int8")
    assert (variant / "unet" / "model.onnx").is_file()
