"""LoRA and textual inversion at generate time: the image of diffusers' load_lora_weights / load_textual_inversion,
A1111's `<lora:...>` syntax and infotext fields, and one clear line for each bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from sd_onnx.errors import SdOnnxError
from sd_onnx.runtime.networks import LoraTag, NetworkError, extract_lora_tags
from sd_onnx.runtime.pipeline import GenerateRequest, generate
from sd_onnx.runtime.model import LoadedModel
from sd_onnx.runtime.pipeline import run

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs it

from tests.test_generate import PROMPT, SIZE, reference_image, reference_pipeline  # noqa: E402

STEPS = 10
TOLERANCE = 3  # levels of 255, as test_generate: ONNX vs torch float rounding after the VAE


def lora_layers(pipe) -> dict[str, list[tuple[str, tuple]]]:
    """Every attention and MLP layer of both networks (the layers kohya's trainer targets), with weight shapes."""
    unet = [(n, tuple(m.weight.shape)) for n, m in pipe.unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and "attentions" in n
            and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0", "proj", "2", "proj_in", "proj_out")]
    te = [(n, tuple(m.weight.shape)) for n, m in pipe.text_encoder.named_modules()
          if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj",
                                                                          "fc1", "fc2")]
    return {"unet": unet, "text_encoder": te}


def write_lora(path: Path, layers: dict, layout: str, seed: int, rank: int = 4, alpha: float = 2.0) -> Path:
    """A random LoRA over `layers`, in kohya's layout (lora_unet_*/lora_te_*, alpha) or diffusers' PEFT layout."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for component, entries in layers.items():
        for name, shape in entries:
            out_f, in_f = shape[0], shape[1]
            down = (rng.standard_normal((rank, in_f, *shape[2:])) * 0.2).astype(np.float32)
            up = (rng.standard_normal((out_f, rank, *([1] * (len(shape) - 2)))) * 0.2).astype(np.float32)
            if layout == "kohya":
                key = ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = down
                tensors[f"{key}.lora_up.weight"] = up
                tensors[f"{key}.alpha"] = np.array(alpha, dtype=np.float32)
            else:  # diffusers/PEFT: no alpha, scale 1
                tensors[f"{component}.{name}.lora_A.weight"] = down
                tensors[f"{component}.{name}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def lora_setup(tiny_model, tiny_checkpoint, tmp_path_factory):
    folder = tiny_model("sd1")
    pipe = reference_pipeline(tiny_checkpoint("sd1"), diffusers.EulerDiscreteScheduler)
    loras = tmp_path_factory.mktemp("loras")
    layers = lora_layers(pipe)
    write_lora(loras / "kohya_style.safetensors", layers, "kohya", seed=1)
    write_lora(loras / "diffusers_style.safetensors", layers, "diffusers", seed=2)
    return folder, pipe, loras


def ours(folder: Path, loras: Path, prompt: str, embeddings: Path | None = None, seed: int = 1234):
    model = LoadedModel(folder, "cpu")
    model.lora_dir, model.embeddings_dir = loras, embeddings or loras / "no-embeddings"
    request = GenerateRequest(prompt, "", steps=STEPS, sampler="Euler", seed=seed, width=SIZE[0], height=SIZE[1])
    image = next(run(model, request))
    return np.asarray(image.image), image.parameters


def reference(pipe, loras: Path, adapters: list[tuple[str, float]], seed: int = 1234) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, _ in adapters:
            pipe.load_lora_weights(str(loras / f"{name}.safetensors"), adapter_name=name)
        pipe.set_adapters([n for n, _ in adapters], adapter_weights=[w for _, w in adapters])
        try:
            return reference_image(pipe, seed, STEPS)
        finally:
            pipe.unload_lora_weights()


@pytest.mark.parametrize("adapters", [
    [("kohya_style", 1.0)],
    [("kohya_style", 0.5)],
    [("diffusers_style", 1.0)],
    [("kohya_style", 0.5), ("diffusers_style", 1.0)],
], ids=["kohya-1.0", "kohya-0.5", "diffusers-1.0", "both"])
def test_lora_matches_diffusers_load_lora_weights(lora_setup, adapters):
    """<lora:NAME:W> on the UNet and text encoder gives diffusers' image with the same adapters at the same weights,
    within 3 levels; and the LoRA visibly changes the picture (else the comparison would prove nothing)."""
    folder, pipe, loras = lora_setup
    tags = " ".join(f"<lora:{n}:{w}>" for n, w in adapters)
    image, parameters = ours(folder, loras, f"{PROMPT} {tags}")
    ref = reference(pipe, loras, adapters)
    diff = np.abs(image.astype(int) - ref.astype(int))
    assert diff.max() <= TOLERANCE, f"max diff {diff.max()} levels, mean {diff.mean():.3f}"
    plain = reference_image(pipe, 1234, STEPS)
    assert np.abs(plain.astype(int) - ref.astype(int)).mean() > 2, "the LoRA barely changes the image"
    assert "Lora hashes: " in parameters and tags in parameters.splitlines()[0]


def test_repeated_set_reuses_patched_weights_and_session(lora_setup, monkeypatch):
    """A kept-loaded model (the server) with the same LoRA set opens no new session and patches nothing again; a
    changed set re-patches without re-reading the unchanged LoRA file."""
    from sd_onnx.runtime import networks

    folder, _, loras = lora_setup
    model = LoadedModel(folder, "cpu", keep_loaded=True)
    model.lora_dir = model.embeddings_dir = loras
    calls = {"patch": 0, "read": 0}
    patch, load = networks.patched_weights, networks.load_network
    monkeypatch.setattr(networks, "patched_weights", lambda *a, **k: (calls.__setitem__("patch", calls["patch"] + 1),
                                                                      patch(*a, **k))[1])
    monkeypatch.setattr(networks, "load_network", lambda *a: (calls.__setitem__("read", calls["read"] + 1),
                                                              load(*a))[1])
    networks._FILE_CACHE.clear()
    request = dict(steps=2, sampler="Euler", seed=1, width=64, height=64)
    list(run(model, GenerateRequest("a cat <lora:kohya_style:0.7>", **request)))
    first = (calls["patch"], calls["read"], model._sessions["unet"])
    list(run(model, GenerateRequest("a dog <lora:kohya_style:0.7>", **request)))
    assert (calls["patch"], calls["read"], model._sessions["unet"]) == first
    list(run(model, GenerateRequest("a dog <lora:kohya_style:0.7> <lora:diffusers_style:1>", **request)))
    assert calls["read"] == first[1] + 1  # only the new file
    assert model._sessions["unet"] is not first[2]


# ---------------------------------------------------------------------------------------------------------------
# A1111's syntax and infotext


@pytest.mark.parametrize("prompt,clean,tags", [
    ("a cat <lora:foo:0.8>", "a cat ", [LoraTag("foo", 0.8, 0.8)]),
    ("<lora:foo>a cat", "a cat", [LoraTag("foo", 1.0, 1.0)]),
    ("a <lora:foo:0.5:1.2>, <lyco:bar:-1> cat", "a ,  cat", [LoraTag("foo", 0.5, 1.2), LoraTag("bar", -1, -1)]),
    ("a <lora:foo:te=0.3:unet=0.9> cat", "a  cat", [LoraTag("foo", 0.3, 0.9)]),
    ("a <hypernet:foo:1> cat", "a <hypernet:foo:1> cat", []),
    ("(a cat:1.2) <lora:sub/dir name:1>", "(a cat:1.2) ", [LoraTag("sub/dir name", 1.0, 1.0)]),
])
def test_lora_tags_parse_as_a1111(prompt, clean, tags):
    assert extract_lora_tags(prompt) == (clean, tags)


def test_lora_tag_with_bad_weight_is_one_line():
    with pytest.raises(NetworkError, match="not a number"):
        extract_lora_tags("a <lora:foo:heavy> cat")


def test_infotext_records_lora_hash_and_keeps_the_tag(lora_setup):
    """`Lora hashes: "name: <12 hex of the addnet hash>"`, and the prompt line keeps the tag (re-pasting works)."""
    from sd_onnx.runtime.infotext import parse_infotext
    from sd_onnx.runtime.networks import addnet_hash

    folder, _, loras = lora_setup
    _, text = ours(folder, loras, "a cat <lora:kohya_style:0.5>")
    prompt, _, fields = parse_infotext(text)
    assert prompt == "a cat <lora:kohya_style:0.5>"
    assert fields["Lora hashes"] == f"kohya_style: {addnet_hash(loras / 'kohya_style.safetensors')[:12]}"
    assert 'Lora hashes: "kohya_style: ' in text


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line each, and no image made without the LoRA


def _fails(folder, loras, prompt) -> str:
    with pytest.raises(SdOnnxError) as info:
        ours(folder, loras, prompt)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_lora_lists_close_matches(lora_setup):
    folder, _, loras = lora_setup
    message = _fails(folder, loras, "a cat <lora:kohya_styel:1>")
    assert "'kohya_styel' not found" in message and "close matches: kohya_style" in message


def test_sdxl_lora_on_sd1_is_refused(lora_setup, tmp_path):
    from safetensors.numpy import save_file

    folder, _, _ = lora_setup
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 768), np.float32),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": np.zeros((3072, 4), np.float32)},
              str(tmp_path / "xl.safetensors"))
    assert "for SDXL models" in _fails(folder, tmp_path, "a cat <lora:xl:1>")


def test_lora_of_other_shapes_is_refused(lora_setup, tmp_path):
    """An SD2-sized LoRA (1024-wide text encoder) on this model: a shape that does not fit, named."""
    folder, _, _ = lora_setup
    write_lora(tmp_path / "wide.safetensors", {"text_encoder": [("text_model.encoder.layers.0.mlp.fc1", (128, 1024))]},
               "kohya", seed=3)
    assert "another model family" in _fails(folder, tmp_path, "a cat <lora:wide:1>")


def test_corrupt_lora_is_refused(lora_setup, tmp_path):
    folder, _, loras = lora_setup
    data = (loras / "kohya_style.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert "cut.safetensors" in _fails(folder, tmp_path, "a cat <lora:cut:1>")
    (tmp_path / "junk.safetensors").write_bytes(b"not a lora at all")
    assert "junk.safetensors" in _fails(folder, tmp_path, "a cat <lora:junk:1>")


@pytest.mark.parametrize("key,kind", [("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr")])
def test_unsupported_lycoris_kind_is_refused_by_name(lora_setup, tmp_path, key, kind):
    from safetensors.numpy import save_file

    folder, _, _ = lora_setup
    save_file({f"lora_unet_down_blocks_0_attentions_0_proj_in.{key}": np.zeros((4, 4), np.float32)},
              str(tmp_path / "lyco.safetensors"))
    assert kind in _fails(folder, tmp_path, "a cat <lora:lyco:1>")


def test_folder_exported_before_the_map_says_reexport(lora_setup, tmp_path):
    import shutil

    folder, _, loras = lora_setup
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    (old / "unet" / "weights.json").unlink()
    (old / "text_encoder" / "weights.json").unlink()
    assert "export it again" in _fails(old, loras, "a cat <lora:kohya_style:1>")
    # without a LoRA the old folder still generates
    ours(old, loras, "a cat")


def test_weight_map_covers_every_attention_and_mlp_layer(lora_setup):
    folder, pipe, _ = lora_setup
    for component, entries in lora_layers(pipe).items():
        layers = json.loads((folder / component / "weights.json").read_text())["layers"]
        assert {n for n, _ in entries} <= set(layers), component
    unet = json.loads((folder / "unet" / "weights.json").read_text())["layers"]
    assert any(e["initializer"].startswith("onnx::MatMul") and e["transposed"] for e in unet.values())
    assert unet["down_blocks.0.attentions.0.proj_in"]["ldm"] == "model.diffusion_model.input_blocks.1.1.proj_in"


def test_locon_on_convolutions_matches_a_checkpoint_merged_in_torch(lora_setup, tmp_path):
    """LyCORIS LoCon (3x3 down, 1x1 up) on the UNet's resnet convolutions equals the reference UNet with the delta
    merged in torch as LyCORIS defines it (a conv by `down` then a 1x1 conv by `up`), within 3 levels."""
    from safetensors.numpy import save_file

    folder, pipe, _ = lora_setup
    rng = np.random.default_rng(9)
    convs = [(n, m) for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Conv2d) and "resnets" in n
             and m.kernel_size == (3, 3)]
    tensors, merged = {}, {}
    rank, alpha, weight = 4, 2.0, 0.8
    for name, module in convs:
        out_c, in_c = module.weight.shape[:2]
        down = (rng.standard_normal((rank, in_c, 3, 3)) * 0.1).astype(np.float32)
        up = (rng.standard_normal((out_c, rank, 1, 1)) * 0.1).astype(np.float32)
        key = "lora_unet_" + name.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": np.array(alpha, np.float32)})
        # conv(conv(x, down), up) == conv(x, einsum(up, down)): the composed kernel, scaled
        delta = torch.einsum("or,rikl->oikl", torch.from_numpy(up[:, :, 0, 0]), torch.from_numpy(down))
        merged[name] = module.weight.detach().clone() + weight * alpha / rank * delta
    save_file(tensors, str(tmp_path / "locon.safetensors"))
    image, _ = ours(folder, tmp_path, f"{PROMPT} <lora:locon:{weight}>")
    originals = {name: module.weight.detach().clone() for name, module in convs}
    try:
        with torch.no_grad():
            for name, module in convs:
                module.weight.copy_(merged[name])
        ref = reference_image(pipe, 1234, STEPS)
    finally:
        with torch.no_grad():
            for name, module in convs:
                module.weight.copy_(originals[name])
    diff = np.abs(image.astype(int) - ref.astype(int))
    assert diff.max() <= TOLERANCE, f"max diff {diff.max()} levels"
    assert np.abs(reference_image(pipe, 1234, STEPS).astype(int) - ref.astype(int)).mean() > 2
