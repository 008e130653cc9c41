"""LDM-layout state dict + original YAML config -> the reference PyTorch modules (diffusers / transformers)."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from sd_onnx.errors import CheckpointError
from sd_onnx.export.checkpoint import Checkpoint
from sd_onnx.families import Family, detect_family, family_for, get_family
from sd_onnx.onnx_files import quiet_logger

CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass
class ResolvedModel:
    """The reference modules of one checkpoint plus everything the folder writer needs to describe them."""

    family: Family
    family_reason: str
    prediction_type: str
    config_source: str
    scaling_factor: float
    unet: Any
    vae: Any
    text_encoder: Any
    scheduler_config: dict
    default_size: int
    notes: list[str] = field(default_factory=list)


def resolve_config(checkpoint_path: Path, explicit: Path | None, family: Family) -> tuple[dict, str, bool]:
    """The original-LDM YAML: --config, else <stem>.yaml beside the checkpoint (A1111), else the family default.

    Returns (config, where it came from, whether the user supplied it)."""
    if explicit is not None:
        candidates = [(Path(explicit), True)]
        if not Path(explicit).is_file():
            raise CheckpointError(f"config not found: {explicit}")
    else:
        beside = checkpoint_path.with_suffix(".yaml")
        candidates = [(beside, True)] if beside.is_file() else []
    candidates.append((CONFIG_DIR / family.default_config, False))
    path, user = candidates[0]
    try:
        config = yaml.safe_load(path.read_text())
        config["model"]["params"]["unet_config"]["params"]
        config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not an original LDM inference config ({type(e).__name__}: {e})") from None
    return config, (str(path) if user else f"bundled {family.default_config}"), user


def build_reference_model(
    ckpt: Checkpoint, family_name: str = "auto", config_path: Path | None = None
) -> ResolvedModel:
    """Detect the family, resolve the config and load the weights into diffusers/transformers modules."""
    detected, reason = detect_family(ckpt.state_dict, ckpt.global_step)
    if family_name == "auto":
        family = detected
    else:
        family = get_family(family_name)
        if family.text_encoder != detected.text_encoder:
            raise CheckpointError(
                f"--family {family.name} does not fit this checkpoint: its text encoder is that of {detected.name} ({reason})"
            )
        if family.unet_in_channels != detected.unet_in_channels:
            raise CheckpointError(
                f"--family {family.name} does not fit this checkpoint: its UNet takes {detected.unet_in_channels} "
                f"input channels, {family.name}'s {family.unet_in_channels} (it is a {detected.name} model)"
            )
        reason = "--family flag"
    config, source, user_config = resolve_config(ckpt.path, config_path, family)
    params = config["model"]["params"]
    prediction_type = family.prediction_type
    if user_config and family_name == "auto":
        # A config written for this checkpoint is authoritative about the parameterization.
        prediction_type = "v_prediction" if params.get("parameterization") == "v" else "epsilon"
        family = family_for(family.text_encoder, prediction_type, family.unet_in_channels)
        reason += f"; prediction type from {source}"
    sd = ckpt.state_dict
    image_size = int(params.get("image_size", 64)) * 8
    try:
        unet, vae, scaling = _build_unet_vae(config, sd, image_size)
        text_encoder = _build_text_encoder(family, sd)
    except (KeyError, RuntimeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{ckpt.path.name}: weights do not match the {family.name} config {source}: {_short(e)}") from None
    return ResolvedModel(
        family=family,
        family_reason=reason,
        prediction_type=prediction_type,
        config_source=source,
        scaling_factor=scaling,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        scheduler_config=scheduler_config(params, prediction_type),
        default_size=image_size,
    )


def build_from_diffusers(folder: Path, family_name: str = "auto") -> ResolvedModel:
    """A diffusers-format folder (model_index.json, unet/, vae/, text_encoder/) loaded from disk, offline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is a folder but not a diffusers model (no model_index.json)")
    try:
        with quiet_logger("diffusers"):
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
            text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: cannot load the diffusers model ({_short(e)})") from None
    prediction = sched.get("prediction_type", "epsilon")
    encoder = "clip" if text.config.hidden_act == "quick_gelu" else "openclip"
    channels = int(unet.config.in_channels)
    if family_name == "auto":
        family = family_for(encoder, prediction, channels)
        reason = (f"diffusers folder: {text.config.hidden_act} text encoder, {prediction} scheduler, "
                  f"{channels}-channel UNet")
    else:
        family, reason = get_family(family_name), "--family flag"
        prediction = family.prediction_type
        if family.unet_in_channels != channels:
            raise CheckpointError(f"--family {family.name} does not fit {folder}: its UNet takes {channels} input "
                                  f"channels, {family.name}'s {family.unet_in_channels}")
    params = {"linear_start": sched.get("beta_start", 0.00085), "linear_end": sched.get("beta_end", 0.012),
              "timesteps": sched.get("num_train_timesteps", 1000)}
    return ResolvedModel(
        family=family, family_reason=reason, prediction_type=prediction, config_source=str(folder),
        scaling_factor=float(vae.config.scaling_factor), unet=unet.eval(), vae=vae.eval(),
        text_encoder=text.eval(), scheduler_config=scheduler_config(params, prediction),
        default_size=int(unet.config.sample_size) * 8,
    )


