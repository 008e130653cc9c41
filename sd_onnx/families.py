"""What differs between the supported model families, as data, and their detection from checkpoint keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from sd_onnx.errors import CheckpointError


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    default_config: str  # bundled original-LDM YAML (sd_onnx/export/configs/)
    text_encoder: str  # "clip" (OpenAI CLIP ViT-L, last layer) | "openclip" (OpenCLIP ViT-H, penultimate layer)
    prediction_type: str  # "epsilon" | "v_prediction"
    pad_token: str  # SD 1.x tokenizers pad with <|endoftext|>, SD 2.x with "!"
    default_size: int  # the resolution the family was trained at
    # 4, or 9 for an inpainting UNet: noisy latent (4) + mask (1) + latent of the masked picture (4), concatenated
    # on the channel axis (LDM's conditioning_key "hybrid"); read from input_blocks.0.0.weight
    unet_in_channels: int = 4


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd1", "Stable Diffusion 1.x (CLIP ViT-L, eps)", "v1-inference.yaml", "clip", "epsilon", "<|endoftext|>", 512),
        Family("sd2", "Stable Diffusion 2.x 512 (OpenCLIP ViT-H, eps)", "v2-inference.yaml", "openclip", "epsilon", "!", 512),
        Family("sd2-v", "Stable Diffusion 2.x 768-v (OpenCLIP ViT-H, v-prediction)", "v2-inference-v.yaml", "openclip", "v_prediction", "!", 768),
        # sd-v1-5-inpainting.ckpt (RunwayML) and 512-inpainting-ema.ckpt (Stability, eps): A1111 picks these
        # configs for a 9-channel input_blocks.0.0 too (sd_models_config.guess_model_config_from_state_dict)
        Family("sd1-inpaint", "Stable Diffusion 1.x inpainting (CLIP ViT-L, eps, 9-channel UNet)",
               "v1-inpainting-inference.yaml", "clip", "epsilon", "<|endoftext|>", 512, 9),
        Family("sd2-inpaint", "Stable Diffusion 2.x 512 inpainting (OpenCLIP ViT-H, eps, 9-channel UNet)",
               "v2-inpainting-inference.yaml", "openclip", "epsilon", "!", 512, 9),
    )
}

# Keys whose presence tells the text encoder apart (CompVis/Stability LDM layout).
SD1_TEXT_KEYS = (
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.embeddings.token_embedding.weight",
)
SD2_TEXT_KEY = "cond_stage_model.model.token_embedding.weight"
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
VAE_KEY = "first_stage_model.decoder.conv_in.weight"
# Stability's SD 2.0-base (512, eps) checkpoint was saved at this step; diffusers uses the same rule.
SD2_BASE_GLOBAL_STEP = 875000


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise CheckpointError(f"unknown family '{name}': choose one of {', '.join(FAMILIES)}") from None


def family_for(text_encoder: str, prediction_type: str, unet_in_channels: int) -> Family:
    """The one family with these traits (how a config or a diffusers folder that states them is matched)."""
    for family in FAMILIES.values():
        if (family.text_encoder, family.prediction_type, family.unet_in_channels) == (
                text_encoder, prediction_type, unet_in_channels):
            return family
    kind = "inpainting " if unet_in_channels == 9 else ""
    raise CheckpointError(f"no supported family is a {kind}{text_encoder} model with {prediction_type} prediction "
                          f"and {unet_in_channels} UNet input channels")


def unet_in_channels(state_dict: Mapping[str, object]) -> int:
    """Input channels of the UNet's first convolution: 4 (normal) or 9 (inpainting), else one clear line."""
    shape = tuple(getattr(state_dict[UNET_KEY], "shape", ()))
    channels = int(shape[1]) if len(shape) == 4 else 0
    if channels not in {f.unet_in_channels for f in FAMILIES.values()}:
        raise CheckpointError(
            f"unsupported UNet: '{UNET_KEY}' has shape {shape}, i.e. {channels} input channels; supported are 4 "
            "(text-to-image) and 9 (inpainting models); 5 (depth-to-image) and 8 (instruct-pix2pix) are not"
        )
    return channels


def detect_family(state_dict: Mapping[str, object], global_step: int | None = None) -> tuple[Family, str]:
    """The family of an LDM-layout state dict, and the reason, from its keys (never from its file name)."""
    missing = [k for k in (UNET_KEY, VAE_KEY) if k not in state_dict]
    if missing:
        raise CheckpointError(
            f"not a Stable Diffusion checkpoint in the original LDM layout: key '{missing[0]}' is missing"
        )
    if any(k in state_dict for k in SD1_TEXT_KEYS):
        if unet_in_channels(state_dict) == 9:
            return family_for("clip", "epsilon", 9), f"CLIP ViT-L text encoder keys, 9-channel {UNET_KEY} (inpainting)"
        return FAMILIES["sd1"], "CLIP ViT-L text encoder keys (cond_stage_model.transformer.*)"
    if SD2_TEXT_KEY in state_dict:
        if unet_in_channels(state_dict) == 9:  # Stability's only SD 2.x inpainting model, 512-inpainting-ema, is eps
            return family_for("openclip", "epsilon", 9), (
                f"OpenCLIP text encoder, 9-channel {UNET_KEY} (SD 2.x 512 inpainting, eps)")
        if global_step == SD2_BASE_GLOBAL_STEP:
            return FAMILIES["sd2"], f"OpenCLIP text encoder, global_step {global_step} (SD 2.x 512-base, eps)"
        return FAMILIES["sd2-v"], (
            "OpenCLIP text encoder (cond_stage_model.model.*); assumed v-prediction as SD 2.x 768 "
            "(use --family sd2 or a <name>.yaml without parameterization for 512-base models)"
        )
    raise CheckpointError(
        "unknown family: the checkpoint has no SD 1.x (cond_stage_model.transformer.*) or SD 2.x "
        "(cond_stage_model.model.*) text encoder keys; SDXL and other families are not supported yet"
    )
