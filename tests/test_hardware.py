"""Device choice (faked provider lists only), ORT vs OpenVINO parity, and the no-AVX path under qemu Westmere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sd_onnx.cli import main
from sd_onnx.errors import UsageError
from sd_onnx.runtime.pipeline import GenerateRequest, generate
from sd_onnx.runtime.providers import cpu_info, resolve_device

CPU = ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    "available,expected",
    [
        (CPU, ("cpu", ("CPUExecutionProvider",))),
        (["CUDAExecutionProvider", *CPU], ("cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"))),
        (["ROCMExecutionProvider", *CPU], ("rocm", ("ROCMExecutionProvider", "CPUExecutionProvider"))),
        (["MIGraphXExecutionProvider", *CPU], ("migraphx", ("MIGraphXExecutionProvider", "CPUExecutionProvider"))),
        (["DmlExecutionProvider", *CPU], ("dml", ("DmlExecutionProvider", "CPUExecutionProvider"))),
        (["TensorrtExecutionProvider", "CUDAExecutionProvider", *CPU], ("cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"))),
    ],
)
def test_auto_picks_best_installed_provider(available, expected):
    device = resolve_device("auto", available, ov_devices=[])
    assert (device.name, device.providers) == expected
    assert device.reason


@pytest.mark.parametrize(
    "name,package",
    [("cuda", "onnxruntime-gpu"), ("rocm", "onnxruntime-rocm"), ("migraphx", "onnxruntime-migraphx"),
     ("dml", "onnxruntime-directml")],
)
def test_missing_provider_names_the_package(name, package):
    with pytest.raises(UsageError, match=package):
        resolve_device(name, CPU, ov_devices=[])


def test_openvino_requests():
    assert resolve_device("openvino", CPU, ov_devices=["CPU"]).backend == "openvino"
    assert resolve_device("openvino:GPU", CPU, ov_devices=["CPU", "GPU.0"]).openvino_device == "GPU"
    with pytest.raises(UsageError, match="pip install openvino"):
        resolve_device("openvino", CPU, ov_devices=[])
    with pytest.raises(UsageError, match="no GPU device"):
        resolve_device("openvino:GPU", CPU, ov_devices=["CPU"])
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        resolve_device("tpu", CPU, ov_devices=[])


def test_cpu_flags_agree_with_proc_cpuinfo():
    """CPUID (through NumPy) and the kernel's flags agree natively; only under emulation may they differ."""
    proc = Path("/proc/cpuinfo")
    if not proc.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = set(next(line for line in proc.read_text().splitlines() if line.startswith("flags")).split(":")[1].split())
    info = set(cpu_info()["flags"])
    for flag, name in [("sse4_2", "SSE4.2"), ("avx", "AVX"), ("avx2", "AVX2"), ("avx512f", "AVX-512"),
                       ("avx512_vnni", "AVX512-VNNI"), ("avx512_bf16", "AVX512-BF16")]:
        assert (flag in flags) == (name in info), name


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    assert report["auto"]["device"] and report["cpu"]["flags"]
    assert report["missing"]["cuda"] == "pip install onnxruntime-gpu"


def test_ort_and_openvino_give_the_same_image(tiny_model):
    """Same seed, ORT CPU vs OpenVINO CPU at fp32: final latents within 1e-3, pixels within 2 of 255 levels."""
    pytest.importorskip("openvino")
    request = GenerateRequest("a cat", steps=6, sampler="Euler a", seed=11, width=64, height=64)
    ort_img = generate(tiny_model("sd2-v"), request, device="cpu").images[0]
    ov_img = generate(tiny_model("sd2-v"), request, device="openvino").images[0]
    np.testing.assert_allclose(ort_img.latent, ov_img.latent, atol=1e-3)
    diff = np.abs(np.asarray(ort_img.image, dtype=int) - np.asarray(ov_img.image, dtype=int))
    assert diff.max() <= 2


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(QEMU is None, reason="qemu-user is not installed (apt-get install qemu-user)")
def test_generate_without_avx_under_qemu_westmere(tiny_model, tmp_path):
    """The whole generate path on a CPU without AVX (the seed's Xeon X5670), emulated: qemu refuses AVX with SIGILL.

    Tolerance: the SSE kernels sum in another order than the AVX2 ones, so latents may move by float
    rounding; 1e-3 on latents and 2 of 255 levels on pixels.
    """
    folder = tiny_model("sd1")
    request = GenerateRequest("a cat", steps=3, sampler="Euler", seed=5, width=64, height=64)
    native = generate(folder, request, device="cpu").images[0]
    out = tmp_path / "latent.npy"
    code = (
        "import numpy as np, sys; from sd_onnx.runtime.providers import cpu_info; "
        "from sd_onnx.runtime.pipeline import GenerateRequest, generate; "
        "assert 'AVX' not in cpu_info()['flags'], cpu_info(); "
        f"r = generate({str(folder)!r}, GenerateRequest('a cat', steps=3, sampler='Euler', seed=5, width=64, height=64), device='cpu'); "
        f"np.save({str(out)!r}, r.images[0].latent); r.images[0].image.save({str(tmp_path / 'img.png')!r})"
    )
    # A real Westmere user has no OPENBLAS_CORETYPE=Haswell (set on some hosts for old OpenBLAS builds): inherited,
    # it makes OpenBLAS run AVX2 kernels in the emulated child, which qemu kills with SIGILL.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    proc = subprocess.run([QEMU, "-cpu", "Westmere", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(out), native.latent, atol=1e-3)
    from PIL import Image

    emulated = np.asarray(Image.open(tmp_path / "img.png"), dtype=int)
    assert np.abs(emulated - np.asarray(native.image, dtype=int)).max() <= 2
