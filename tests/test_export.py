"""Export of tiny LDM checkpoints: each ONNX component against the reference modules, the folder layout, inputs.

The reference is loaded independently of our converter (sd_onnx.export.convert):
- UNet and VAE: diffusers' own single-file loader, `UNet2DConditionModel.from_single_file(ckpt,
  original_config=<stem>.yaml, local_files_only=True)` (works offline given the original YAML);
- text encoder: diffusers' single-file CLIP loader `create_diffusers_clip_model_from_ldm` on a CLIP config
  written here by hand (the offline `from_single_file` needs the hub for CLIP configs), with the rules of
  the released configs: CLIP head size 64, quick_gelu for SD 1.x, gelu and the penultimate layer (23 of
  24) for SD 2.x, eos_token_id 2 (transformers' legacy argmax pooling).
Without accelerate, diffusers loads those weights with strict=False, so a weight its conversion missed would
silently keep its random init: `_assert_weights_from_checkpoint` checks each reference weight equals a tensor
of the checkpoint, bit for bit.

Tolerance: fp32 vs fp32, max abs diff <= 1e-4 * max(1, max|reference|). The outputs are O(1) (|x| <= ~4), the
measured differences 1e-6..1e-5 (reduction order of ONNX Runtime's kernels vs PyTorch's), so 1e-4 leaves a
10x margin while any wrong weight, wrong timestep handling or wrong layer moves outputs by >= 1e-2.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from sd_onnx.errors import CheckpointError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from sd_onnx.cli import main  # noqa: E402
from sd_onnx.export import synthetic  # noqa: E402
from sd_onnx.export.checkpoint import load_checkpoint  # noqa: E402
from sd_onnx.export.convert import build_reference_model  # noqa: E402
from sd_onnx.export.exporter import export_model  # noqa: E402

FAMILIES = ("sd1", "sd2", "sd2-v")
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
PREDICTION = {"sd1": "epsilon", "sd2": "epsilon", "sd2-v": "v_prediction"}
PAD_TOKEN = {"sd1": "<|endoftext|>", "sd2": "!", "sd2-v": "!"}
BOS, EOS = 49406, 49407
PAD_ID = {"sd1": EOS, "sd2": 0, "sd2-v": 0}  # "!" is id 0 in the CLIP vocabulary
TOL = 1e-4  # see the module docstring


def assert_close(got: np.ndarray, want: np.ndarray, what: str, tol: float = TOL) -> float:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    bound = tol * max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    assert err <= bound, f"{what}: max abs diff {err:.3g} > {bound:.3g}"
    return err


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and OpenMP's spinning barriers slow PyTorch 100x when the two cores
    are shared with other work (measured: 2 s instead of 20 ms per tiny UNet call)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------
# reference modules, ONNX sessions, inputs


def _digest(t) -> str:
    return hashlib.sha1(t.detach().float().contiguous().numpy().tobytes()).hexdigest()


def _assert_weights_from_checkpoint(module, ldm_sd: dict, name: str) -> None:
    pool = set()
    for v in ldm_sd.values():
        if not v.is_floating_point():
            continue
        pool.add(_digest(v))
        if v.ndim >= 1 and v.shape[0] % 3 == 0:  # OpenCLIP's fused in_proj: q, k, v thirds
            pool.update(_digest(part) for part in v.chunk(3))
    stray = [k for k, v in module.state_dict().items() if v.is_floating_point() and _digest(v) not in pool]
    assert not stray, f"reference {name}: {len(stray)} weight(s) not loaded from the checkpoint, e.g. {stray[0]}"


def _clip_config(family: str, sd: dict) -> dict:
    openclip = family != "sd1"
    if openclip:
        vocab, width = sd["cond_stage_model.model.token_embedding.weight"].shape
        prefix = "cond_stage_model.model.transformer.resblocks."
        inner = sd[prefix + "0.mlp.c_fc.weight"].shape[0]
    else:
        vocab, width = sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape
        prefix = "cond_stage_model.transformer.text_model.encoder.layers."
        inner = sd[prefix + "0.mlp.fc1.weight"].shape[0]
    layers = 1 + max(int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix))
    return {
        "vocab_size": int(vocab), "hidden_size": int(width), "intermediate_size": int(inner),
        "num_attention_heads": int(width) // 64, "max_position_embeddings": 77,
        "num_hidden_layers": layers - 1 if openclip else layers,  # SD 2.x: penultimate layer
        "hidden_act": "gelu" if openclip else "quick_gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "projection_dim": int(width),
    }


def load_reference(ckpt: Path, family: str, workdir: Path) -> dict:
    """UNet/VAE through diffusers' from_single_file, CLIP through diffusers' single-file CLIP loader."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    original = str(ckpt.with_suffix(".yaml"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_single_file(str(ckpt), original_config=original, local_files_only=True)
        vae = AutoencoderKL.from_single_file(str(ckpt), original_config=original, local_files_only=True)
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]  # our own fixture file
        config_dir = workdir / f"clip-{family}"
        CLIPTextConfig(**_clip_config(family, sd)).save_pretrained(config_dir)
        te_sd = sd
        if family != "sd1":  # diffusers drops layer 23 of 24 by a fixed key list; drop the tiny last layer alike
            last = _clip_config(family, sd)["num_hidden_layers"]
            te_sd = {k: v for k, v in sd.items() if not k.startswith(f"cond_stage_model.model.transformer.resblocks.{last}.")}
        text = sfu.create_diffusers_clip_model_from_ldm(CLIPTextModel, te_sd, config=str(config_dir), local_files_only=True)
    modules = {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval()}
    for name, module in modules.items():
        _assert_weights_from_checkpoint(module, sd, name)
    return modules


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    made: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in made:
            made[family] = load_reference(tiny_checkpoint(family), family, workdir)
        return made[family]

    return get


