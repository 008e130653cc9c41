"""LoadedModel reads what a folder says: the VAE's own latent scaling (never a family's default), sessions released
or kept by policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sd_onnx.errors import ModelFolderError
from sd_onnx.runtime.model import LoadedModel


def _copy(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model("sd1"), tmp_path / "copy"))


def _edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_scaling_comes_from_the_vae_config_first(tiny_model, tmp_path):
    folder = _copy(tiny_model, tmp_path)
    assert LoadedModel(folder, "cpu").scaling_factor == pytest.approx(0.18215)
    _edit(folder / "vae_decoder" / "config.json", scaling_factor=0.13025)
    assert LoadedModel(folder, "cpu").scaling_factor == pytest.approx(0.13025)


def test_no_scaling_anywhere_is_one_line_not_a_default(tiny_model, tmp_path):
    """A foreign folder (no sd_onnx.json) whose VAE config says nothing: refused, not run at SD 1.x's 0.18215."""
    folder = _copy(tiny_model, tmp_path)
    (folder / "sd_onnx.json").unlink()
    _edit(folder / "vae_decoder" / "config.json", scaling_factor=None)
    with pytest.raises(ModelFolderError, match="no usable VAE scaling_factor"):
        LoadedModel(folder, "cpu")
    _edit(folder / "vae_decoder" / "config.json", scaling_factor="big")
    with pytest.raises(ModelFolderError, match="no usable VAE scaling_factor"):
        LoadedModel(folder, "cpu")


def test_sessions_are_released_early_or_kept(tiny_model):
    released = LoadedModel(tiny_model("sd1"), "cpu")
    first = released.session("vae_decoder")
    released.release("vae_decoder")
    assert released.session("vae_decoder") is not first
    kept = LoadedModel(tiny_model("sd1"), "cpu", keep_loaded=True)
    first = kept.session("vae_decoder")
    kept.release("vae_decoder")
    assert kept.session("vae_decoder") is first
