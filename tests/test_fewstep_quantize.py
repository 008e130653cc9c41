"""`sd-onnx quantize` on an LCM-distilled folder (UNet with `timestep_cond`): calibrated and measured on the LCM path
(LCM sampler, few steps, embedded guidance, one batch), picked by generate, and close to fp32."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # the fixture checkpoint is written and exported with torch
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from sd_onnx.quantize.variant import QuantizeOptions, quantize_model  # noqa: E402
from tests.test_fewstep import LCM_DIM, lcm_checkpoint, lcm_model  # noqa: E402,F401 -- the fixtures

# 4 LCM steps (the recipe's own count) at 64 px, one prompt: the tiny folder quantizes in seconds.
FAST = dict(calibration_prompts=1, calibration_size=64, fidelity_prompts=1, fidelity_size=64)
SEED, CFG = 5, 8.0


@pytest.fixture(scope="module")
def lcm_base(lcm_model, tmp_path_factory) -> Path:
    """A private copy of the tiny LCM folder, so its variants land beside it and nowhere else."""
    return Path(shutil.copytree(lcm_model, tmp_path_factory.mktemp("lcm-quantize") / "tiny-lcm"))


@pytest.fixture(scope="module")
def lcm_int8(lcm_base):
    """The int8 variant, and the UNet feeds its calibration recorded (spied on at the quantizer's door)."""
    import sd_onnx.quantize.int8 as int8

    seen: list[dict] = []
    real = int8.quantize_int8

    def spy(src, dst, feeds):
        seen.extend(feeds)
        return real(src, dst, feeds)

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setattr(int8, "quantize_int8", spy)
        folder = quantize_model(lcm_base, QuantizeOptions("int8", **FAST)).folder
    return folder, seen


@pytest.fixture(scope="module")
def lcm_bf16(lcm_base) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_model(lcm_base, QuantizeOptions("bf16", any_cpu=True, **FAST)).folder


def _meta(folder: Path) -> dict:
    return json.loads((folder / "sd_onnx.json").read_text())


def _image(folder: Path, seed: int = SEED) -> np.ndarray:
    from sd_onnx.runtime.pipeline import GenerateRequest, generate

    request = GenerateRequest("a cat in a hat", steps=4, cfg_scale=CFG, sampler="LCM", seed=seed, width=64, height=64)
    return np.asarray(generate(folder, request, "cpu").images[0].image)


def test_int8_calibration_records_the_lcm_path(lcm_int8):
    """Every recorded UNet feed carries timestep_cond = the guidance embedding of w - 1 = 7, one batch (no
    unconditional half), at A1111's 4 LCM timesteps: the ranges are those of the few-step run, not of a CFG run."""
    from sd_onnx.runtime.fewstep import guidance_scale_embedding

    folder, feeds = lcm_int8
    assert len(feeds) == 4  # 1 prompt x 4 LCM steps
    expected = guidance_scale_embedding(CFG - 1.0, LCM_DIM)
    for feed in feeds:
        assert set(feed) == {"sample", "timestep", "encoder_hidden_states", "timestep_cond"}
        assert feed["sample"].shape[0] == 1 and feed["encoder_hidden_states"].shape[0] == 1
        np.testing.assert_allclose(feed["timestep_cond"], expected, rtol=0, atol=1e-6)
    assert [float(f["timestep"][0]) for f in feeds] == [999, 679, 339, 19]
    calibration = _meta(folder)["quantization"]["calibration"]
    assert (calibration["sampler"], calibration["steps"], calibration["cfg_scale"]) == ("LCM", 4, CFG)
    assert "timestep_cond" in calibration["guidance"]


def test_int8_keeps_the_guidance_embedding_in_float(lcm_int8):
    """The timestep and guidance embeddings (time_embedding, cond_proj included) stay float: their error would
    shift every block at once."""
    import onnx

    folder, _ = lcm_int8
    graph = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False).graph
    assert "timestep_cond" in {i.name for i in graph.input}
    producers = {o: n.op_type for n in graph.node for o in n.output}
    embedding = [n for n in graph.node if "/time_embedding/" in n.name]
    assert any("/cond_proj/" in n.name and n.op_type in ("MatMul", "Gemm") for n in embedding)
    for node in embedding:  # float inputs: no DequantizeLinear feeds them
        assert all(producers.get(i) != "DequantizeLinear" for i in node.input), node.name
    assert _meta(folder)["components"]["unet"]["precision"] == "int8"


