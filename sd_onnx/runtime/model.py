"""LoadedModel: a model folder read once (metadata, scheduler, latent scaling) and its sessions, opened by policy."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.typing import NDArray

from sd_onnx.errors import ModelFolderError
from sd_onnx.home import check_folder, read_scheduler_config
from sd_onnx.runtime.denoiser import Denoiser, ldm_alphas_cumprod
from sd_onnx.runtime.fewstep import unet_cond_dim
from sd_onnx.runtime.networks import ExtraNetworks
from sd_onnx.runtime.providers import Device, resolve_device
from sd_onnx.runtime.sessions import Session, cast_feeds, open_session
from sd_onnx.runtime.tokenizer import ClipTokenizer
from sd_onnx.runtime.vae_approx import default_preview, find_vae_approx
from sd_onnx.runtime.vae_approx import scaling_factor as approx_scaling
from sd_onnx.runtime.variants import precision_of

Observer = Callable[[str, dict], None]


@dataclass(frozen=True)
class Schedule:
    """The training noise schedule from scheduler/scheduler_config.json."""

    beta_start: float
    beta_end: float
    num_train_timesteps: int
    prediction_type: str

    def alphas_cumprod(self) -> NDArray[np.float32]:
        return ldm_alphas_cumprod(self.beta_start, self.beta_end, self.num_train_timesteps)


class _Observed:
    """A session that shows every feed to an observer first (calibration records real inputs this way)."""

    def __init__(self, session: Session, component: str, observe: Observer):
        self._session, self._component, self._observe = session, component, observe
        self.input_types = session.input_types

    def run(self, feeds: dict[str, NDArray]) -> list[NDArray]:
        feeds = cast_feeds(feeds, self.input_types)  # as the model receives them (token ids int32, ...)
        self._observe(self._component, feeds)
        return self._session.run(feeds)


class LoadedModel:
    """One model folder ready to generate from.

    `keep_loaded=False` (the CLI): each session is released as soon as its stage is done, so a 512x512 run never
    holds the UNet and the VAE's activations at once. `keep_loaded=True` (a server): sessions stay open between
    requests. `observe(component, feeds)`, if given, sees every input fed to every session."""

    def __init__(self, folder: Path | str, device: str | Device = "auto", threads: int | None = None,
                 low_memory: bool = False, keep_loaded: bool = False, observe: Observer | None = None,
                 vae: str | Path | None = None, arithmetic: str = "fp32"):
        """`arithmetic="auto"` (--precision auto): --device auto may compute an fp32 folder in bf16 where that is
        this CPU's fastest path (providers.cpu_arithmetic); "fp32" never lowers it."""
        self.folder = Path(folder)
        self.meta = check_folder(self.folder)
        self.device = device if isinstance(device, Device) else resolve_device(
            device, precision=precision_of(self.meta), arithmetic=arithmetic)
        self.threads, self.low_memory, self.keep_loaded, self.observe = threads, low_memory, keep_loaded, observe
        self.schedule = read_schedule(self.folder)
        self.prediction_type = self.meta.get("prediction_type", self.schedule.prediction_type)
        vae_cfg = vae_config(self.folder)
        self.scaling_factor = read_scaling_factor(self.folder, self.meta, vae_cfg)
        self.latent_channels = int(vae_cfg.get("latent_channels", 4))
        self.unet_in_channels = unet_in_channels(self.folder)
        self.unet_cond_dim = unet_cond_dim(self.folder)  # LCM UNets: the size of their guidance embedding input
        # `vae`: an approximate VAE (TAESD) by name or path for the VAE stages; None or "full": the folder's own
        self.vae_approx = None if vae in (None, "", "full", "auto") else find_vae_approx(vae)
        self.preview_vae = self.vae_approx or default_preview()
        self._sessions: dict[str, Session] = {}
        self._tokenizer: ClipTokenizer | None = None
        # LoRA and textual inversion (runtime/networks.py): where their files are (None: under $SD_ONNX_HOME),
        # and the set the next sessions open with.
        self.lora_dir: Path | None = None
        self.embeddings_dir: Path | None = None
        self.extra_networks = ExtraNetworks()

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def short_hash(self) -> str:
        return self.meta.get("source", {}).get("short_hash", "")

    def has(self, component: str) -> bool:
        folder, name = self._source(component)
        return (folder / name / "model.onnx").is_file()

    def _source(self, component: str) -> tuple[Path, str]:
        """Where a component's graph lives: the VAE stages come from the approximate VAE when one is chosen and has
        them (a TAESD without its encoder leaves img2img on the full encoder); `vae_preview` is the live preview's
        TAESD decoder."""
        if component == "vae_preview" and self.preview_vae is not None:
            return self.preview_vae, "vae_decoder"
        if (component in ("vae_decoder", "vae_encoder") and self.vae_approx is not None
                and (self.vae_approx / component / "model.onnx").is_file()):
            return self.vae_approx, component
        return self.folder, component

    def vae_scaling(self, component: str) -> float:
        """The latent scaling the VAE stage `component` owns: the folder's VAE's, or TAESD's (1.0)."""
        folder, _ = self._source(component)
        return self.scaling_factor if folder == self.folder else approx_scaling(folder)

    def tokenizer(self) -> ClipTokenizer:
        if self._tokenizer is None:
            self._tokenizer = ClipTokenizer.from_folder(self.folder / "tokenizer")
        return self._tokenizer

    def session(self, component: str) -> Session:
        session = self._sessions.get(component)
        if session is None:
            if not self.has(component):
                raise ModelFolderError(f"{self.folder} has no {component}/model.onnx"
                                       + (" (img2img and hires fix need the VAE encoder: export the model again)"
                                          if component == "vae_encoder" else ""))
            folder, name = self._source(component)  # the VAE may come from an approximate VAE's folder
            overrides = (self.extra_networks.overrides(self.folder, component, self.component_precision(component))
                         if folder == self.folder else None)
            device = self.device
            if overrides and device.chosen_by_auto and device.backend == "openvino":  # LoRA/TI patch on ORT only
                device = resolve_device("cpu")
            session = open_session(folder, name, device, self.threads,
                                   self.low_memory and component != "text_encoder", overrides=overrides)
            if self.observe:
                session = _Observed(session, component, self.observe)
            self._sessions[component] = session
        return session

    def release(self, component: str) -> None:
        """Let a session go unless the model is kept loaded."""
        if not self.keep_loaded and self._sessions.pop(component, None) is not None:
            self.extra_networks.forget(component)
            gc.collect()

    def use_extra_networks(self, uses: list, token_rows=None) -> None:
        """LoRAs [(Network, te, unet)] and textual-inversion token rows for the sessions opened from now on; an open
        session they change is closed (one with the same set is kept: a repeated set costs nothing)."""
        for component in self.extra_networks.activate(uses, token_rows):
            if self._sessions.pop(component, None) is not None:
                gc.collect()

    def component_precision(self, component: str) -> str:
        return str(self.meta.get("components", {}).get(component, {}).get("precision", "fp32"))

    def denoiser(self, model) -> Denoiser:
        return Denoiser(model, self.schedule.alphas_cumprod(), self.prediction_type)


