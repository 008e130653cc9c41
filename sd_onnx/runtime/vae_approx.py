"""Approximate VAEs (TAESD) kept beside the models in `$SD_ONNX_HOME/vae-approx/<name>`: finding one by name."""

from __future__ import annotations

from pathlib import Path

from sd_onnx.errors import ModelFolderError
from sd_onnx.home import home, read_metadata

# TAESD decodes the latents the UNet works in as they are (diffusers' AutoencoderTiny has scaling_factor 1.0):
# it was trained on SD latents already multiplied by 0.18215.
SCALING_FACTOR = 1.0
DEFAULT = "taesd"


def vae_approx_dir() -> Path:
    """A1111 keeps TAESD in models/VAE-approx; we keep the exported ONNX folders here."""
    return home() / "vae-approx"


def installed() -> list[Path]:
    root = vae_approx_dir()
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / "vae_decoder" / "model.onnx").is_file()) if root.is_dir() else []


def find_vae_approx(name: str | Path) -> Path:
    """An exported TAESD folder from a path or a name under vae_approx_dir(); one line naming the fix if absent."""
    path = Path(name).expanduser()
    if not path.is_dir() and not path.is_absolute():
        path = vae_approx_dir() / str(name)
    if not (path / "vae_decoder" / "model.onnx").is_file():
        have = ", ".join(p.name for p in installed()) or "none"
        raise ModelFolderError(f"no approximate VAE '{name}' in {vae_approx_dir()} (installed: {have}): run "
                               "`sd-onnx export-vae-approx taesd_decoder.pth taesd_encoder.pth` first")
    return path


def default_preview() -> Path | None:
    """The TAESD a live preview uses when the run decodes with the full VAE: `taesd` if installed (A1111's
    "TAESD" live preview method), else None (the cheap linear approximation)."""
    path = vae_approx_dir() / DEFAULT
    return path if (path / "vae_decoder" / "model.onnx").is_file() else None


def scaling_factor(folder: Path) -> float:
    value = read_metadata(folder).get("scaling_factor", SCALING_FACTOR)
    return float(value) if isinstance(value, (int, float)) and value > 0 else SCALING_FACTOR