def test_int8_report_compares_on_the_lcm_path(lcm_int8):
    """The stored fidelity report names the LCM recipe and holds its figures. Measured on this fixture (64 px,
    4 LCM steps): PSNR 34.5 dB, SSIM 0.989, final-latent cosine 0.995; two fp32 images of different seeds: 13.5 dB.
    Thresholds leave about 9 dB for other CPUs' int8 kernels and still sit far above a broken quantization."""
    folder, _ = lcm_int8
    fid = _meta(folder)["fidelity"]
    assert fid["settings"]["sampler"] == "LCM" and fid["settings"]["steps"] == 4
    assert "embedded" in fid["settings"]["guidance"]
    assert fid["psnr_db_min"] > 25 and fid["ssim_min"] > 0.9 and fid["latent_cosine_min"] > 0.97
    assert fid["size_mb"]["unet"]["int8"] < fid["size_mb"]["unet"]["fp32"]


def test_generate_picks_the_lcm_variants_and_stays_close(lcm_base, lcm_int8, lcm_bf16):
    """auto picks int8 on a CPU without BF16, bf16 on one with BF16 but no VNNI (as test_quantize's choice for a
    plain model: the LCM folder's variants are found the same way); their LCM images stay close to fp32's.
    Measured: int8 33.9 dB, bf16 55.2 dB, two fp32 seeds 13.5 dB. Tolerances: int8 > 25 dB and 10 dB above the
    other seed (about 9 dB of room for other CPUs' int8 kernels), bf16 > 40 dB (weight rounding only)."""
    from sd_onnx.quantize.metrics import psnr
    from sd_onnx.runtime.variants import choose_variant

    int8, _ = lcm_int8
    assert choose_variant(lcm_base, "auto", "auto", [])[0] == int8
    assert choose_variant(lcm_base, "auto", "cpu", ["AVX512-BF16"])[0] == int8  # ORT would widen bf16 to fp32
    assert choose_variant(lcm_base, "auto", "auto", ["AVX512-BF16"])[0] == lcm_bf16
    fp32 = _image(lcm_base)
    other_seed = psnr(fp32, _image(lcm_base, SEED + 1))
    int8_psnr, bf16_psnr = psnr(fp32, _image(int8)), psnr(fp32, _image(lcm_bf16))
    assert int8_psnr > 25 and int8_psnr > other_seed + 10, (int8_psnr, other_seed)
    assert bf16_psnr > 40, bf16_psnr


def test_bf16_lcm_variant_stores_bfloat16_and_reports_on_the_lcm_path(lcm_bf16):
    import onnx
    from onnx import TensorProto

    inits = onnx.load(str(lcm_bf16 / "unet" / "model.onnx"), load_external_data=False).graph.initializer
    assert sum(t.data_type == TensorProto.BFLOAT16 for t in inits) > 10
    fid = _meta(lcm_bf16)["fidelity"]
    assert fid["settings"]["sampler"] == "LCM" and fid["psnr_db_min"] > 40  # measured 50.6 dB
    assert _meta(lcm_bf16)["quantization"]["calibration"] is None  # bf16 rounds weights: nothing to calibrate


def test_recipe_follows_the_model_and_the_sampler_flag(lcm_base, tiny_model, tmp_path, capsys):
    """LCM UNet -> LCM, guidance 8 embedded; a plain UNet -> DPM++ 2M Karras with CFG 7, unless export merged an
    LCM-LoRA (a `lcm*` name in merged_loras) -> LCM at CFG 1; --sampler overrides, and a wrong name is one line."""
    from sd_onnx.cli import main
    from sd_onnx.quantize.calibration import CFG_RECIPE, LCM_LORA_RECIPE, LCM_RECIPE, recipe_for

    plain = Path(shutil.copytree(tiny_model("sd1"), tmp_path / "plain"))
    assert recipe_for(lcm_base) == LCM_RECIPE and recipe_for(plain) == CFG_RECIPE
    assert recipe_for(plain, "LCM") == LCM_LORA_RECIPE and recipe_for(lcm_base, "LCM") == LCM_RECIPE
    assert recipe_for(lcm_base, "Euler").sampler == "Euler" and recipe_for(lcm_base, "Euler").cfg_scale == 8.0
    meta = _meta(plain)
    meta["merged_loras"] = [{"name": "lcm-lora-sdv1-5", "sha256": "0" * 64, "weight": 1.0}]
    (plain / "sd_onnx.json").write_text(json.dumps(meta))
    assert recipe_for(plain) == LCM_LORA_RECIPE
    assert main(["quantize", str(plain), "--int8", "--sampler", "Euler b", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown sampler 'Euler b'" in err[0]
    assert not (tmp_path / "x").exists()
