"""#22: on CPUs with AVX512-BF16 or AMX-BF16, --device auto --precision auto computes an fp32 folder in bf16 through
OpenVINO (its fastest measured path there, no quantize step); elsewhere, and with --precision fp32, nothing changes.
The decision is tested on faked CPU flag lists, so it holds on AVX2-only machines too."""

from __future__ import annotations

import numpy as np
import pytest

from sd_onnx.runtime.providers import cpu_arithmetic, resolve_device

CPU = ["CPUExecutionProvider"]
ZEN5 = ["SSE4.2", "AVX", "AVX2", "FMA", "AVX-512", "AVX512-VNNI", "AVX512-BF16"]
SAPPHIRE_RAPIDS = [*ZEN5, "AMX-BF16", "AMX-INT8"]
AVX2_ONLY = ["SSE4.2", "AVX", "AVX2", "FMA"]
VNNI_NO_BF16 = ["SSE4.2", "AVX", "AVX2", "FMA", "AVX-512", "AVX512-VNNI"]  # Ice Lake / Cascade Lake


def test_auto_computes_fp32_folders_in_bf16_on_bf16_cpus_with_openvino():
    for flags, named in ((ZEN5, "AVX512-BF16"), (SAPPHIRE_RAPIDS, "AMX-BF16")):
        device = resolve_device("auto", CPU, ["CPU"], arithmetic="auto", cpu_flags=flags)
        assert (device.backend, device.openvino_device, device.inference_precision) == ("openvino", "CPU", "bf16")
        assert device.reason.startswith(f"fp32 weights, bf16 arithmetic (OpenVINO, this CPU has {named}")
        assert "--precision fp32" in device.reason


@pytest.mark.parametrize("flags", [AVX2_ONLY, VNNI_NO_BF16, []])
def test_cpus_without_bf16_keep_fp32_on_onnx_runtime(flags):
    device = resolve_device("auto", CPU, ["CPU"], arithmetic="auto", cpu_flags=flags)
    assert (device.name, device.backend, device.inference_precision) == ("cpu", "ort", "")
    assert cpu_arithmetic(flags, ["CPU"]) is None


def test_bf16_arithmetic_only_when_asked_for_by_auto_and_nothing_better():
    def auto(**kw):
        kw = {"available": CPU, "ov_devices": ["CPU"], "arithmetic": "auto", "cpu_flags": ZEN5, **kw}
        return resolve_device("auto", **kw)

    assert auto(arithmetic="fp32").name == "cpu"  # --precision fp32 (and every library default) keeps fp32
    assert auto(ov_devices=[]).name == "cpu"  # no OpenVINO: ONNX Runtime fp32
    assert auto(available=["CUDAExecutionProvider", *CPU]).name == "cuda"  # a GPU still comes first
    assert auto(precision="bf16").inference_precision == ""  # a bf16 variant: its own weights set the hint
    assert resolve_device("cpu", CPU, ["CPU"], arithmetic="auto", cpu_flags=ZEN5).backend == "ort"  # as named


