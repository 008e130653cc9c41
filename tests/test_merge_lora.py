"""`sd-onnx export --merge-lora FILE:WEIGHT`: a LoRA folded into the weights before export gives diffusers'
load_lora_weights + fuse_lora image and the same image as the runtime's `<lora:NAME:WEIGHT>` on the plain export;
sd_onnx.json records it; bad input is one line and leaves no folder."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs it
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from sd_onnx.cli import main  # noqa: E402
from tests.test_generate import reference_image  # noqa: E402
from tests.test_lora import STEPS, TOLERANCE, lora_layers, lora_setup, ours, write_lora  # noqa: E402,F401

# Merged in torch vs patched in NumPy: both add the same float32 delta to the same float32 weight, so the graphs
# differ by rounding only (measured: identical images, 0 levels); 1 level leaves room for a last-bit difference.
SAME_WEIGHTS = 1


def _export(checkpoint: Path, output: Path, *merges: str) -> Path:
    argv = ["export", str(checkpoint), "-o", str(output), "-q"]
    for merge in merges:
        argv += ["--merge-lora", merge]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    return output


@pytest.fixture(scope="module")
def ldm_lora(lora_setup) -> Path:
    """A kohya LoRA that names the UNet's attention projections by their LDM keys (lora_unet_input_blocks_1_1_...),
    as LDM-era trainers write them; the keys come from the plain export's weights.json."""
    folder, _, loras = lora_setup
    layers = json.loads((folder / "unet" / "weights.json").read_text())["layers"]
    picked = [(entry["ldm"].removeprefix("model.diffusion_model."), tuple(entry["shape"][::-1] if entry["transposed"]
               else entry["shape"])) for name, entry in layers.items()
              if entry.get("ldm") and name.endswith(("proj_in", "proj_out"))]
    assert picked
    return write_lora(loras / "ldm_style.safetensors", {"unet": picked}, "kohya", seed=4)


@pytest.fixture(scope="module")
def merged(lora_setup, tiny_checkpoint, tmp_path_factory) -> Path:
    _, _, loras = lora_setup
    return _export(tiny_checkpoint("sd1"), tmp_path_factory.mktemp("merged") / "kohya07",
                   f"{loras / 'kohya_style.safetensors'}:0.7")