_SESSIONS: dict[tuple[str, str], object] = {}


def session(folder: Path, component: str):
    key = (str(folder), component)
    if key not in _SESSIONS:
        _SESSIONS[key] = ort.InferenceSession(str(folder / component / "model.onnx"), providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def token_ids(family: str, batch: int, seed: int = 0) -> np.ndarray:
    """BOS, a few random tokens, EOS, then the family's pad id: a tokenized prompt of each length."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, 77), PAD_ID[family], dtype=np.int32)
    for b in range(batch):
        n = 4 + 9 * b
        ids[b, 0], ids[b, n + 1] = BOS, EOS
        ids[b, 1 : n + 1] = rng.integers(256, 49000, n)
    return ids


def run_text_encoder(folder: Path, ref: dict, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, str]]:
    got = session(folder, "text_encoder").run(["last_hidden_state", "pooler_output"], {"input_ids": ids})
    with torch.no_grad():
        out = ref["text_encoder"](input_ids=torch.from_numpy(ids.astype(np.int64)))
    return [(got[0], out.last_hidden_state.numpy(), "last_hidden_state"), (got[1], out.pooler_output.numpy(), "pooler_output")]


def run_unet(folder: Path, ref: dict, sample: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> tuple:
    got = session(folder, "unet").run(["out_sample"], {"sample": sample, "timestep": timestep, "encoder_hidden_states": context})[0]
    # A timestep of shape [1] means the same t for every latent of the batch.
    t = torch.from_numpy(np.broadcast_to(timestep, (sample.shape[0],)).copy())
    with torch.no_grad():
        want = ref["unet"](torch.from_numpy(sample), t, torch.from_numpy(context)).sample.numpy()
    return got, want


def run_vae_encoder(folder: Path, ref: dict, image: np.ndarray) -> tuple:
    got = session(folder, "vae_encoder").run(["latent_sample"], {"sample": image})[0]
    with torch.no_grad():
        want = ref["vae"].encode(torch.from_numpy(image)).latent_dist.mean.numpy()
    return got, want


def run_vae_decoder(folder: Path, ref: dict, latent: np.ndarray) -> tuple:
    got = session(folder, "vae_decoder").run(["sample"], {"latent_sample": latent})[0]
    with torch.no_grad():
        want = ref["vae"].decode(torch.from_numpy(latent)).sample.numpy()
    return got, want


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def assert_folder_matches_reference(folder: Path, ref: dict, family: str) -> None:
    """One input per component (batch 2, non-square): for the exports from other inputs than the fixture's."""
    for got, want, what in run_text_encoder(folder, ref, token_ids(family, 2)):
        assert_close(got, want, f"text_encoder {what}")
    context = randn(2, 154, ref["unet"].config.cross_attention_dim, seed=1)
    assert_close(*run_unet(folder, ref, randn(2, 4, 8, 12), np.array([999.5, 10.25], np.float32), context), "unet")
    assert_close(*run_vae_encoder(folder, ref, np.tanh(randn(2, 3, 64, 96, seed=2))), "vae_encoder")
    assert_close(*run_vae_decoder(folder, ref, randn(2, 4, 8, 12, seed=3)), "vae_decoder")


# ----------------------------------------------------------------------------------------------------------
# each component equals the reference


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_text_encoder_matches_reference(family, batch, tiny_model, reference):
    folder, ref = tiny_model(family), reference(family)
    ids = token_ids(family, batch, seed=batch)
    assert session(folder, "text_encoder").get_inputs()[0].type == "tensor(int32)"
    for got, want, what in run_text_encoder(folder, ref, ids):
        assert_close(got, want, f"{family} text_encoder {what} batch {batch}")


UNET_CASES = [
    # batch, latent (h, w), timestep, context tokens
    pytest.param(1, (8, 8), [500.0], 77, id="b1-8x8-t[1]-77tok"),
    pytest.param(2, (8, 12), [981.0], 77, id="b2-8x12-t[1]-77tok"),
    pytest.param(2, (8, 12), [999.5, 10.25], 154, id="b2-8x12-t[B]frac-154tok"),
    pytest.param(1, (12, 8), [0.75], 154, id="b1-12x8-t[1]frac-154tok"),
    # sides that are multiples of 8 px but not of 64 px (A1111 accepts them): the up-blocks must follow the skip
    # connections' sizes (latent 9 -> 5 -> 9, not 5 -> 10); 72x136 px and 520x680 px
    pytest.param(1, (9, 17), [500.0], 77, id="b1-9x17-72x136px"),
    pytest.param(2, (65, 85), [250.0], 77, id="b2-65x85-520x680px"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch, hw, timestep, tokens", UNET_CASES)
def test_unet_matches_reference(family, batch, hw, timestep, tokens, tiny_model, reference):
    folder, ref = tiny_model(family), reference(family)
    sample = randn(batch, 4, *hw, seed=batch)
    t = np.array(timestep, dtype=np.float32)
    context = randn(batch, tokens, ref["unet"].config.cross_attention_dim, seed=tokens)
    got, want = run_unet(folder, ref, sample, t, context)
    assert_close(got, want, f"{family} unet")
    if np.any(t != np.floor(t)):
        # The case must be able to catch a graph that rounds or truncates t: the reference moves by far more.
        _, at_floor = run_unet(folder, ref, sample, np.floor(t), context)
        assert np.abs(at_floor - want).max() > 10 * TOL * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch, hw", [(1, (64, 64)), (2, (64, 96)), (1, (96, 64))])
def test_vae_encoder_is_latent_mean(family, batch, hw, tiny_model, reference):
    folder, ref = tiny_model(family), reference(family)
    image = np.tanh(randn(batch, 3, *hw, seed=batch))  # images are fed in [-1, 1]
    got, want = run_vae_encoder(folder, ref, image)
    assert got.shape == (batch, 4, hw[0] // 8, hw[1] // 8)
    assert_close(got, want, f"{family} vae_encoder")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch, hw", [(1, (8, 8)), (2, (8, 12)), (1, (12, 8))])
def test_vae_decoder_matches_reference(family, batch, hw, tiny_model, reference):
    folder, ref = tiny_model(family), reference(family)
    got, want = run_vae_decoder(folder, ref, randn(batch, 4, *hw, seed=batch))
    assert got.shape == (batch, 3, hw[0] * 8, hw[1] * 8)
    assert_close(got, want, f"{family} vae_decoder")


# ----------------------------------------------------------------------------------------------------------
# the fixture layout is the real LDM layout


@pytest.mark.parametrize("family", FAMILIES)
def test_synthetic_ldm_round_trips_through_diffusers_conversion(family):
    """Our LDM renaming, undone by diffusers' own LDM -> diffusers conversion, gives back every weight exactly."""
    from diffusers.loaders import single_file_utils as sfu

    config, unet, vae, text = synthetic.build_modules(family, seed=3)
    sd = synthetic.ldm_state_dict(family, unet, vae, text, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet_cfg = sfu.create_unet_diffusers_config_from_ldm(config, sd, image_size=64)
        vae_cfg = sfu.create_vae_diffusers_config_from_ldm(config, sd, image_size=64)
    converted = {
        "unet": sfu.convert_ldm_unet_checkpoint(sd, unet_cfg),
        "vae": sfu.convert_ldm_vae_checkpoint(sd, vae_cfg),
        "text": sfu.convert_ldm_clip_checkpoint(sd) if family == "sd1" else sfu.convert_open_clip_checkpoint(text, sd),
    }
    for name, module in (("unet", unet), ("vae", vae), ("text", text)):
        want = {k.removeprefix("text_model."): v for k, v in module.state_dict().items() if "position_ids" not in k}
        got = {k.removeprefix("text_model."): v for k, v in converted[name].items()}
        assert set(got) == set(want), f"{family} {name}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
        wrong = [k for k in want if not torch.equal(got[k], want[k])]
        assert not wrong, f"{family} {name}: {len(wrong)} weights differ after the round trip, e.g. {wrong[0]}"


# Keys of the released SD 1.5 / SD 2.1 checkpoints that the tiny config (2 UNet levels, attention at level 0,
# 1 res block, 4 VAE levels) must also have, with the rank the real tensor has.
REAL_COMMON_KEYS = {
    "model.diffusion_model.time_embed.0.weight": 2,
    "model.diffusion_model.time_embed.2.weight": 2,
    "model.diffusion_model.input_blocks.0.0.weight": 4,
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": 1,
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": 4,
    "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": 2,
    "model.diffusion_model.input_blocks.1.0.out_layers.3.weight": 4,
    "model.diffusion_model.input_blocks.1.1.norm.weight": 1,
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": 2,
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": 1,
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": 2,
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": 2,
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm3.bias": 1,
    "model.diffusion_model.middle_block.0.in_layers.2.weight": 4,
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight": 2,
    "model.diffusion_model.middle_block.2.out_layers.3.bias": 1,
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": 4,
    "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_k.weight": 2,
    "model.diffusion_model.out.0.weight": 1,
    "model.diffusion_model.out.2.weight": 4,
    "first_stage_model.encoder.conv_in.weight": 4,
    "first_stage_model.encoder.down.0.block.0.conv1.weight": 4,
    "first_stage_model.encoder.down.0.downsample.conv.weight": 4,
    "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight": 4,
    "first_stage_model.encoder.mid.attn_1.q.weight": 4,
    "first_stage_model.encoder.mid.block_1.norm1.weight": 1,
    "first_stage_model.encoder.norm_out.weight": 1,
    "first_stage_model.quant_conv.weight": 4,
    "first_stage_model.post_quant_conv.weight": 4,
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": 4,
    "first_stage_model.decoder.up.3.upsample.conv.weight": 4,
    "first_stage_model.decoder.mid.attn_1.proj_out.weight": 4,
    "first_stage_model.decoder.conv_out.weight": 4,
}
REAL_SD1_KEYS = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": 4,  # SD 1.x: 1x1 conv projections
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": 2,
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": 2,
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": 2,
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": 2,
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": 1,
}
REAL_SD2_KEYS = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": 2,  # SD 2.x: use_linear_in_transformer
    "cond_stage_model.model.token_embedding.weight": 2,
    "cond_stage_model.model.positional_embedding": 2,
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": 2,
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias": 1,
    "cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight": 2,
    "cond_stage_model.model.transformer.resblocks.0.ln_1.weight": 1,
    "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight": 2,
    "cond_stage_model.model.ln_final.weight": 1,
    "cond_stage_model.model.text_projection": 2,
}
# Keys the LDM layout never has: attention q/k/v without bias, diffusers names.
NEVER = ("attn1.to_q.bias", "down_blocks.", "up_blocks.", "mid_block.", "conv_shortcut", ".resnets.")


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_has_real_ldm_key_names(family, tiny_checkpoint):
    sd = load_checkpoint(tiny_checkpoint(family)).state_dict
    expected = {**REAL_COMMON_KEYS, **(REAL_SD1_KEYS if family == "sd1" else REAL_SD2_KEYS)}
    missing = [k for k in expected if k not in sd]
    assert not missing, f"{family}: real LDM keys missing from the fixture: {missing}"
    wrong_rank = {k: tuple(sd[k].shape) for k, rank in expected.items() if sd[k].ndim != rank}
    assert not wrong_rank, wrong_rank
    assert not [k for k in sd if any(s in k for s in NEVER)]
    other = "cond_stage_model.model." if family == "sd1" else "cond_stage_model.transformer."
    assert not [k for k in sd if k.startswith(other)]
    if family != "sd1":  # OpenCLIP fuses q, k, v: [3 * width, width]
        width = sd["cond_stage_model.model.token_embedding.weight"].shape[1]
        assert tuple(sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape) == (3 * width, width)
        assert tuple(sd["cond_stage_model.model.positional_embedding"].shape) == (77, width)


# ----------------------------------------------------------------------------------------------------------
# folder layout


EXPECTED_AXES = {
    "text_encoder": {"input_ids": ["batch", 77], "last_hidden_state": ["batch", None, 64],
                     "pooler_output": ["batch", 64]},
    "unet": {"sample": ["batch", 4, "height", "width"], "timestep": ["timestep_batch"],
             "encoder_hidden_states": ["batch", "sequence", 64], "out_sample": ["batch", 4, "height", "width"]},
    "vae_encoder": {"sample": ["batch", 3, "height", "width"],
                    "latent_sample": ["batch", None, "latent_height", "latent_width"]},
    "vae_decoder": {"latent_sample": ["batch", 4, "latent_height", "latent_width"],
                    "sample": ["batch", 3, "height", "width"]},
}


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_layout(family, tiny_model, tiny_checkpoint, tmp_path):
    folder, ckpt = tiny_model(family), tiny_checkpoint(family)
    ldm = yaml.safe_load(ckpt.with_suffix(".yaml").read_text())["model"]["params"]

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "OnnxStableDiffusionPipeline"
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"][0] == "diffusers"
    for component in COMPONENTS:
        assert index[component] == ["diffusers", "OnnxRuntimeModel"]
        assert isinstance(json.loads((folder / component / "config.json").read_text()), dict)

    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == PREDICTION[family]
    assert sched["num_train_timesteps"] == ldm["timesteps"] == 1000
    assert math.isclose(sched["beta_start"], ldm["linear_start"]) and math.isclose(sched["beta_end"], ldm["linear_end"])
    assert sched["beta_schedule"] == "scaled_linear"

    tok = folder / "tokenizer"
    assert {"vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"} <= {p.name for p in tok.iterdir()}
    assert json.loads((tok / "special_tokens_map.json").read_text())["pad_token"] == PAD_TOKEN[family]
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(tok).pad_token_id == PAD_ID[family]

    te_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert te_config["hidden_act"] == ("quick_gelu" if family == "sd1" else "gelu")
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    assert unet_config["cross_attention_dim"] == te_config["hidden_size"] == 64
    assert unet_config["in_channels"] == unet_config["out_channels"] == 4
    for name in ("vae_encoder", "vae_decoder"):
        vae_config = json.loads((folder / name / "config.json").read_text())
        assert vae_config["latent_channels"] == 4 and vae_config["scaling_factor"] == ldm["scale_factor"]

    meta = json.loads((folder / "sd_onnx.json").read_text())
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta["family"] == family and meta["prediction_type"] == PREDICTION[family]
    assert meta["scaling_factor"] == ldm["scale_factor"] == 0.18215
    assert meta["source"]["name"] == ckpt.name
    assert meta["source"]["sha256"] == sha and meta["source"]["short_hash"] == sha[:10]
    assert set(meta["components"]) == set(COMPONENTS)
    for name, entry in meta["components"].items():
        assert entry["precision"] == "fp32" and (folder / entry["file"]).is_file()

    # UNet weights in one external file; the other components are self-contained.
    unet_proto = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False)
    external = [t for t in unet_proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.onnx_data"}
    assert (folder / "unet" / "model.onnx_data").stat().st_size > (folder / "unet" / "model.onnx").stat().st_size
    # weights.json beside the graphs LoRA and textual inversion patch (runtime/networks.py)
    for name in ("vae_encoder", "vae_decoder"):
        assert {p.name for p in (folder / name).iterdir()} == {"model.onnx", "config.json"}
    assert {p.name for p in (folder / "text_encoder").iterdir()} == {"model.onnx", "config.json", "weights.json"}
    assert {p.name for p in (folder / "unet").iterdir()} == {"model.onnx", "model.onnx_data", "config.json",
                                                             "weights.json"}

    for name, axes in EXPECTED_AXES.items():
        graph = onnx.load(str(folder / name / "model.onnx"), load_external_data=False).graph
        values = {v.name: v for v in [*graph.input, *graph.output]}
        assert set(values) == set(axes), f"{name}: inputs/outputs {sorted(values)}"
        for value_name, want in axes.items():
            got = _dims(values[value_name])
            assert len(got) == len(want) and all(w is None or g == w for g, w in zip(got, want)), f"{name}.{value_name}: {got}"

    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    # The finished folder has the mode of any folder the user creates (mkdtemp's 0700 must not leak through).
    probe = tmp_path / "probe"
    probe.mkdir()
    assert folder.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777


# ----------------------------------------------------------------------------------------------------------
# the ecosystem reads our folders


def test_diffusers_onnx_pipeline_runs_our_folder(tiny_model, reference):
    """diffusers' OnnxStableDiffusionPipeline (deprecated, still in 0.42) on our sd1 folder equals its PyTorch twin."""
    OnnxPipeline = getattr(diffusers, "OnnxStableDiffusionPipeline", None)
    if OnnxPipeline is None:
        pytest.skip(f"diffusers {diffusers.__version__} no longer has OnnxStableDiffusionPipeline")
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder, ref = tiny_model("sd1"), reference("sd1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = OnnxPipeline.from_pretrained(folder, provider="CPUExecutionProvider")
        twin = StableDiffusionPipeline(
            vae=ref["vae"], text_encoder=ref["text_encoder"], unet=ref["unet"],
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            scheduler=PNDMScheduler.from_pretrained(folder / "scheduler"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    twin.set_progress_bar_config(disable=True)
    latents = randn(1, 4, 8, 8, seed=11)
    kwargs = dict(prompt="a cat", num_inference_steps=2, height=64, width=64, output_type="np")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = pipe(latents=latents, **kwargs).images
        with torch.no_grad():
            want = twin(latents=torch.from_numpy(latents), **kwargs).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert image.std() > 0.01  # not a blank image
    # Images in [0, 1] after 2 PNDM steps with CFG; measured difference ~5e-6.
    assert_close(image, want, "OnnxStableDiffusionPipeline image")


# ----------------------------------------------------------------------------------------------------------
# other inputs: .safetensors, diffusers folder


def _initializers(path: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_safetensors_exports_like_ckpt(tiny_checkpoint, tiny_model, reference, tmp_path):
    from safetensors.torch import save_file

    ckpt = tiny_checkpoint("sd1")
    source = tmp_path / "tiny-sd1.safetensors"
    save_file({k: v.contiguous() for k, v in load_checkpoint(ckpt).state_dict.items()}, str(source))
    shutil.copy(ckpt.with_suffix(".yaml"), source.with_suffix(".yaml"))
    result = export_model(source, tmp_path / "out")
    assert (result.family, result.prediction_type) == ("sd1", "epsilon")
    for component in COMPONENTS:  # same weights in, same graphs out
        got = _initializers(result.folder / component / "model.onnx")
        want = _initializers(tiny_model("sd1") / component / "model.onnx")
        assert set(got) == set(want), component
        assert all(np.array_equal(got[k], want[k]) for k in want), component
    assert_folder_matches_reference(result.folder, reference("sd1"), "sd1")
    meta = json.loads((result.folder / "sd_onnx.json").read_text())
    assert meta["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_diffusers_folder_exports(family, tiny_model, reference, tmp_path):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    ref = reference(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline(
            vae=ref["vae"], text_encoder=ref["text_encoder"], unet=ref["unet"],
            tokenizer=CLIPTokenizer.from_pretrained(tiny_model(family) / "tokenizer"),
            scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    prediction_type=PREDICTION[family], skip_prk_steps=True),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp_path / "diffusers")
    result = export_model(tmp_path / "diffusers", tmp_path / "out")
    assert (result.family, result.prediction_type) == (family, PREDICTION[family])
    sched = json.loads((result.folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == PREDICTION[family]
    assert_folder_matches_reference(result.folder, ref, family)


# ----------------------------------------------------------------------------------------------------------
# family and config resolution


def _tiny_yaml(path: Path, family: str) -> Path:
    path.write_text(yaml.safe_dump(synthetic.ldm_config(family), sort_keys=False))
    return path


def test_family_flag_overrides_v_prediction(tiny_checkpoint, tmp_path, capsys):
    """`--family sd2` on the sd2-v checkpoint (no yaml beside it) exports an eps model.

    A tiny checkpoint cannot use the full-size bundled config, so the tiny v-prediction YAML comes in by --config:
    the flag must win over that config's `parameterization: v` as well."""
    original = tiny_checkpoint("sd2-v")
    link = tmp_path / "no-yaml.ckpt"
    link.symlink_to(original)
    config = original.with_suffix(".yaml")
    assert yaml.safe_load(config.read_text())["model"]["params"]["parameterization"] == "v"
    # Control: without the flag the same inputs give v-prediction.
    assert build_reference_model(load_checkpoint(link), "auto", config).prediction_type == "v_prediction"

    out = tmp_path / "out"
    assert main(["export", str(link), "-o", str(out), "--family", "sd2", "--config", str(config), "-q"]) == 0
    meta = json.loads((out / "sd_onnx.json").read_text())
    assert (meta["family"], meta["prediction_type"]) == ("sd2", "epsilon")
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"


def test_family_flag_that_does_not_fit_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"--family sd1 does not fit") as info:
        export_model(tiny_checkpoint("sd2"), out, family="sd1")
    assert "\n" not in str(info.value) and "sd2" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_config_resolution_order(tiny_checkpoint, tmp_path, capsys):
    """--config beats <stem>.yaml beats the bundled default of the detected family."""
    link = tmp_path / "model.ckpt"
    link.symlink_to(tiny_checkpoint("sd2"))  # OpenCLIP keys, global_step 0: detected as sd2-v
    beside = _tiny_yaml(tmp_path / "model.yaml", "sd2-v")  # parameterization: v
    explicit = _tiny_yaml(tmp_path / "elsewhere.yaml", "sd2")  # eps
    ckpt = load_checkpoint(link)

    model = build_reference_model(ckpt, "auto", explicit)
    assert (model.config_source, model.prediction_type, model.family.name) == (str(explicit), "epsilon", "sd2")
    model = build_reference_model(ckpt, "auto", None)
    assert (model.config_source, model.prediction_type, model.family.name) == (str(beside), "v_prediction", "sd2-v")

    beside.unlink()  # now only the bundled full-size v2-inference-v.yaml is left, which tiny weights do not fit
    out = tmp_path / "out"
    assert main(["export", str(link), "-o", str(out), "-q"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("sd-onnx: error: ") and "\n" not in err and "Traceback" not in err
    assert re.search(r"bundled v2-inference-v\.yaml.*(missing|shape)", err), err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    with pytest.raises(CheckpointError, match="config not found"):
        build_reference_model(ckpt, "auto", tmp_path / "absent.yaml")