def test_int8_variants_run_on_openvino_where_the_cpu_has_vnni():
    """The measured int8 step: OpenVINO's u8s8 kernels 1.86 s, with its float ops in bf16 1.47 s, ONNX Runtime's
    2.42 s, on a Zen 5 with AVX512-VNNI and AVX512-BF16."""
    def auto(flags, ov=("CPU",), available=CPU, arithmetic="auto"):
        return resolve_device("auto", list(available), list(ov), precision="int8", arithmetic=arithmetic,
                              cpu_flags=flags)

    for flags, named, hint in ((ZEN5, "AVX512-VNNI and AVX512-BF16", "bf16"),
                               (SAPPHIRE_RAPIDS, "AMX-INT8 and AMX-BF16", "bf16"),
                               (VNNI_NO_BF16, "AVX512-VNNI", ""), ([*AVX2_ONLY, "AVX-VNNI"], "AVX-VNNI", "")):
        device = auto(flags)
        assert (device.backend, device.chosen_by_auto, device.inference_precision) == ("openvino", True, hint)
        assert f"this CPU has {named}" in device.reason
        assert device.reason.startswith("int8 variant, its float ops in bf16" if hint else
                                        "int8 variant: OpenVINO's int8 kernels")
    assert auto(ZEN5, arithmetic="fp32").inference_precision == ""  # --precision int8: float ops stay fp32
    assert auto(AVX2_ONLY).name == "cpu"  # no VNNI: ONNX Runtime's int8, as measured on AVX2 machines before
    assert auto(ZEN5, ov=()).name == "cpu"  # no OpenVINO
    assert auto(ZEN5, available=["CUDAExecutionProvider", *CPU]).name == "cuda"
    assert resolve_device("cpu", CPU, ["CPU"], precision="int8", cpu_flags=ZEN5).backend == "ort"  # as named


def test_auto_prefers_the_variant_of_the_fastest_path(tmp_path, monkeypatch):
    import sd_onnx.runtime.providers as providers
    from sd_onnx.runtime.variants import auto_preference

    monkeypatch.setattr(providers, "ort_providers", lambda: CPU)  # a CPU machine even where onnxruntime-gpu is

    assert auto_preference("auto", ZEN5, ["CPU"]) == ("int8", "bf16")  # int8 on OpenVINO beats the bf16 variant
    assert auto_preference("openvino", SAPPHIRE_RAPIDS, ["CPU"]) == ("int8", "bf16")
    assert auto_preference("auto", ZEN5, []) == ("bf16", "int8")  # without OpenVINO, int8 runs on ORT: bf16 first
    assert auto_preference("auto", ["AVX512-BF16"], ["CPU"]) == ("bf16", "int8")  # BF16 without VNNI
    assert auto_preference("auto", AVX2_ONLY, ["CPU"]) == ("int8",)
    assert auto_preference("cpu", ZEN5, ["CPU"]) == ("int8",)  # ONNX Runtime computes a bf16 variant in fp32
    assert auto_preference("cuda", ZEN5, ["CPU"]) == ("fp16",)


def test_info_shows_the_choice_and_why(monkeypatch):
    import sd_onnx.runtime.providers as providers
    from sd_onnx.info import format_report, machine_report

    monkeypatch.setattr(providers, "cpu_info", lambda: {"model": "fake", "logical_cores": 2, "usable_cores": 2,
                                                        "flags": ZEN5})
    monkeypatch.setattr(providers, "openvino_devices", lambda: ["CPU"])
    monkeypatch.setattr(providers, "ort_providers", lambda: CPU)
    text = format_report(machine_report())
    assert "--device auto: openvino (fp32 weights, bf16 arithmetic (OpenVINO, this CPU has AVX512-BF16" in text
    monkeypatch.setattr(providers, "cpu_info", lambda: {"model": "fake", "logical_cores": 2, "usable_cores": 2,
                                                        "flags": AVX2_ONLY})
    assert "--device auto: cpu (best installed provider: CPUExecutionProvider)" in format_report(machine_report())


def _openvino_cpu():
    pytest.importorskip("openvino")
    from sd_onnx.runtime.providers import openvino_devices

    if "CPU" not in openvino_devices():
        pytest.skip("OpenVINO has no CPU device here")


