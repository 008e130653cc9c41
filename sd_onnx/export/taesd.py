"""`sd-onnx export-vae-approx`: TAESD (madebyollin's tiny autoencoder) weights -> ONNX decoder/encoder folder."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from sd_onnx import __version__
from sd_onnx.errors import CheckpointError
from sd_onnx.export.checkpoint import file_hashes, load_checkpoint
from sd_onnx.home import METADATA
from sd_onnx.runtime.vae_approx import SCALING_FACTOR, vae_approx_dir
from sd_onnx.staging import check_output, dump_json, staged_folder

# diffusers' AutoencoderTiny for SD 1.x/2.x (and SDXL's taesdxl, which has the same shapes): the reference module.
TAESD_CONFIG = {"in_channels": 3, "out_channels": 3, "encoder_block_out_channels": [64, 64, 64, 64],
                "decoder_block_out_channels": [64, 64, 64, 64], "act_fn": "relu", "upsample_fn": "nearest",
                "latent_channels": 4, "upsampling_scaling_factor": 2, "num_encoder_blocks": [1, 3, 3, 3],
                "num_decoder_blocks": [3, 3, 3, 1], "latent_magnitude": 3, "latent_shift": 0.5,
                "force_upcast": False, "scaling_factor": SCALING_FACTOR, "shift_factor": 0.0}
_INDEXED = re.compile(r"^(\d+)\.(.+)$")


@dataclass
class VaeApproxResult:
    folder: Path
    components: tuple[str, ...]
    seconds: float


def classify(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"vae_decoder": ..., "vae_encoder": ...} in diffusers' AutoencoderTiny keys, from a taesd.py file (an
    nn.Sequential: `0.weight`, `1.conv.0.weight`, ...) or a diffusers AutoencoderTiny state dict. taesd.py's
    encoder starts with conv(3, 64) at index 0; its decoder has Clamp at 0 (no weights) and conv(4, 64) at 1."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for part, component in (("decoder", "vae_decoder"), ("encoder", "vae_encoder")):
        prefix = f"{part}.layers."
        sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if sub:
            found[component] = sub
    if found:
        return found
    if not all(_INDEXED.match(k) for k in state_dict):
        raise CheckpointError("not a TAESD file: expected taesd.py's numbered layers (0.weight, 1.conv.0.weight, ...) "
                              "or diffusers AutoencoderTiny keys (decoder.layers.*, encoder.layers.*)")
    first = state_dict.get("0.weight")
    if first is not None and first.ndim == 4 and first.shape[1] == 3:
        return {"vae_encoder": dict(state_dict)}
    if "0.weight" not in state_dict and "1.weight" in state_dict:
        # the decoder's Sequential has Clamp at index 0: diffusers' DecoderTiny applies it in forward()
        shifted = {}
        for key, value in state_dict.items():
            index, rest = _INDEXED.match(key).groups()
            shifted[f"{int(index) - 1}.{rest}"] = value
        return {"vae_decoder": shifted}
    raise CheckpointError("not a TAESD file: its first layer is neither the encoder's conv(3, 64) nor, after the "
                          "decoder's Clamp, a conv from the latent channels")


def build_autoencoder_tiny(parts: Mapping[str, Mapping[str, torch.Tensor]]):
    """diffusers' AutoencoderTiny with the given decoder/encoder weights loaded (strictly: every weight must fit)."""
    from diffusers import AutoencoderTiny

    config = dict(TAESD_CONFIG)
    dec = parts.get("vae_decoder")
    if dec is not None and "0.weight" in dec:
        config["latent_channels"] = int(dec["0.weight"].shape[1])
    vae = AutoencoderTiny(**config).eval()
    for component, module in (("vae_decoder", vae.decoder.layers), ("vae_encoder", vae.encoder.layers)):
        if component in parts:
            try:
                module.load_state_dict({k: v.float() for k, v in parts[component].items()}, strict=True)
            except RuntimeError as e:
                detail = str(e).strip().splitlines()
                raise CheckpointError(f"TAESD {component[4:]} weights do not fit the SD 1/2 TAESD architecture "
                                      f"({detail[1].strip() if len(detail) > 1 else detail[0]})"[:300]) from None
    return vae


class _Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor):
        return self.vae.decode(latent_sample, return_dict=False)[0]  # [-1, 1], as the full VAE's


class _Encoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor):
        return self.vae.encode(sample, return_dict=False)[0]  # takes [-1, 1]; latents in the UNet's scale


_SPECS = {  # component -> (wrapper, example input, input name, output name)
    "vae_decoder": (_Decoder, lambda c: torch.randn(1, c, 8, 8), "latent_sample", "sample"),
    "vae_encoder": (_Encoder, lambda c: torch.randn(1, 3, 64, 64), "sample", "latent_sample"),
}


def export_vae_approx(files: list[Path], output: Path | None = None, name: str | None = None, force: bool = False,
                      opset: int = 17, log: Callable[[str], None] = lambda m: None) -> VaeApproxResult:
    """Export taesd_decoder.pth (and/or taesd_encoder.pth, or one diffusers AutoencoderTiny file) to
    `$SD_ONNX_HOME/vae-approx/<name>` (name: `taesd` from `taesd_decoder.pth`), the place A1111 keeps them."""
    import onnx

    start = time.perf_counter()
    files = [Path(f) for f in files]
    if not files:
        raise CheckpointError("export-vae-approx needs a TAESD file (taesd_decoder.pth, taesd_encoder.pth)")
    name = name or re.sub(r"[_.-](decoder|encoder)$", "", files[0].stem)
    output = Path(output) if output is not None else vae_approx_dir() / name
    check_output(output, force, files)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    sources = {}
    for path in files:
        for component, weights in classify(load_checkpoint(path).state_dict).items():
            if component in parts:
                raise CheckpointError(f"{path.name}: a second TAESD {component[4:]} (one of each, please)")
            parts[component] = weights
            sources[component] = {"name": path.name, **file_hashes(path)}
    vae = build_autoencoder_tiny(parts)
    latent_channels = vae.config.latent_channels
    with staged_folder(output, force) as tmp:
        for component in parts:
            log(f"exporting the TAESD {component[4:]}")
            wrap, example, input_name, output_name = _SPECS[component]
            target = tmp / component / "model.onnx"
            target.parent.mkdir()
            with torch.inference_mode():
                torch.onnx.export(wrap(vae).eval(), (example(latent_channels),), str(target),
                                  input_names=[input_name], output_names=[output_name],
                                  dynamic_axes={input_name: {0: "batch", 2: "height", 3: "width"},
                                                output_name: {0: "batch", 2: "height", 3: "width"}},
                                  opset_version=opset, do_constant_folding=True, dynamo=False)
            onnx.checker.check_model(str(target))
            dump_json(tmp / component / "config.json", dict(vae.config))
        dump_json(tmp / METADATA, {
            "format": 1, "kind": "taesd", "scaling_factor": SCALING_FACTOR, "latent_channels": latent_channels,
            "components": {c: {"file": f"{c}/model.onnx", "precision": "fp32"} for c in parts},
            "source": sources, "opset": opset,
            "versions": {"sd_onnx": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
        })
    return VaeApproxResult(output, tuple(parts), round(time.perf_counter() - start, 2))
