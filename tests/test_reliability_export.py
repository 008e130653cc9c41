"""Issue #13: export and quantize under odd sizes, stale variants, kills, full disks and bad folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from sd_onnx.cli import main

FAMILIES = ("sd1", "sd2", "sd2-v")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd-onnx: error: "), err
    return err[0]


# ----------------------------------------------------------------------------------------------------------
# 3. sizes that are multiples of 8 but not of 64


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_at_sizes_not_a_multiple_of_64(family, tiny_model, tmp_path):
    """72x136 px is latent 9x17: the tiny UNet downsamples 9 -> 5, and its up-block must come back to 9, not 10."""
    from PIL import Image

    out = tmp_path / "out"
    rc = main(["generate", "a fox", "--model", str(tiny_model(family)), "--steps", "2", "--width", "72",
               "--height", "136", "--seed", "1", "--precision", "fp32", "-o", str(out), "-q"])
    assert rc == 0
    [png] = out.glob("*.png")
    assert Image.open(png).size == (72, 136)


# ----------------------------------------------------------------------------------------------------------
# shared: a private base folder, a bf16 variant of its UNet, small filesystems


FAST = dict(calibration_prompts=1, calibration_steps=2, calibration_size=64, fidelity_prompts=1, fidelity_steps=1,
            fidelity_size=64)


def _quantize(folder: Path, precision: str = "bf16", output: Path | None = None, log=lambda m: None, **kw) -> Path:
    from sd_onnx.quantize.variant import QuantizeOptions, quantize_model

    kw = {**FAST, "any_cpu": True, "components": ("unet",), **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_model(folder, QuantizeOptions(precision, **kw), output, log=log).folder


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    return Path(shutil.copytree(tiny_model("sd1"), root / "M"))


@pytest.fixture(scope="module")
def bf16(base) -> Path:
    return _quantize(base)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def small_fs(tmp_path):
    """small_fs(megabytes) -> the mount point of a fresh tmpfs of that size (skipped where mounting is refused)."""
    mounted = []

    def make(megabytes: int) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}M", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------------------------------------
# 1. a variant of another export of its base is not used


def test_reexport_leaves_variants_stale_and_generate_ignores_them(base, bf16, tiny_checkpoint, tmp_path, capsys,
                                                                    monkeypatch):
    from sd_onnx.errors import ModelFolderError
    from sd_onnx.export.synthetic import write_checkpoint
    from sd_onnx.home import read_metadata
    from sd_onnx.runtime import providers
    from sd_onnx.runtime.variants import choose_variant

    model = Path(shutil.copytree(base, tmp_path / "M"))
    variant = Path(shutil.copytree(bf16, tmp_path / "M-bf16"))
    sha = read_metadata(model)["source"]["sha256"]
    assert read_metadata(variant)["variant_of"]["base"] == f"sha256:{sha}"
    bf16_cpu = ["AVX2", "AVX512-BF16"]
    assert choose_variant(model, "auto", "cpu", bf16_cpu)[0] == variant

    other = tmp_path / "B.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_checkpoint(other, "sd1", seed=8)
    assert main(["export", str(other), "-o", str(model), "--force"]) == 0
    err = capsys.readouterr().err
    assert "left stale: M-bf16" in err, err

    notices = []
    assert choose_variant(model, "auto", "cpu", bf16_cpu, notice=notices.append)[0] == model
    assert len(notices) == 1 and "ignoring M-bf16" in notices[0] and "\n" not in notices[0]
    with pytest.raises(ModelFolderError, match="M-bf16 is stale") as info:
        choose_variant(model, "bf16", "cpu", bf16_cpu)
    assert "\n" not in str(info.value)

    # the CLI: auto falls back to the fp32 model with one notice line; asked for, one error line
    real = providers.cpu_info()
    monkeypatch.setattr(providers, "cpu_info", lambda: {**real, "flags": [*real["flags"], "AVX512-BF16"]})
    args = ["generate", "a fox", "--model", str(model), "--steps", "1", "--width", "64", "--height", "64",
            "-o", str(tmp_path / "out"), "-q", "--device", "cpu"]
    assert main(args) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "ignoring M-bf16" in line] and not [line for line in err if "bf16 (" in line]
    assert main([*args, "--precision", "bf16"]) == 2
    assert "is stale" in _one_error_line(capsys)

    # a variant made before variants recorded their base: stale when the base was written after it
    meta = read_metadata(variant)
    del meta["variant_of"]["base"]
    (variant / "sd_onnx.json").write_text(json.dumps(meta))
    made = (model / "sd_onnx.json").stat().st_mtime - 60
    os.utime(variant / "sd_onnx.json", (made, made))
    assert choose_variant(model, "auto", "cpu", bf16_cpu, notice=notices.append)[0] == model


# ----------------------------------------------------------------------------------------------------------
# 2, 12, 19c. outputs that --force would destroy are refused before any work


def test_output_holding_or_inside_an_input_is_refused(tiny_checkpoint, base, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    ckpt = Path(shutil.copy(tiny_checkpoint("sd1"), folder / "X.ckpt"))
    shutil.copy(tiny_checkpoint("sd1").with_suffix(".yaml"), folder / "X.yaml")
    (folder / "notes.txt").write_text("mine")
    model = Path(shutil.copytree(base, tmp_path / "M"))
    before = _listing(tmp_path)

    assert main(["export", str(ckpt), "-o", str(folder), "--force"]) == 2
    assert "would replace the input" in _one_error_line(capsys)
    assert main(["export", str(model), "-o", str(model / "sub"), "--force"]) == 2  # a diffusers-style folder input
    assert "inside the input" in _one_error_line(capsys)
    assert main(["quantize", str(model), "--int8", "-o", str(model), "--force"]) == 2
    assert "would replace the input" in _one_error_line(capsys)
    assert main(["quantize", str(model), "--int8", "-o", str(tmp_path), "--force"]) == 2
    assert "would replace the input" in _one_error_line(capsys)

    other = tmp_path / "other"  # a folder of the user's that is not a model folder
    other.mkdir()
    (other / "photo.png").write_bytes(b"png")
    before = _listing(tmp_path)
    assert main(["export", str(ckpt), "-o", str(other), "--force"]) == 2
    assert "--force replaces model folders only" in _one_error_line(capsys)
    assert main(["quantize", str(model), "--int8", "-o", str(other), "--force"]) == 2
    assert "--force replaces model folders only" in _one_error_line(capsys)

    # 12: -o . (here a model folder, so only "the current folder" stops it)
    monkeypatch.chdir(model)
    assert main(["export", str(ckpt), "-o", ".", "--force"]) == 2
    assert "is the current folder" in _one_error_line(capsys)
    monkeypatch.chdir(tmp_path)

    # 19c: an existing file
    (tmp_path / "a-file").write_text("x")
    before = _listing(tmp_path)
    assert main(["export", str(ckpt), "-o", str(tmp_path / "a-file")]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    assert main(["quantize", str(model), "--int8", "-o", str(tmp_path / "a-file"), "--force"]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    assert _listing(tmp_path) == before
    assert (folder / "notes.txt").read_text() == "mine" and ckpt.is_file() and (folder / "X.yaml").is_file()