def _short(e: BaseException) -> str:
    # str(KeyError) is the repr of its argument: quoted, with its own quotes escaped; use the message itself.
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = text.replace("\n", " ").replace("\t", " ")
    return " ".join(text.split())[:300]


def _build_unet_vae(config: dict, sd: dict, image_size: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    with quiet_logger("diffusers"), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates image_size; we pass the YAML's
        unet_cfg = sfu.create_unet_diffusers_config_from_ldm(config, sd, image_size=image_size)
        unet_sd = sfu.convert_ldm_unet_checkpoint(sd, unet_cfg)
        from sd_onnx.export.fewstep import add_cond_proj

        add_cond_proj(sd, unet_cfg, unet_sd)  # LCM-distilled UNets: the guidance embedding's projection
        vae_cfg = sfu.create_vae_diffusers_config_from_ldm(config, sd, image_size=image_size)
        vae_sd = sfu.convert_ldm_vae_checkpoint(sd, vae_cfg)
    unet = _load_module(UNet2DConditionModel(**unet_cfg), unet_sd, "unet")
    vae = _load_module(AutoencoderKL(**vae_cfg), vae_sd, "vae")
    return unet, vae, float(vae_cfg["scaling_factor"])


def _build_text_encoder(family: Family, sd: dict):
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    if family.text_encoder == "clip":
        te_sd = _strip_text_model(sfu.convert_ldm_clip_checkpoint(sd))
        vocab, width = te_sd["embeddings.token_embedding.weight"].shape
        positions = te_sd["embeddings.position_embedding.weight"].shape[0]
        layers = _count_layers(te_sd, "encoder.layers.")
        inner = te_sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
        act, used_layers = "quick_gelu", layers
    else:
        prefix = "cond_stage_model.model."
        vocab, width = sd[prefix + "token_embedding.weight"].shape
        positions = sd[prefix + "positional_embedding"].shape[0]
        layers = _count_layers(sd, prefix + "transformer.resblocks.")
        inner = sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        act, used_layers = "gelu", layers - 1  # SD 2.x conditions on the penultimate layer
    te_config = CLIPTextConfig(
        vocab_size=int(vocab),
        hidden_size=int(width),
        intermediate_size=int(inner),
        num_hidden_layers=int(used_layers),
        num_attention_heads=int(width) // 64,  # CLIP's head size is 64 in every SD text encoder
        max_position_embeddings=int(positions),
        hidden_act=act,
        projection_dim=int(width),
        bos_token_id=0,
        eos_token_id=2,  # keep transformers' legacy argmax pooling, as the released SD configs do
        pad_token_id=1,
    )
    model = CLIPTextModel(te_config)
    if family.text_encoder == "openclip":
        # diffusers' ignore list assumes 24 layers; drop every layer past the penultimate ourselves.
        dropped = {k for k in sd if k.startswith(f"{prefix}transformer.resblocks.{used_layers}.")}
        te_sd = _strip_text_model(sfu.convert_open_clip_checkpoint(model, {k: v for k, v in sd.items() if k not in dropped}))
    te_sd = {k: v for k, v in te_sd.items() if "position_ids" not in k and "text_projection" not in k}
    # transformers 4 nests the weights under "text_model.", transformers 5 does not; match the installed one.
    if any(k.startswith("text_model.") for k in model.state_dict()):
        te_sd = {"text_model." + k: v for k, v in te_sd.items()}
    return _load_module(model, te_sd, "text_encoder")


def _strip_text_model(sd: dict) -> dict:
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _count_layers(sd: dict, prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    if not idx:
        raise KeyError(f"{prefix}0 (no text encoder layers)")
    return max(idx) + 1


def _load_module(module: torch.nn.Module, state_dict: dict, name: str) -> torch.nn.Module:
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise KeyError(f"{name} is missing {len(missing)} weight(s), e.g. '{missing[0]}'")
    for key, want in expected.items():
        got = state_dict[key].shape
        if want != got:
            raise ValueError(f"{name} weight '{key}' has shape {tuple(got)}, the config expects {tuple(want)}")
    module.load_state_dict({k: state_dict[k].float() for k in expected}, strict=True)
    return module.eval().requires_grad_(False)


def scheduler_config(params: dict, prediction_type: str) -> dict:
    """The training noise schedule as a diffusers scheduler config (what the runtime's samplers read)."""
    return {
        "_class_name": "PNDMScheduler",
        "beta_start": float(params.get("linear_start", 0.00085)),
        "beta_end": float(params.get("linear_end", 0.012)),
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": int(params.get("timesteps", 1000)),
        "prediction_type": prediction_type,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
        "trained_betas": None,
    }
