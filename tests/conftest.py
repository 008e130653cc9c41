"""Shared fixtures: tiny random-weight checkpoints in the LDM layout, and their exported model folders."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import sd_onnx.export  # noqa: F401 -- before any test imports diffusers: hides a torchvision that cannot load

FAMILIES = ("sd1", "sd2", "sd2-v")


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory):
    """The test session gets a private $SD_ONNX_HOME: the runtimes' caches and installed models stay out of the
    user's home (tests that need another home set their own)."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SD_ONNX_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_dir):
    """tiny_checkpoint(family) -> path of a .ckpt (with its <stem>.yaml beside it), built once per session; any
    family of sd_onnx.families, the inpainting ones (sd1-inpaint, sd2-inpaint: 9-channel UNet) included."""
    from sd_onnx.export.synthetic import write_checkpoint

    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                made[family] = write_checkpoint(checkpoint_dir / f"tiny-{family}.ckpt", family, seed=7)
        return made[family]

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint, tmp_path_factory):
    """tiny_model(family) -> exported model folder of tiny_checkpoint(family), built once per session."""
    from sd_onnx.export.exporter import export_model

    root = tmp_path_factory.mktemp("models")
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                made[family] = export_model(tiny_checkpoint(family), root / f"tiny-{family}").folder
        return made[family]

    return make
