"""#22: OpenVINO runs the UNet compiled for the request's static shapes (as optimum-intel and FastSD CPU do), and
falls back to the dynamic model, compiled once, when a later run has other shapes (a hires pass, another size)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")

from sd_onnx.runtime.providers import openvino_devices, resolve_device  # noqa: E402
from sd_onnx.runtime.sessions import OpenVinoSession, open_session  # noqa: E402

# Static and dynamic compiles may pick different kernel blockings, so sums run in another order: fp32 rounding
# of a tiny UNet's outputs (values of order 1) stays far below 1e-4; a wrong shape or a stale compile is order 1.
ATOL = 1e-4


@pytest.fixture(scope="module")
def ov_cpu():
    if "CPU" not in openvino_devices():
        pytest.skip("OpenVINO has no CPU device here")
    return resolve_device("openvino", ["CPUExecutionProvider"], ["CPU"])


def unet_feeds(folder, batch: int, h: int, w: int, seed: int = 0) -> dict:
    import json

    config = json.loads((folder / "unet" / "config.json").read_text())
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, config["in_channels"], h, w), dtype=np.float32),
            "timestep": np.full((batch,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, config["cross_attention_dim"]),
                                                         dtype=np.float32)}


def test_static_unet_matches_dynamic_and_falls_back_once_on_new_shapes(tiny_model, ov_cpu, tmp_path):
    folder = tiny_model("sd1")
    path = folder / "unet" / "model.onnx"
    dynamic = OpenVinoSession(path, ov_cpu, cache_dir=tmp_path / "cache")
    static = OpenVinoSession(path, ov_cpu, cache_dir=tmp_path / "cache", static_shapes=True)
    first, second = unet_feeds(folder, 2, 8, 8), unet_feeds(folder, 2, 12, 8, seed=1)
    np.testing.assert_allclose(static.run(first)[0], dynamic.run(first)[0], atol=ATOL)
    assert static._static == {name: value.shape for name, value in first.items()}  # compiled for these shapes
    assert static._compiled.inputs[0].get_partial_shape().is_static
    np.testing.assert_allclose(static.run(second)[0], dynamic.run(second)[0], atol=ATOL)
    assert static._static is None and static._compiled.inputs[0].get_partial_shape().is_dynamic
    compiled = static._compiled
    np.testing.assert_allclose(static.run(first)[0], dynamic.run(first)[0], atol=ATOL)
    assert static._compiled is compiled  # back to the first size: no third compile


def test_fp32_folders_stay_dynamic(tiny_model, ov_cpu):
    """An fp32 UNet would hold its whole fp32 graph while compiling for static shapes (sessions.static_shapes):
    every component of an fp32 folder opens dynamic; test_quantize has the int8 UNet that opens static."""
    folder = tiny_model("sd1")
    for component in ("unet", "vae_decoder", "text_encoder"):
        assert open_session(folder, component, ov_cpu)._static is None
