"""Export side of few-step models: LCM UNets that take a guidance embedding (`timestep_cond`), detected and wired."""

from __future__ import annotations

from dataclasses import replace

import torch

from sd_onnx.export.onnx_export import ComponentSpec, _unet_example

# Where an LDM-layout single file keeps an LCM UNet's guidance projection (diffusers' TimestepEmbedding.cond_proj,
# a bias-free Linear(time_cond_proj_dim, model_channels) added to the sinusoidal timestep features).
LDM_COND_PROJ = "model.diffusion_model.time_embed.cond_proj.weight"
DIFFUSERS_COND_PROJ = "time_embedding.cond_proj.weight"


def add_cond_proj(sd: dict, unet_cfg: dict, unet_sd: dict) -> None:
    """An LCM-distilled UNet in an LDM single file: set time_cond_proj_dim from the projection's shape and carry the
    weight over (diffusers' single-file converter drops it)."""
    weight = sd.get(LDM_COND_PROJ)
    if weight is not None:
        unet_cfg["time_cond_proj_dim"] = int(weight.shape[1])
        unet_sd[DIFFUSERS_COND_PROJ] = weight


def cond_dim(unet) -> int | None:
    dim = getattr(unet.config, "time_cond_proj_dim", None)
    return int(dim) if dim else None


class _LcmUNet(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):
        batch = sample.shape[0]
        timestep = timestep.to(sample.dtype).expand(batch)
        # one guidance embedding [1, D] serves the whole batch, as one timestep [1] does
        timestep_cond = timestep_cond.to(sample.dtype).expand(batch, -1)
        return self.model(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False)[0]


def unet_spec(spec: ComponentSpec, unet) -> ComponentSpec:
    """The UNet's export spec, with the `timestep_cond` input [B or 1, time_cond_proj_dim] for an LCM UNet."""
    dim = cond_dim(unet)
    if spec.name != "unet" or dim is None:
        return spec
    return replace(spec, wrap=_LcmUNet, example=lambda m: (*_unet_example(m), torch.randn(1, dim)),
                   input_names=(*spec.input_names, "timestep_cond"),
                   dynamic_axes={**spec.dynamic_axes, "timestep_cond": {0: "cond_batch"}})
