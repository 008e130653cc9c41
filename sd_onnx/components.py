"""The one table of model-folder components: name, whether a folder needs it, and its ONNX inputs and outputs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    name: str
    required: bool  # False: a folder without it still makes txt2img images (vae_encoder: img2img and hires need it)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # the names we write; readers also accept `aliases`
    aliases: tuple[str, ...] = ()


COMPONENTS: tuple[Component, ...] = (
    Component("text_encoder", True, ("input_ids",), ("last_hidden_state", "pooler_output")),
    Component("unet", True, ("sample", "timestep", "encoder_hidden_states"), ("out_sample",)),
    # optimum now writes the encoder's mean and log-variance as `latent_parameters` [B, 2C, h, w]
    Component("vae_encoder", False, ("sample",), ("latent_sample",), aliases=("latent_parameters",)),
    Component("vae_decoder", True, ("latent_sample",), ("sample",)),
)
BY_NAME = {c.name: c for c in COMPONENTS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
REQUIRED: tuple[str, ...] = tuple(c.name for c in COMPONENTS if c.required)
