"""ONNX Runtime and OpenVINO behind one small interface: open a component, run it on named NumPy inputs."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from sd_onnx.errors import ModelFolderError, SdOnnxError, first_line
from sd_onnx.runtime import gpu_graphs, ort_cache
from sd_onnx.runtime.ort_cache import OptimizedModelCache
from sd_onnx.runtime.providers import Device, provider_options, usable_cores

NOTICE_BYTES = 100 << 20  # a model this large takes seconds to optimize: say why the first start is slow


class Session(Protocol):
    input_types: dict[str, str]

    def run(self, feeds: dict[str, NDArray]) -> list[NDArray]: ...


class OrtSession:
    def __init__(self, path: Path, device: Device, threads: int | None = None, full_optimization: bool = True,
                 low_memory: bool = False, cache: OptimizedModelCache | None = None,
                 overrides: dict[str, NDArray] | None = None, label: str | None = None):
        """`cache`: load the graph ONNX Runtime optimized at an earlier start, or save it for the next one.
        `overrides`: initializer name -> array that replaces it (LoRA, textual inversion); never cached.
        `label`: the component's name in messages (default: the model file's folder)."""
        self._overrides = overrides or {}
        if self._overrides:
            cache = None  # the optimized graph would hold the patched weights
        stamp = cache.stamp(path) if cache else None
        cached = cache.lookup(stamp) if cache else None
        staged = cache.staging(stamp) if cache and not cached else None
        if cache and not cached and staged is None:
            print(f"sd-onnx: warning: cannot keep {path.parent.name}'s optimized graph in {cache.root} (no room on "
                  "its disk, or not writable); it is optimized again at every start", file=sys.stderr)
        elif staged and ort_cache.source_bytes(stamp) > NOTICE_BYTES:
            print(f"sd-onnx: optimizing {path.parent.name} for this CPU, once (kept in {cache.root})", file=sys.stderr)
        try:
            self._session = self._open(cached or path, device, threads, full_optimization, low_memory, staged,
                                       self._overrides)
        except SdOnnxError:
            if not (cached or staged):
                raise
            # A damaged cache entry, or a disk that filled while saving: the source model alone decides.
            cache.discard(staged or cached.parent)
            self._session = self._open(path, device, threads, full_optimization, low_memory, None)
            staged = None
        if staged:
            cache.commit(staged, stamp)
        used = self._session.get_providers()
        if device.providers and used[0] != device.providers[0]:
            print(f"sd-onnx: warning: {device.providers[0]} failed to load {label or path.parent.name}; "
                  f"running on {used[0]}", file=sys.stderr)
        self.input_types = {i.name: i.type for i in self._session.get_inputs()}
        self._outputs = [o.name for o in self._session.get_outputs()]

    @staticmethod
    def _open(path: Path, device: Device, threads: int | None, full_optimization: bool, low_memory: bool,
              save_to: Path | None, overrides: dict[str, NDArray] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        keep = _add_overrides(options, path, overrides) if overrides else []
        if low_memory:  # no arena: freed activations go back to the system instead of being kept for reuse
            options.enable_cpu_mem_arena = False
        if "DmlExecutionProvider" in device.providers:  # DirectML runs neither memory patterns nor parallel nodes
            options.enable_mem_pattern = False
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if full_optimization
                                            else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        options.intra_op_num_threads = threads or usable_cores()
        options.log_severity_level = 3
        if save_to is not None:
            options.optimized_model_filepath = str(save_to / ort_cache.MODEL)
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", ort_cache.DATA)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        providers = provider_options(device, low_memory)  # a bad SD_ONNX_GPU_MEM_LIMIT is the user's, not ORT's
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
            session._sd_onnx_overrides = keep  # ONNX Runtime reads the overriding arrays in place: keep them alive
            return session
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException types
            raise SdOnnxError(f"{path}: ONNX Runtime cannot load it ({first_line(e, 300)})") from None

    def run(self, feeds: dict[str, NDArray]) -> list[NDArray]:
        return self._session.run(self._outputs, cast_feeds(feeds, self.input_types))


def _add_overrides(options, path: Path, overrides: dict[str, NDArray]) -> list:
    """Hand ONNX Runtime the replacement initializers. Weights kept in external data are replaced at load, before
    any graph optimization (add_external_initializers); inline ones (the text encoder) as session initializers,
    which ONNX Runtime also accepts with another shape (the token table grown by textual-inversion vectors).
    The OrtValues point into the arrays: the caller keeps them alive as long as the session."""
    import onnxruntime as ort

    external = _external_names(path)
    ext = [(name, a) for name, a in overrides.items() if name in external]
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for _, a in ext]
    if ext:
        options.add_external_initializers([name for name, _ in ext], values)
    for name, a in overrides.items():
        if name not in external:
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
            values.append(value)
            options.add_initializer(name, value)
    return values


def _external_names(path: Path) -> set[str]:
    """Initializers of `path` stored in external data, from weights.json (the runtime reads no ONNX protobuf)."""
    import json

    try:
        layers = json.loads((path.parent / "weights.json").read_text())["layers"]
    except (OSError, ValueError, KeyError):
        return set()
    return {e["initializer"] for e in layers.values() if e.get("file") != path.name}


class OpenVinoSession:
    """An OpenVINO compiled model. `static_shapes` (see static_shapes below): compiled at the first run (or prepare)
    for the shapes of its inputs, the model reshaped to them as optimum-intel and FastSD CPU run it (6-8 % faster int8
    UNet steps measured, docs/benchmarks.md "#22"); the first run with other shapes (a hires pass, another size on a
    server) compiles the dynamic model once and keeps it, so changing sizes never recompiles twice. With the cache,
    each compile is done once per machine."""

    def __init__(self, path: Path, device: Device, threads: int | None = None, cache_dir: Path | None = None,
                 precision: str = "f32", static_shapes: bool = False):
        import openvino as ov

        self._core = ov.Core()
        # f32 unless the folder is a bf16 variant: OpenVINO's own default on BF16 CPUs is bf16, which would make
        # an "fp32" run silently lower precision.
        self._config = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            self._core.set_property({"CACHE_DIR": str(cache_dir)})
        self._path, self._device = path, device.openvino_device
        self._static: dict[str, tuple] | None = {} if static_shapes else None  # {} until the first run
        self._compiled = self._request = self._unshaped = None
        if not static_shapes:
            self._compile(str(path))
        else:  # read now (a broken file fails here, as a dynamic session's would), compiled at the first run
            self._unshaped = self._read()
            self.input_types = self._types(self._unshaped.inputs)

    def _read(self):
        try:
            return self._core.read_model(str(self._path))
        except RuntimeError as e:
            raise SdOnnxError(f"{self._path}: OpenVINO cannot read it ({first_line(e, 300)})") from None

    @staticmethod
    def _types(ports) -> dict[str, str]:
        # by every name of a port: its any_name may be a tensor it feeds (the timestep's Cast output)
        return {name: _ov_type(port.get_element_type()) for port in ports for name in port.get_names()}

    def _compile(self, model) -> None:
        self._compiled = self._request = None  # the static model goes before the dynamic one is made
        try:
            self._compiled = self._core.compile_model(model, self._device, self._config)
        except RuntimeError as e:
            raise SdOnnxError(f"{self._path}: OpenVINO cannot compile it for {self._device} "
                              f"({first_line(e, 300)})") from None
        self.input_types = self._types(self._compiled.inputs)
        self._request = self._compiled.create_infer_request()

    def _fit(self, feeds: dict[str, NDArray]) -> None:
        shapes = {name: tuple(np.shape(value)) for name, value in feeds.items()}
        if self._static == {}:  # the first run: compile for its shapes
            model, self._unshaped = self._unshaped, None
            model.reshape({port: list(shapes[(port.get_names() & shapes.keys()).pop()]) for port in model.inputs})
            self._compile(model)
            self._static = shapes
        elif shapes != self._static:  # other shapes: the dynamic model from now on
            self._compile(str(self._path))
            self._static = None

    def prepare(self, feeds: dict[str, NDArray]) -> None:
        """Compile now for the shapes of `feeds` (their values are not used), as the first run would."""
        if self._static is not None:
            self._fit(feeds)

    def run(self, feeds: dict[str, NDArray]) -> list[NDArray]:
        if self._static is not None:
            self._fit(feeds)
        result = self._request.infer(cast_feeds(feeds, self.input_types))
        return [np.array(result[out]) for out in self._compiled.outputs]


def open_session(folder: Path, component: str, device: Device, threads: int | None = None,
                 low_memory: bool = False, overrides: dict[str, NDArray] | None = None) -> Session:
    path = folder / component / "model.onnx"
    if not path.is_file():
        raise ModelFolderError(f"{folder} has no {component}/model.onnx")
    if overrides and device.backend == "openvino":
        raise SdOnnxError("LoRAs and textual-inversion embeddings run on ONNX Runtime only for now: "
                          "use --device cpu (or another ONNX Runtime device)")
    if device.backend == "openvino":
        from sd_onnx.home import cache_dir

        bf16 = component_precision(folder, component) == "bf16" or device.inference_precision == "bf16"
        hint = "bf16" if bf16 else "f32"
        return OpenVinoSession(path, device, threads, cache_dir=None if no_cache() else cache_dir() / "openvino",
                               precision=hint, static_shapes=static_shapes(folder, component, device))
    cpu_only = tuple(device.providers) == ("CPUExecutionProvider",)
    # On the CPU, ORT_ENABLE_ALL adds the NCHWc layout rewrites: measured at full size, the VAE decoder runs 14%
    # faster with them (15.4 vs 17.8 s) and the UNet 6-9% per step (interleaved, docs/benchmarks.md), but for the UNet
    # the rewrite costs 9 s at every start (10.5 vs 1.3 s). The optimized graph is therefore kept on disk and
    # loaded at later starts (1.2 s): see ort_cache.
    # An int8 UNet is chosen to save memory, and its arena is most of what it holds beyond the 0.87 GB of weights:
    # without it the step peak went 2.19 -> 1.89 GB for 0-4% more time (two alternating full-size runs each).
    # ORT_ENABLE_ALL gave it nothing (8.14 vs 7.67 s, alternating), so it keeps ORT_ENABLE_EXTENDED and no cache.
    int8_unet = component == "unet" and component_precision(folder, component) == "int8"
    if (not cpu_only and not overrides and not int8_unet and not no_cache()
            and gpu_graphs.wants_fusion(device.providers, component)):
        # CUDA: ONNX Runtime's GPU fusions, made once and cached (gpu_graphs); ONNX Runtime's own graph optimizations
        # then run on the fused graph at every start, as they ran on the plain graph before. LoRA/TI overrides name
        # the folder's initializers, which the fusions repack: those sessions keep the plain graph.
        fused = gpu_graphs.fused_graph(path, component, OptimizedModelCache(optimized_cache_dir(), device.providers))
        if fused is not None:
            try:
                return OrtSession(fused, device, threads, low_memory=low_memory, label=path.parent.name)
            except SdOnnxError as e:  # a damaged cache entry: the model folder's own graph decides
                print(f"sd-onnx: warning: {first_line(e, 200)}; running the plain graph", file=sys.stderr)
                shutil.rmtree(fused.parent, ignore_errors=True)
    cache = (OptimizedModelCache(optimized_cache_dir(), device.providers)
             if cpu_only and not int8_unet and not no_cache() else None)
    return OrtSession(path, device, threads, full_optimization=not int8_unet or not cpu_only,
                      low_memory=low_memory or int8_unet, cache=cache, overrides=overrides)


def static_shapes(folder: Path, component: str, device: Device) -> bool:
    """Whether OpenVINO compiles `component` for each request's shapes: the UNet of an int8 or bf16 folder on the
    CPU. An fp32 UNet stays dynamic: to reshape, OpenVINO holds the whole fp32 graph while it compiles or imports
    the cached compile, measured at full size 8.65 GB peak RSS against 5.72 GB dynamic (bf16 hint, cache filled), for
    a 5 % faster step (2.18 against 2.29 s); an int8 UNet peaks at 2.8 GB either way and gains 6-8 %."""
    return (component == "unet" and device.openvino_device == "CPU"
            and component_precision(folder, component) in ("int8", "bf16"))


def optimized_cache_dir() -> Path:
    from sd_onnx.home import cache_dir

    return cache_dir() / "onnxruntime"


def no_cache() -> bool:
    """SD_ONNX_NO_CACHE=1: neither runtime keeps a cache (a read-only or small home: the optimized copy of an fp32
    UNet takes 3.4 GB)."""
    import os

    return os.environ.get("SD_ONNX_NO_CACHE", "") not in ("", "0")


def component_precision(folder: Path, component: str) -> str:
    from sd_onnx.home import read_metadata

    return read_metadata(folder).get("components", {}).get(component, {}).get("precision", "fp32")


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
             "tensor(int64)": np.int64, "tensor(double)": np.float64}


def cast_feeds(feeds: dict[str, NDArray], types: dict[str, str]) -> dict[str, NDArray]:
    return {k: np.ascontiguousarray(v, dtype=_NP_TYPES.get(types.get(k, ""), v.dtype)) for k, v in feeds.items()}


def _ov_type(element_type) -> str:
    name = str(element_type.get_type_name()) if hasattr(element_type, "get_type_name") else str(element_type)
    return {"f32": "tensor(float)", "f16": "tensor(float16)", "i32": "tensor(int32)", "i64": "tensor(int64)"}.get(
        name, "tensor(float)")
