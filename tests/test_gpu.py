"""#20's GPU path without a GPU: the CUDA graph fusions and their cache, the options each GPU provider gets, the
variant --precision auto picks per device, and --low-memory on a GPU. Only the provider list is faked, and
onnxruntime.InferenceSession where a CUDA session would open: no test opens one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sd_onnx.cli import main
from sd_onnx.runtime.providers import Device, provider_options, resolve_device

CPU = "CPUExecutionProvider"
CUDA = Device("cuda", "ort", ("CUDAExecutionProvider", CPU))


class RecordedSession:
    """Stands in for onnxruntime.InferenceSession: keeps what it was given, answers the I/O questions from the
    graph file, and runs as a VAE decoder would (8x the latent's size), counting its calls."""

    opened: list[dict] = []

    def __init__(self, path, options=None, providers=None):
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        init = {t.name for t in graph.initializer}
        self._inputs = [_Arg(i.name) for i in graph.input if i.name not in init]
        self._outputs = [_Arg(o.name) for o in graph.output]
        self.record = {"path": Path(path), "options": options, "providers": providers, "calls": []}
        RecordedSession.opened.append(self.record)

    def get_providers(self):
        return [p if isinstance(p, str) else p[0] for p in self.record["providers"]]

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs

    def run(self, names, feeds):
        x = next(iter(feeds.values()))
        self.record["calls"].append(x.shape)
        return [np.zeros((x.shape[0], 3, x.shape[2] * 8, x.shape[3] * 8), np.float32)]


class _Arg:
    def __init__(self, name):
        self.name, self.type = name, "tensor(float)"


@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    """CUDA "installed" (the provider list) and InferenceSession recorded; a private cache per test."""
    import onnxruntime

    import sd_onnx.runtime.providers as providers

    monkeypatch.setenv("SD_ONNX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SD_ONNX_GPU_MEM_LIMIT", raising=False)
    monkeypatch.setattr(providers, "ort_providers", lambda: ["CUDAExecutionProvider", CPU])
    monkeypatch.setattr(onnxruntime, "InferenceSession", RecordedSession)
    RecordedSession.opened = []
    return RecordedSession.opened


def _entries(root: Path) -> dict[str, dict]:
    return {e.name: json.loads((e / "stamp.json").read_text()) for e in root.iterdir() if (e / "stamp.json").is_file()}


def _op_types(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_cuda_unet_is_fused_once_cached_apart_from_the_cpu_graph(tiny_model, fake_cuda, monkeypatch):
    from sd_onnx.runtime import gpu_graphs
    from sd_onnx.runtime.sessions import open_session, optimized_cache_dir

    folder = tiny_model("sd1")
    open_session(folder, "unet", CUDA)
    root = optimized_cache_dir()
    (entry, stamp), = _entries(root).items()
    assert stamp["providers"] == list(CUDA.providers)
    fused = root / entry / "model.onnx"
    # ONNX Runtime's GPU fusions ran on the UNet: their CUDA-only ops are in the cached graph, not in the folder's
    assert {"GroupNorm", "NhwcConv", "BiasSplitGelu", "MultiHeadAttention"} <= _op_types(fused)
    assert not {"GroupNorm", "NhwcConv"} & _op_types(folder / "unet" / "model.onnx")
    first = fake_cuda[-1]
    assert first["path"] == fused
    assert first["providers"][0][0] == "CUDAExecutionProvider"

    # The second start reuses the entry: no fusion runs (it would fail the test), the same graph opens.
    def no_fusion(*args):
        raise AssertionError("fused again")

    monkeypatch.setattr(gpu_graphs, "fuse_for_gpu", no_fusion)
    open_session(folder, "unet", CUDA)
    assert fake_cuda[-1]["path"] == fused and len(_entries(root)) == 1

    # The CPU's optimized graph of the same file is another entry: neither overwrites the other.
    import onnxruntime
    from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

    monkeypatch.setattr(onnxruntime, "InferenceSession", InferenceSession)  # a real CPU session
    open_session(folder, "unet", resolve_device("cpu"))
    entries = _entries(root)
    assert sorted(s["providers"] for s in entries.values()) == [[CPU], list(CUDA.providers)]
    assert {"GroupNorm", "NhwcConv"}.isdisjoint(_op_types(next(root / e / "model.onnx" for e, s in entries.items()
                                                                if s["providers"] == [CPU])))


def test_gpu_fusions_run_on_an_fp16_unet_and_keep_each_weight_once(tiny_model, tmp_path):
    """The fusions read GroupNorm's parameters from the graph; on an fp16 variant ONNX Runtime's pass failed ("Raw
    data size does not match") until gpu_graphs converts them to the fp32 its kernel takes."""
    import onnx

    from sd_onnx.quantize.halfs import convert_fp16
    from sd_onnx.runtime.gpu_graphs import fuse_for_gpu

    rng = np.random.default_rng(0)
    feeds = [{"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32), "timestep": np.array([500.0], np.float32),
              "encoder_hidden_states": rng.standard_normal((2, 77, 64), dtype=np.float32)}]
    half = tmp_path / "fp16" / "model.onnx"
    convert_fp16(tiny_model("sd1") / "unet" / "model.onnx", half, feeds)
    (tmp_path / "gpu").mkdir()
    stats = fuse_for_gpu(half, tmp_path / "gpu" / "model.onnx", "unet")
    assert stats.get("GroupNorm", 0) + stats.get("SkipGroupNorm", 0) > 0 and stats.get("NhwcConv", 0) > 0
    weights = onnx.load(str(tmp_path / "gpu" / "model.onnx")).graph.initializer
    names = [t.name for t in weights]
    assert len(names) == len(set(names))
    big = [t for t in weights if len(t.raw_data) >= 1024]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)  # the weights stay fp16


@pytest.mark.parametrize("provider,device", [("CUDAExecutionProvider", "cuda"), ("ROCMExecutionProvider", "rocm"),
                                             ("MIGraphXExecutionProvider", "migraphx"),
                                             ("DmlExecutionProvider", "dml")])
def test_auto_picks_the_gpu_and_its_fp16_variant(tiny_model, tmp_path, monkeypatch, provider, device):
    """Faking only the provider list: --device auto picks the GPU, and --precision auto its fp16 variant (it used
    to pick the CPU's int8 variant, as `auto` was read as the CPU)."""
    import sd_onnx.runtime.providers as providers
    from sd_onnx.runtime.variants import base_identity, choose_variant

    monkeypatch.setattr(providers, "ort_providers", lambda: [provider, CPU])
    base = Path(shutil.copytree(tiny_model("sd1"), tmp_path / "tiny"))
    meta = json.loads((base / "sd_onnx.json").read_text())
    for precision in ("int8", "fp16"):  # variant folders as quantize writes their metadata (graphs not read here)
        variant = Path(shutil.copytree(base, tmp_path / f"tiny-{precision}"))
        (variant / "sd_onnx.json").write_text(json.dumps(dict(meta, precision=precision, variant_of={
            "folder": base.name, "precision": "fp32", "base": base_identity(base, meta)})))
    assert resolve_device("auto").providers == (provider, CPU)
    assert choose_variant(base, "auto", "auto", [])[0] == tmp_path / "tiny-fp16"
    assert choose_variant(base, "auto", device, [])[0] == tmp_path / "tiny-fp16"
    monkeypatch.setattr(providers, "ort_providers", lambda: [CPU])
    assert choose_variant(base, "auto", "auto", [])[0] == tmp_path / "tiny-int8"


def test_each_gpu_provider_gets_its_options(monkeypatch):
    monkeypatch.delenv("SD_ONNX_GPU_MEM_LIMIT", raising=False)
    cuda, cpu = provider_options(CUDA)
    assert cpu == CPU
    assert cuda == ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE",
                                              "cudnn_conv_use_max_workspace": "1",
                                              "arena_extend_strategy": "kSameAsRequested",
                                              "do_copy_in_default_stream": "1"})
    rocm = provider_options(Device("rocm", "ort", ("ROCMExecutionProvider", CPU)))[0]
    assert rocm[1]["miopen_conv_exhaustive_search"] == "1" and rocm[1]["arena_extend_strategy"] == "kSameAsRequested"
    assert provider_options(Device("dml", "ort", ("DmlExecutionProvider", CPU))) == ["DmlExecutionProvider", CPU]
    monkeypatch.setenv("SD_ONNX_GPU_MEM_LIMIT", "1.5G")
    low = provider_options(CUDA, low_memory=True)[0][1]
    assert low["gpu_mem_limit"] == str(3 << 29) and low["cudnn_conv_algo_search"] == "HEURISTIC"
    assert low["cudnn_conv_use_max_workspace"] == "0"
    migraphx = provider_options(Device("migraphx", "ort", ("MIGraphXExecutionProvider", CPU)))[0]
    assert migraphx == ("MIGraphXExecutionProvider", {"migraphx_arena_extend_strategy": "kSameAsRequested",
                                                      "migraphx_mem_limit": str(3 << 29)})
    assert provider_options(resolve_device("cpu")) == [CPU]