def read_schedule(folder: Path) -> Schedule:
    """The training schedule, from the scheduler config home.check_folder has the types of checked."""
    config = read_scheduler_config(folder)
    if config.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ModelFolderError(f"{folder / 'scheduler' / 'scheduler_config.json'}: beta_schedule "
                               f"{config['beta_schedule']!r} is not supported (scaled_linear only)")
    return Schedule(float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012)),
                    int(config.get("num_train_timesteps", 1000)), str(config.get("prediction_type", "epsilon")))


def unet_in_channels(folder: Path) -> int:
    """4, or 9 for an inpainting UNet (latent + mask + masked-picture latent), from unet/config.json."""
    try:
        config = json.loads((folder / "unet" / "config.json").read_text())
        return int(config.get("in_channels", 4)) if isinstance(config, dict) else 4
    except (OSError, ValueError, TypeError):
        return 4


def vae_config(folder: Path) -> dict:
    """vae_decoder/config.json (diffusers' AutoencoderKL config), {} when absent or unreadable."""
    try:
        config = json.loads((folder / "vae_decoder" / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def read_scaling_factor(folder: Path, meta: dict, vae: dict) -> float:
    """The VAE's latent scaling, from vae_decoder/config.json (diffusers writes it there), else sd_onnx.json.
    Never a default: 0.18215 is right for SD 1.x/2.x only (SDXL uses 0.13025, TAESD 1.0)."""
    value = vae.get("scaling_factor")
    if value is None:
        value = meta.get("scaling_factor")
    try:
        scaling = float(value)
    except (TypeError, ValueError):
        raise ModelFolderError(f"{folder}: no usable VAE scaling_factor in vae_decoder/config.json or sd_onnx.json "
                               f"(found {value!r})") from None
    if not np.isfinite(scaling) or scaling <= 0:
        raise ModelFolderError(f"{folder}: VAE scaling_factor must be a positive number, got {value!r}")
    return scaling
