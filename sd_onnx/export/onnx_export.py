"""torch -> ONNX for each component, with the input/output names of the diffusers/optimum ONNX layout."""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sd_onnx.components import BY_NAME

from sd_onnx.errors import UsageError

# The ONNX opsets the export supports: attention (scaled_dot_product_attention) exports from 14, where ONNX Runtime's
# fusions still find every attention and LayerNorm (measured on the tiny UNet at 14, 16, 17, 18, 20); the upper
# bound is what torch's TorchScript exporter writes (20 in torch 2.13).
MIN_OPSET = 14
DEFAULT_OPSET = 17
EXTERNAL_DATA = "model.onnx_data"


class _TextEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids=input_ids.to(torch.int64), return_dict=True)
        return out.last_hidden_state, out.pooler_output


class _UNet(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        # timestep may be [1] (diffusers' ONNX pipelines) or [B] (ours: one fractional t per latent).
        timestep = timestep.to(sample.dtype).expand(sample.shape[0])
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor):
        # The mean of the latent distribution: deterministic, so the runtime owns all randomness.
        return self.model.encode(sample).latent_dist.mean


class _VaeDecoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, latent_sample: torch.Tensor):
        return self.model.decode(latent_sample, return_dict=False)[0]


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    wrap: Callable[[object], torch.nn.Module]
    example: Callable[[object], tuple]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict


def _text_example(model) -> tuple:
    return (torch.zeros(1, 77, dtype=torch.int32),)


def _unet_example(model) -> tuple:
    cfg = model.config
    # A latent side that is not a multiple of the UNet's overall upsampling factor: diffusers then passes each
    # up-block the size of its skip connection, so the traced graph upsamples to that size instead of x2 and
    # every latent size works (a 72 px or 520 px image: latent 9 or 65, downsampled 9 -> 5 -> 3 -> 2).
    side = 2 ** model.num_upsamplers + 1
    return (
        torch.randn(2, cfg.in_channels, side, side + 2),
        torch.tensor([500.0]),
        torch.randn(2, 77, cfg.cross_attention_dim),
    )


def _vae_enc_example(model) -> tuple:
    return (torch.randn(1, model.config.in_channels, 64, 64),)


def _vae_dec_example(model) -> tuple:
    return (torch.randn(1, model.config.latent_channels, 8, 8),)


def _names(component: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names from the one table of folder components (sd_onnx/components.py)."""
    return BY_NAME[component].inputs, BY_NAME[component].outputs


COMPONENTS = (
    ComponentSpec("text_encoder", _TextEncoder, _text_example, *_names("text_encoder"),
                  {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}}),
    ComponentSpec("unet", _UNet, _unet_example, *_names("unet"),
                  {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "timestep_batch"},
                   # the sequence axis is dynamic: prompts over 75 tokens are encoded in chunks of 77 (A1111)
                   "encoder_hidden_states": {0: "batch", 1: "sequence"},
                   "out_sample": {0: "batch", 2: "height", 3: "width"}}),
    ComponentSpec("vae_encoder", _VaeEncoder, _vae_enc_example, *_names("vae_encoder"),
                  {"sample": {0: "batch", 2: "height", 3: "width"},
                   "latent_sample": {0: "batch", 2: "latent_height", 3: "latent_width"}}),
    ComponentSpec("vae_decoder", _VaeDecoder, _vae_dec_example, *_names("vae_decoder"),
                  {"latent_sample": {0: "batch", 2: "latent_height", 3: "latent_width"},
                   "sample": {0: "batch", 2: "height", 3: "width"}}),
)


def check_opset(opset: int | None) -> int:
    """--opset within what torch's TorchScript exporter writes and the export's fusions need, else one line."""
    max_opset = getattr(torch.onnx._constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
    if opset is None:
        return DEFAULT_OPSET
    if not MIN_OPSET <= opset <= max_opset:
        raise UsageError(f"--opset {opset} is not supported: choose {MIN_OPSET}..{max_opset} (default {DEFAULT_OPSET})")
    return opset


def export_component(spec: ComponentSpec, model: torch.nn.Module, out_dir: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export one component to out_dir/model.onnx; weights go to one external-data file beside it."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "raw.onnx"
    wrapper = spec.wrap(model).eval()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: its graphs are the ones ONNX Runtime's transformer fusions recognise,
        # and it needs far less memory than the dynamo exporter for the full-size UNet.
        torch.onnx.export(
            wrapper,
            spec.example(model),
            str(raw),
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_axes=spec.dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    del wrapper
    gc.collect()
    # Re-save: the UNet's weights (3.4 GB at full size, past protobuf's 2 GB) go to one external file, mmap-able.
    proto = onnx.load(str(raw), load_external_data=True)
    for stale in out_dir.iterdir():
        stale.unlink()
    target = out_dir / "model.onnx"
    if spec.name == "unet":
        onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA, size_threshold=1024)
    else:
        onnx.save_model(proto, str(target))
    del proto
    gc.collect()
    return target

