"""Random-weight checkpoints in the original LDM layout (tiny for tests and self-test, full size for benchmarks)."""

from __future__ import annotations


import re
import warnings
from pathlib import Path

import torch
import yaml

from sd_onnx.export.convert import CONFIG_DIR
from sd_onnx.families import get_family

# Tiny architecture: every shape rule of the real models holds (GroupNorm of 32, CLIP head size 64, VAE /8,
# SD 2.x penultimate text layer, linear vs conv projections), at a size a test exports in seconds.
_TINY_UNET = {
    "model_channels": 32,
    "channel_mult": [1, 2],
    "attention_resolutions": [1],
    "num_res_blocks": 1,
    "transformer_depth": 1,
}
_TINY_VAE = {"ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1}
_TEXT = {
    # family text encoder -> (width, layers in the checkpoint, mlp width, activation)
    ("clip", "tiny"): (64, 2, 128, "quick_gelu"),
    ("openclip", "tiny"): (64, 3, 128, "gelu"),
    ("clip", "full"): (768, 12, 3072, "quick_gelu"),
    ("openclip", "full"): (1024, 24, 4096, "gelu"),
}
CLIP_VOCAB = 49408


def ldm_config(family_name: str, size: str = "tiny") -> dict:
    """The original-LDM YAML of a family, shrunk for size='tiny'."""
    family = get_family(family_name)
    config = yaml.safe_load((CONFIG_DIR / family.default_config).read_text())
    if size == "full":
        return config
    params = config["model"]["params"]
    params["image_size"] = 8  # latent size the tiny model nominally trains at (64 px)
    unet = params["unet_config"]["params"]
    unet.update(_TINY_UNET)
    unet["context_dim"] = _TEXT[(family.text_encoder, "tiny")][0]
    if "num_heads" in unet:
        unet["num_heads"] = 2
    else:
        unet["num_head_channels"] = 16
    params["first_stage_config"]["params"]["ddconfig"].update(_TINY_VAE)
    return config


def build_modules(family_name: str, size: str = "tiny", seed: int = 0):
    """Randomly initialised diffusers UNet and VAE and a transformers CLIP text model of the family's shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    family = get_family(family_name)
    config = ldm_config(family_name, size)
    image_size = int(config["model"]["params"]["image_size"]) * 8
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet_cfg = sfu.create_unet_diffusers_config_from_ldm(config, {}, image_size=image_size)
        vae_cfg = sfu.create_vae_diffusers_config_from_ldm(config, {}, image_size=image_size)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    width, layers, inner, act = _TEXT[(family.text_encoder, size)]
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB,
            hidden_size=width,
            intermediate_size=inner,
            num_hidden_layers=layers,
            num_attention_heads=width // 64,
            hidden_act=act,
            projection_dim=width,
        )
    )
    if size == "tiny":
        _spread_weights(unet, vae, text, seed=seed)
    return config, unet, vae, text


def _spread_weights(*modules: torch.nn.Module, seed: int) -> None:
    """Give norms and biases random values too, so a mis-mapped weight cannot hide behind a default 1 or 0."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if name.endswith("bias") or p.ndim == 1:
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))


def ldm_state_dict(family_name: str, unet, vae, text, config: dict) -> dict[str, torch.Tensor]:
    """The diffusers/transformers weights renamed into the CompVis/Stability LDM key layout."""
    family = get_family(family_name)
    unet_params = config["model"]["params"]["unet_config"]["params"]
    sd: dict[str, torch.Tensor] = {}
    sd.update(_prefix("model.diffusion_model.", _unet_to_ldm(unet.state_dict(), unet_params)))
    sd.update(_prefix("first_stage_model.", _vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))))
    if family.text_encoder == "clip":
        # Released SD 1.x checkpoints nest CLIP under "text_model." (transformers 4 layout).
        te = {("text_model." + k.removeprefix("text_model.")): v for k, v in text.state_dict().items()}
        sd.update(_prefix("cond_stage_model.transformer.", te))
    else:
        sd.update(_prefix("cond_stage_model.model.", _text_to_openclip(text)))
    return {k: v.detach().contiguous() for k, v in sd.items() if "position_ids" not in k}