def test_low_memory_on_a_gpu_caps_vram_and_decodes_in_tiles(tiny_model, fake_cuda, monkeypatch):
    """--low-memory with CUDA: what InferenceSession receives (the VRAM ceiling of SD_ONNX_GPU_MEM_LIMIT, no CPU
    arena) and a VAE decode in tiles (a 1024 px image: latent 128, tiles of 64)."""
    from sd_onnx.runtime.decode import decode
    from sd_onnx.runtime.model import LoadedModel

    monkeypatch.setenv("SD_ONNX_GPU_MEM_LIMIT", "2G")
    model = LoadedModel(tiny_model("sd1"), "auto", low_memory=True)
    assert model.device.name == "cuda"
    decode(model, np.zeros((1, 4, 128, 128), np.float32))
    opened = fake_cuda[-1]
    assert opened["providers"][0] == ("CUDAExecutionProvider", {
        "cudnn_conv_algo_search": "HEURISTIC", "cudnn_conv_use_max_workspace": "0",
        "arena_extend_strategy": "kSameAsRequested", "do_copy_in_default_stream": "1", "gpu_mem_limit": str(2 << 30)})
    assert opened["options"].enable_cpu_mem_arena is False
    assert "NhwcConv" in _op_types(opened["path"])  # the VAE decoder's fused CUDA graph
    assert len(opened["calls"]) > 1 and all(shape[2] <= 64 and shape[3] <= 64 for shape in opened["calls"])


def test_a_bad_vram_ceiling_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SD_ONNX_GPU_MEM_LIMIT", "two gigabytes")
    rc = main(["generate", "a fox", "--model", str(tiny_model("sd1")), "--steps", "1", "--width", "64", "--height",
               "64", "--device", "cpu", "-o", str(tmp_path), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "SD_ONNX_GPU_MEM_LIMIT='two gigabytes'" in err[0], err
