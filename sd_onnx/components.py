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
    ort_model_type: str = ""  # ONNX Runtime transformers optimizer's model type (GPU graph fusions, gpu_graphs.py)


COMPONENTS: tuple[Component, ...] = (
    Component("text_encoder", True, ("input_ids",), ("last_hidden_state", "pooler_output"), ort_model_type="clip"),
    Component("unet", True, ("sample", "timestep", "encoder_hidden_states"), ("out_sample",), ort_model_type="unet"),
    # optimum now writes the encoder's mean and log-variance as `latent_parameters` [B, 2C, h, w]
    Component("vae_encoder", False, ("sample",), ("latent_sample",), aliases=("latent_parameters",),
              ort_model_type="vae"),
    Component("vae_decoder", True, ("latent_sample",), ("sample",), ort_model_type="vae"),
)
BY_NAME = {c.name: c for c in COMPONENTS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
REQUIRED: tuple[str, ...] = tuple(c.name for c in COMPONENTS if c.required)