def write_checkpoint(
    path: Path, family_name: str, size: str = "tiny", seed: int = 0, with_yaml: bool = True, cond_proj_dim: int = 0
) -> Path:
    """Write a random-weight checkpoint (.ckpt zip with a Lightning-style wrapper, or .safetensors).
    `cond_proj_dim`: an LCM-distilled UNet's guidance projection of that width (LCM_Dreamshaper: 256)."""
    path = Path(path)
    config, unet, vae, text = build_modules(family_name, size, seed)
    sd = ldm_state_dict(family_name, unet, vae, text, config)
    if cond_proj_dim:
        from sd_onnx.export.fewstep import LDM_COND_PROJ

        channels = config["model"]["params"]["unet_config"]["params"]["model_channels"]
        sd[LDM_COND_PROJ] = torch.randn(channels, cond_proj_dim, generator=torch.Generator().manual_seed(seed)) * 0.3
    del unet, vae, text
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 0}, path)
    if with_yaml:
        path.with_suffix(".yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _prefix(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def _rename(sd: dict, table: list[tuple[str, str]]) -> dict:
    out = {}
    for key, value in sd.items():
        for pattern, repl in table:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


_RESNET_UNET = [(r"\.norm1\.", ".in_layers.0."), (r"\.conv1\.", ".in_layers.2."), (r"\.norm2\.", ".out_layers.0."),
                (r"\.conv2\.", ".out_layers.3."), (r"\.time_emb_proj\.", ".emb_layers.1."),
                (r"\.conv_shortcut\.", ".skip_connection.")]


def _unet_to_ldm(sd: dict, unet_params: dict) -> dict:
    levels = len(unet_params["channel_mult"])
    n = unet_params["num_res_blocks"]
    attn_levels = {i for i in range(levels) if 2**i in unet_params["attention_resolutions"]}
    table = [(r"^time_embedding\.linear_1\.", "time_embed.0."), (r"^time_embedding\.linear_2\.", "time_embed.2."),
             (r"^conv_in\.", "input_blocks.0.0."), (r"^conv_norm_out\.", "out.0."), (r"^conv_out\.", "out.2."),
             (r"^mid_block\.resnets\.0\.", "middle_block.0."), (r"^mid_block\.attentions\.0\.", "middle_block.1."),
             (r"^mid_block\.resnets\.1\.", "middle_block.2.")]
    for i in range(levels):
        for j in range(n):
            table.append((rf"^down_blocks\.{i}\.resnets\.{j}\.", f"input_blocks.{(n + 1) * i + j + 1}.0."))
            table.append((rf"^down_blocks\.{i}\.attentions\.{j}\.", f"input_blocks.{(n + 1) * i + j + 1}.1."))
        if i < levels - 1:
            table.append((rf"^down_blocks\.{i}\.downsamplers\.0\.conv\.", f"input_blocks.{(n + 1) * (i + 1)}.0.op."))
        up_level = levels - 1 - i  # up block i runs at the resolution of down level levels-1-i
        for j in range(n + 1):
            table.append((rf"^up_blocks\.{i}\.resnets\.{j}\.", f"output_blocks.{(n + 1) * i + j}.0."))
            table.append((rf"^up_blocks\.{i}\.attentions\.{j}\.", f"output_blocks.{(n + 1) * i + j}.1."))
        if i < levels - 1:
            slot = 2 if up_level in attn_levels else 1
            table.append((rf"^up_blocks\.{i}\.upsamplers\.0\.", f"output_blocks.{(n + 1) * i + n}.{slot}."))
    resnet_keys = {k for k in sd if ".resnets." in k}
    renamed = {}
    for key, value in sd.items():
        if key in resnet_keys:
            for pattern, repl in _RESNET_UNET:
                key = re.sub(pattern, repl, key)
        for pattern, repl in table:
            key = re.sub(pattern, repl, key)
        renamed[key] = value
    return renamed


def _vae_to_ldm(sd: dict, levels: int) -> dict:
    table = [(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}."),
             (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."), (r"\.conv_shortcut\.", ".nin_shortcut."),
             (r"\.conv_norm_out\.", ".norm_out."),
             (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
             (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
             (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block."),
             (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
              lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample."),
             (r"\.attn_1\.group_norm\.", ".attn_1.norm."), (r"\.attn_1\.to_q\.", ".attn_1.q."),
             (r"\.attn_1\.to_k\.", ".attn_1.k."), (r"\.attn_1\.to_v\.", ".attn_1.v."),
             (r"\.attn_1\.to_out\.0\.", ".attn_1.proj_out.")]
    out = _rename(sd, table)
    # The LDM VAE's attention projections are 1x1 convolutions.
    return {k: (v[:, :, None, None] if ".attn_1." in k and k.endswith("weight") and v.ndim == 2 else v)
            for k, v in out.items()}


def _text_to_openclip(text) -> dict:
    sd = {"text_model." + k.removeprefix("text_model."): v for k, v in text.state_dict().items()}
    width = text.config.hidden_size
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": torch.randn(width, width) * width**-0.5,
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(text.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{part}"] = torch.cat([sd[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv"])
            out[f"{dst}attn.out_proj.{part}"] = sd[f"{src}self_attn.out_proj.{part}"]
            out[f"{dst}ln_1.{part}"] = sd[f"{src}layer_norm1.{part}"]
            out[f"{dst}ln_2.{part}"] = sd[f"{src}layer_norm2.{part}"]
            out[f"{dst}mlp.c_fc.{part}"] = sd[f"{src}mlp.fc1.{part}"]
            out[f"{dst}mlp.c_proj.{part}"] = sd[f"{src}mlp.fc2.{part}"]
    return out