def test_merged_export_matches_diffusers_fuse_lora(lora_setup, merged):
    """The merged export's plain-prompt image against diffusers' pipeline after load_lora_weights +
    fuse_lora(lora_scale=0.7) (UNet and text encoder): within 3 levels (ONNX vs torch rounding after the VAE, as
    test_lora; measured 0 on this fixture); and the LoRA visibly changes the picture, else the comparison proves
    nothing."""
    _, pipe, loras = lora_setup
    image, _ = ours(merged, loras, "a photo of a cat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(loras / "kohya_style.safetensors"), adapter_name="kohya_style")
        pipe.fuse_lora(lora_scale=0.7)
        try:
            ref = reference_image(pipe, 1234, STEPS, prompt="a photo of a cat")
        finally:
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
    diff = np.abs(image.astype(int) - ref.astype(int))
    assert diff.max() <= TOLERANCE, f"max diff {diff.max()} levels, mean {diff.mean():.3f}"
    plain = reference_image(pipe, 1234, STEPS, prompt="a photo of a cat")
    assert np.abs(plain.astype(int) - ref.astype(int)).mean() > 2, "the LoRA barely changes the image"


def test_merged_export_matches_runtime_lora(lora_setup, merged):
    """Merged at export == `<lora:kohya_style:0.7>` at generate time on the plain export, within 1 level."""
    folder, _, loras = lora_setup
    image, _ = ours(merged, loras, "a photo of a cat")
    runtime, _ = ours(folder, loras, "a photo of a cat <lora:kohya_style:0.7>")
    assert np.abs(image.astype(int) - runtime.astype(int)).max() <= SAME_WEIGHTS


def test_merged_loras_are_recorded(lora_setup, merged):
    from sd_onnx.runtime.networks import addnet_hash
    from sd_onnx.runtime.variants import base_identity

    folder, pipe, loras = lora_setup
    path = loras / "kohya_style.safetensors"
    meta = json.loads((merged / "sd_onnx.json").read_text())
    layers = lora_layers(pipe)
    assert meta["merged_loras"] == [{
        "name": "kohya_style", "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "lora_hash": addnet_hash(path)[:12], "weight": 0.7,
        "layers": {"unet": len(layers["unet"]), "text_encoder": len(layers["text_encoder"])}}]
    # same checkpoint, another model: a variant of the plain export must not pass for one of the merged export
    plain = json.loads((folder / "sd_onnx.json").read_text())
    assert meta["source"]["sha256"] == plain["source"]["sha256"]
    assert base_identity(merged, meta) != base_identity(folder, plain)


def test_repeated_merges_with_ldm_keys_and_runtime_lora_on_top(lora_setup, ldm_lora, tiny_checkpoint, tmp_path):
    """Two --merge-lora (one naming layers by LDM key, one in diffusers' PEFT layout) == both tags at run time;
    weights.json of the merged export still records each merged layer's LDM key, so the LDM-keyed LoRA applied on
    top at 0.4 adds up with the 0.6 merged to the same image as 1.0 at run time."""
    folder, _, loras = lora_setup
    both = _export(tiny_checkpoint("sd1"), tmp_path / "both", f"{ldm_lora}:0.6",
                   str(loras / "diffusers_style.safetensors"))
    unet = json.loads((both / "unet" / "weights.json").read_text())["layers"]
    assert unet["down_blocks.0.attentions.0.proj_in"]["ldm"] == "model.diffusion_model.input_blocks.1.1.proj_in"
    meta = json.loads((both / "sd_onnx.json").read_text())
    assert [(m["name"], m["weight"]) for m in meta["merged_loras"]] == [("ldm_style", 0.6), ("diffusers_style", 1.0)]
    image, _ = ours(both, loras, "a photo of a dog")
    runtime, _ = ours(folder, loras, "a photo of a dog <lora:ldm_style:0.6> <lora:diffusers_style:1>")
    assert np.abs(image.astype(int) - runtime.astype(int)).max() <= SAME_WEIGHTS
    plain, _ = ours(folder, loras, "a photo of a dog")
    assert np.abs(plain.astype(int) - image.astype(int)).mean() > 2
    on_top, _ = ours(both, loras, "a photo of a dog <lora:ldm_style:0.4>")
    runtime, _ = ours(folder, loras, "a photo of a dog <lora:ldm_style:1> <lora:diffusers_style:1>")
    assert np.abs(on_top.astype(int) - runtime.astype(int)).max() <= SAME_WEIGHTS


def _bad_files(folder: Path) -> dict[str, str]:
    from safetensors.numpy import save_file

    (folder / "junk.safetensors").write_bytes(b"not a lora at all")
    (folder / "old.ckpt").write_bytes(b"PK\x03\x04 a pickle")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4), np.float32)},
              str(folder / "checkpoint_like.safetensors"))
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 768), np.float32),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": np.zeros((3072, 4), np.float32)},
              str(folder / "xl.safetensors"))
    write_lora(folder / "wide.safetensors", {"text_encoder": [("text_model.encoder.layers.0.mlp.fc1", (128, 1024))]},
               "kohya", seed=3)
    save_file({"lora_unet_mid_block_attentions_0_proj_in.weight": np.zeros((4, 4), np.float32)},
              str(folder / "odd_keys.safetensors"))
    write_lora(folder / "elsewhere.safetensors", {"unet": [("no_such_block.attn.to_q", (64, 64))]}, "kohya", seed=3)
    return {
        f"{folder / 'missing.safetensors'}:1": "LoRA file not found",
        f"{folder / 'xl.safetensors'}:heavy": "weight 'heavy' is not a number",
        f"{folder / 'xl.safetensors'}:inf": "weight must be finite",
        f"{folder / 'junk.safetensors'}:1": "not a .safetensors file",
        f"{folder / 'old.ckpt'}:1": "old.ckpt is not a .safetensors file",
        f"{folder / 'checkpoint_like.safetensors'}:1": "a checkpoint, not a LoRA",
        f"{folder / 'odd_keys.safetensors'}:1": "not of a LoRA layout",
        f"{folder / 'xl.safetensors'}:1": "is for SDXL models",
        f"{folder / 'wide.safetensors'}:1": "does not fit",
        f"{folder / 'elsewhere.safetensors'}:1": "does not have",
    }


def test_bad_merge_lora_is_one_line_and_leaves_no_folder(tiny_checkpoint, tmp_path, capsys):
    """Missing file, bad weight, not a LoRA, a LoRA of another family or shape: exit 2, one line naming the problem,
    and neither the output folder nor a staging folder left behind."""
    checkpoint = tiny_checkpoint("sd1")
    out = tmp_path / "out"
    for spec, expected in _bad_files(tmp_path).items():
        capsys.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = main(["export", str(checkpoint), "-o", str(out), "-q", "--merge-lora", spec])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, spec
        assert len(err) == 1 and err[0].startswith("sd-onnx: error:") and expected in err[0], (spec, err)
        assert not out.exists() and not list(tmp_path.glob(".*partial*")), spec