def test_generate_says_bf16_arithmetic_and_fp32_keeps_fp32(tiny_model, tmp_path, monkeypatch, capsys):
    _openvino_cpu()
    import sd_onnx.runtime.providers as providers
    from sd_onnx.cli import main

    folder = tiny_model("sd1")
    monkeypatch.setattr(providers, "cpu_info", lambda: {"model": "fake", "logical_cores": 2, "usable_cores": 2,
                                                        "flags": ZEN5})
    common = ["--model", str(folder), "--steps", "1", "--width", "64", "--height", "64", "--seed", "1"]
    assert main(["generate", "a cat", *common, "-o", str(tmp_path / "auto")]) == 0
    err = capsys.readouterr().err
    assert f"model: {folder.name}, precision fp32 weights, bf16 arithmetic (OpenVINO, this CPU has AVX512-BF16" in err
    assert "on openvino:" in err
    assert main(["generate", "a cat", *common, "--precision", "fp32", "-o", str(tmp_path / "fp32")]) == 0
    err = capsys.readouterr().err
    assert f"model: {folder.name}, precision fp32 (requested)" in err and "on cpu:" in err


def test_lora_and_embeddings_fall_back_to_onnx_runtime_under_auto_bf16(tiny_model, monkeypatch):
    """OpenVINO sessions take no initializer overrides: the bf16 path auto chose opens patched components on ORT."""
    import sd_onnx.runtime.model as model_module

    opened = []
    monkeypatch.setattr(model_module, "open_session", lambda folder, name, device, *a, **kw: opened.append(
        (name, device.backend, bool(kw.get("overrides")))) or object())
    model = model_module.LoadedModel(tiny_model("sd1"), cpu_arithmetic(ZEN5, ["CPU"]))
    model.session("unet")
    model.extra_networks.overrides = lambda folder, component, precision: {"w": np.zeros(1, np.float32)}
    model.session("text_encoder")
    assert opened == [("unet", "openvino", False), ("text_encoder", "ort", True)]
    # the same for an int8 variant auto sent to OpenVINO; OpenVINO named by the user is refused instead (sessions)
    opened.clear()
    int8 = resolve_device("auto", CPU, ["CPU"], precision="int8", arithmetic="auto", cpu_flags=ZEN5)
    model = model_module.LoadedModel(tiny_model("sd1"), int8)
    model.extra_networks.overrides = lambda folder, component, precision: {"w": np.zeros(1, np.float32)}
    model.session("text_encoder")
    model = model_module.LoadedModel(tiny_model("sd1"), resolve_device("openvino", CPU, ["CPU"]))
    model.extra_networks.overrides = lambda folder, component, precision: {"w": np.zeros(1, np.float32)}
    model.session("text_encoder")
    assert opened == [("text_encoder", "ort", True), ("text_encoder", "openvino", True)]


# Measured on the 2-core Zen 5 (AVX512-BF16) this was written on, tiny sd1 model, 8 Euler a steps, 64x64, CFG 7:
# fp32 (ONNX Runtime) against bf16 arithmetic (OpenVINO's hint): PSNR 45.6 dB, max level difference 7 of 255;
# against OpenVINO's f32 hint (the control): 84.3 dB, max 1. On CPUs without BF16 OpenVINO ignores the hint and
# computes in fp32, so there the images match to fp32 tolerance.
FIDELITY_PSNR_DB = 40.0


def test_bf16_arithmetic_fidelity_against_fp32(tiny_model):
    _openvino_cpu()
    from sd_onnx.runtime.pipeline import GenerateRequest, generate

    folder = tiny_model("sd1")
    request = GenerateRequest("a black house cat", "blurry", steps=8, cfg_scale=7.0, sampler="Euler a", seed=1234,
                              width=64, height=64)
    fp32 = np.asarray(generate(folder, request, device="cpu").images[0].image, dtype=np.float64)
    bf16 = np.asarray(generate(folder, request, device=cpu_arithmetic(ZEN5, ["CPU"])).images[0].image,
                      dtype=np.float64)
    mse = float(np.mean((fp32 - bf16) ** 2))
    psnr = 10 * np.log10(255.0**2 / mse) if mse else float("inf")
    print(f"bf16 arithmetic vs fp32: PSNR {psnr:.1f} dB, max level difference {np.abs(fp32 - bf16).max():.0f}")
    assert psnr >= FIDELITY_PSNR_DB
