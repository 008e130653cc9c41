"""Inpainting checkpoints (a UNet of 9 input channels: noisy latent, mask, latent of the masked picture), SD 1.x and
SD 2.x: detection and bundled configs, each exported component against diffusers' single-file loader, the whole image
against diffusers' StableDiffusionInpaintPipeline, A1111's conditional mask weight, txt2img and int8 on such a model.

The tiny fixtures are written by sd_onnx.export.synthetic in the layout of sd-v1-5-inpainting.ckpt and
512-inpainting-ema.ckpt (tiny_checkpoint("sd1-inpaint"), tiny_checkpoint("sd2-inpaint")), with their <stem>.yaml."""

from __future__ import annotations

import contextlib
import json
import warnings

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from sd_onnx.cli import main
from sd_onnx.errors import CheckpointError
from sd_onnx.runtime import decode, masks
from sd_onnx.runtime.denoiser import GuidedUNet
from sd_onnx.runtime.encode import encode_prompts
from sd_onnx.runtime.model import LoadedModel
from sd_onnx.runtime.noise import ImageRng, TorchCpuRandn
from sd_onnx.runtime.pipeline import GenerateRequest, _img2img_init, generate, run
from sd_onnx.runtime.requests import Img2ImgRequest
from sd_onnx.runtime.samplers import img2img_start, sample
from tests.test_img2img import init_picture

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from sd_onnx.export.checkpoint import load_checkpoint  # noqa: E402
from sd_onnx.export.convert import CONFIG_DIR, build_reference_model  # noqa: E402
from sd_onnx.families import FAMILIES, detect_family  # noqa: E402
from tests.test_export import (TOL, assert_close, load_reference, one_torch_thread, randn, run_text_encoder,  # noqa: E402,F401
                               run_unet, run_vae_decoder, run_vae_encoder, session, token_ids)

INPAINT = ("sd1-inpaint", "sd2-inpaint")
BASE = {"sd1-inpaint": "sd1", "sd2-inpaint": "sd2"}  # the text-encoder rules of test_export's reference loader
W, H = 64, 96
PROMPT = "a red brick wall with ivy"
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def inpaint_mask(size=(W, H), box=(21, 10, 50, 43)) -> Image.Image:
    """Edges off the 8 px latent grid, so the mask's reduction to latent size matters."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference-inpaint")
    made: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in made:
            made[family] = load_reference(tiny_checkpoint(family), BASE[family], workdir)
        return made[family]

    return get


def _no_clock(name):
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# detection and configs


@pytest.mark.parametrize("family", INPAINT)
def test_inpainting_checkpoints_are_detected_by_their_unet_input(family, tiny_checkpoint):
    """Detection reads input_blocks.0.0's 9 input channels, as A1111 and diffusers do (diffusers'
    infer_diffusers_model_type agrees that the fixture is an inpainting checkpoint)."""
    from diffusers.loaders import single_file_utils as sfu

    ckpt = load_checkpoint(tiny_checkpoint(family))
    assert tuple(ckpt.state_dict[UNET_KEY].shape)[1] == 9
    assert detect_family(ckpt.state_dict, ckpt.global_step)[0].name == family
    # SD 2.x: the 512-base global step does not matter; Stability's only 2.x inpainting model is eps
    assert detect_family(ckpt.state_dict, 875000)[0].name == family
    # (diffusers tells 2.x from 1.x by a cross-attention width of 1024, which the tiny fixture does not have)
    assert sfu.infer_diffusers_model_type(ckpt.state_dict) == "inpainting"
    model = build_reference_model(ckpt)
    assert (model.family.name, model.prediction_type) == (family, "epsilon")
    # our convert.py mapping covers the 9-channel conv_in: every input channel comes from the checkpoint
    assert torch.equal(model.unet.conv_in.weight, ckpt.state_dict[UNET_KEY].float())
    assert torch.equal(model.unet.conv_in.bias, ckpt.state_dict[UNET_KEY.replace("weight", "bias")].float())


@pytest.mark.parametrize("name", ["v1-inpainting-inference.yaml", "v2-inpainting-inference.yaml"])
def test_bundled_inpainting_configs(name):
    """The bundled original-LDM configs are the released ones (9 channels, hybrid conditioning, eps) and diffusers
    reads a 9-channel UNet from them."""
    from diffusers.loaders import single_file_utils as sfu

    config = yaml.safe_load((CONFIG_DIR / name).read_text())
    params = config["model"]["params"]
    assert config["model"]["target"] == "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    assert params["conditioning_key"] == "hybrid" and "parameterization" not in params
    assert params["unet_config"]["params"]["in_channels"] == 9
    assert params["unet_config"]["params"]["out_channels"] == 4
    if name.startswith("v1"):
        assert "finetune_keys" in params and params["finetune_keys"] is None
        assert params["unet_config"]["params"]["context_dim"] == 768
    else:
        assert params["unet_config"]["params"]["context_dim"] == 1024
        assert params["unet_config"]["params"]["use_linear_in_transformer"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = sfu.create_unet_diffusers_config_from_ldm(config, {}, image_size=512)
    assert unet["in_channels"] == 9 and unet["out_channels"] == 4
    assert [f.name for f in FAMILIES.values() if f.default_config == name]


def test_unsupported_channel_counts_and_wrong_family_flag_are_one_line(tiny_checkpoint, tmp_path):
    from sd_onnx.export.exporter import export_model

    ckpt = load_checkpoint(tiny_checkpoint("sd1-inpaint"))
    eight = dict(ckpt.state_dict, **{UNET_KEY: torch.zeros(32, 8, 3, 3)})  # instruct-pix2pix's layout
    with pytest.raises(CheckpointError, match="8 input channels") as info:
        detect_family(eight)
    assert "\n" not in str(info.value)
    for family, ckpt_family in (("sd1", "sd1-inpaint"), ("sd1-inpaint", "sd1"), ("sd2", "sd2-inpaint")):
        with pytest.raises(CheckpointError, match=rf"--family {family} does not fit") as info:
            export_model(tiny_checkpoint(ckpt_family), tmp_path / "out", family=family)
        assert "\n" not in str(info.value) and "input channels" in str(info.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# each exported component against diffusers' single-file loader


@pytest.mark.parametrize("family", INPAINT)
def test_folder_describes_a_9_channel_unet(family, tiny_model):
    import onnx

    folder = tiny_model(family)
    assert json.loads((folder / "unet" / "config.json").read_text())["in_channels"] == 9
    meta = json.loads((folder / "sd_onnx.json").read_text())
    assert (meta["family"], meta["prediction_type"], meta["unet_in_channels"]) == (family, "epsilon", 9)
    graph = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in
            [*graph.input, *graph.output]}
    assert dims["sample"] == ["batch", 9, "height", "width"]
    assert dims["out_sample"] == ["batch", 4, "height", "width"]
    assert LoadedModel(folder, "cpu").unet_in_channels == 9


@pytest.mark.parametrize("family", INPAINT)
def test_components_match_diffusers_single_file(family, tiny_model, reference):
    """UNet and VAE from `UNet2DConditionModel/AutoencoderKL.from_single_file(ckpt, original_config=<stem>.yaml)`
    (its 9-channel conv_in included: test_export's loader checks every reference weight is a checkpoint tensor bit
    for bit), CLIP through diffusers' single-file CLIP loader. Tolerance as tests/test_export.py: max abs diff
    <= 1e-4 * max(1, max|reference|), fp32 on both sides (measured 1e-6..1e-5)."""
    folder, ref = tiny_model(family), reference(family)
    assert ref["unet"].config.in_channels == 9
    for batch in (1, 2):
        for got, want, what in run_text_encoder(folder, ref, token_ids(BASE[family], batch, seed=batch)):
            assert_close(got, want, f"{family} text_encoder {what} batch {batch}")
    dim = ref["unet"].config.cross_attention_dim
    for batch, hw, timestep, tokens in [(1, (8, 8), [500.0], 77), (2, (8, 12), [999.5, 10.25], 154),
                                        (1, (9, 17), [981.0], 77)]:
        sample = randn(batch, 9, *hw, seed=batch)
        sample[:, 4] = sample[:, 4] > 0  # a 0/1 mask channel, as fed
        got, want = run_unet(folder, ref, sample, np.array(timestep, np.float32), randn(batch, tokens, dim, seed=3))
        assert got.shape == (batch, 4, *hw)
        assert_close(got, want, f"{family} unet {batch}x{hw}")
        # the extra channels matter: the same call with the masked-picture latent zeroed moves far past TOL
        blank = sample.copy()
        blank[:, 5:] = 0
        _, moved = run_unet(folder, ref, blank, np.array(timestep, np.float32), randn(batch, tokens, dim, seed=3))
        assert np.abs(moved - want).max() > 100 * TOL * max(1.0, float(np.abs(want).max()))
    assert_close(*run_vae_encoder(folder, ref, np.tanh(randn(2, 3, 64, 96, seed=2))), f"{family} vae_encoder")
    assert_close(*run_vae_decoder(folder, ref, randn(2, 4, 8, 12, seed=3)), f"{family} vae_decoder")


# ----------------------------------------------------------------------------------------------------------
# the whole image against diffusers' StableDiffusionInpaintPipeline


def _diffusers_inpaint_pipeline(folder, ref):
    from transformers import CLIPTokenizer

    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionInpaintPipeline(
            vae=ref["vae"], text_encoder=ref["text_encoder"], unet=ref["unet"],
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            scheduler=diffusers.EulerDiscreteScheduler.from_config(sched, timestep_spacing="linspace"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample_by_hand(model, request, init, cond, seed, blend: bool):
    """The pipeline's stages for one image; blend=False leaves out A1111's latent blending (and the caller its
    overlay), which diffusers does not do for a 9-channel UNet."""
    denoiser = model.denoiser(GuidedUNet(model.session("unet"), cond, request.cfg_scale, concat=init.concat))
    start = img2img_start(init.latent, request.steps, request.denoising_strength)
    if blend:
        denoiser.inpaint = (start.latent, init.nmask)
    x = sample(request.sampler, denoiser, ImageRng([seed], (4, H // 8, W // 8)), request.steps, start=start)
    if blend:
        x = x * init.nmask + start.latent * (1 - init.nmask)
    (picture,) = decode.decode(model, x)
    return picture


@pytest.mark.parametrize("family", INPAINT)
def test_inpainting_image_matches_diffusers(family, tiny_model, reference, monkeypatch):
    """Same checkpoint, picture, mask (blur 0, masked content "original"), prompt, seed-derived noise and schedule
    slice as diffusers' StableDiffusionInpaintPipeline: at most 3 of 255 levels apart.

    What differs on purpose, and how the comparison handles it:
    - diffusers blends latents (init * (1 - m) + m * x) only for 4-channel UNets and never lays the init picture
      back; A1111 does both for 9-channel models too (CFGDenoiser's mask, apply_overlay). So the image compared is
      our stages composed by hand WITHOUT the blend and the overlay; a second check shows that the same composition
      with the blend and overlay put back is the pipeline's output byte for byte, so the comparison covers the
      pipeline's own stages (init, conditioning, UNet feeds, sampler, decoder). Comparing inside the mask only is
      no way out: the blended surroundings reach the masked latents through the UNet's convolutions.
    - diffusers samples the VAE posterior with its generator; ours (and the 9-channel conditioning) uses its mean:
      the reference gets the mean (`retrieve_latents` in argmax mode), and our noise (`randn_tensor`).
    - strength: A1111 runs int(strength * steps) + 1 of the 10 Euler steps; diffusers int(steps * strength'), so
      strength' = (t_enc + 1.5) / steps, as tests/test_img2img.py::test_img2img_matches_diffusers maps it.
    - the conditioning itself is checked to be the same: diffusers' mask (binarised at 0.5, `interpolate` nearest
      to the latent) equals A1111's (rounded, nearest) exactly, its masked picture (`image * (mask < 0.5)`) equals
      A1111's lerp with weight 1 to float32 rounding, and the masked-picture latents agree within the export's
      1e-4 tolerance.
    3 levels allow for ONNX vs torch rounding through the encoder, UNet and decoder, as in the img2img test."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module

    folder, ref = tiny_model(family), reference(family)
    steps, strength, seed = 10, 0.55, 2024
    t_enc = int(strength * steps)
    picture, mask = init_picture((W, H)), inpaint_mask()
    request = Img2ImgRequest(PROMPT, "blurry", steps=steps, sampler="Euler", seed=seed, init_image=picture,
                             mask=mask, mask_blur=0, inpainting_fill=1, denoising_strength=strength, width=W,
                             height=H)
    request.validate()
    model = LoadedModel(folder, "cpu", keep_loaded=True)
    init = _img2img_init(model, request, seed, _no_clock)
    cond = encode_prompts(model, PROMPT, "blurry")
    ours = np.asarray(_sample_by_hand(model, request, init, cond, seed, blend=False))

    # the composition with A1111's blend and overlay is what the pipeline gives
    blended = masks.apply_overlay(_sample_by_hand(model, request, init, cond, seed, blend=True), init.mask)
    (piped,) = run(LoadedModel(folder, "cpu"), request)
    assert np.asarray(piped.image).tobytes() == np.asarray(blended).tobytes()

    pipe = _diffusers_inpaint_pipeline(folder, ref)
    noise = torch.from_numpy(TorchCpuRandn(seed).randn((1, 4, H // 8, W // 8)))
    monkeypatch.setattr(inpaint_module, "randn_tensor", lambda shape, **kw: noise.reshape(shape))
    monkeypatch.setattr(inpaint_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())

    # the conditioning: diffusers' preprocessing against A1111's (weight 1, blur 0)
    mask_condition = pipe.mask_processor.preprocess(mask, height=H, width=W)
    image = pipe.image_processor.preprocess(picture, height=H, width=W).float()
    masked = image * (mask_condition < 0.5)
    with torch.no_grad():
        ref_mask, ref_latent = pipe.prepare_mask_latents(mask_condition, masked, 1, H, W, torch.float32, "cpu", None,
                                                         False)
    np.testing.assert_array_equal(init.concat[:, :1], ref_mask.numpy())
    pixel_mask = np.round(np.asarray(init.mask.pixel_mask, np.float32) / 255)
    np.testing.assert_allclose(decode.from_image(init.mask.image) * (1 - pixel_mask), masked.numpy(), atol=1e-6)
    assert_close(init.concat[:, 1:], ref_latent.numpy(), f"{family} masked-picture latent")

    with torch.no_grad():
        want = pipe(PROMPT, negative_prompt="blurry", image=picture, mask_image=mask, height=H, width=W,
                    strength=(t_enc + 1.5) / steps, num_inference_steps=steps, guidance_scale=7.0,
                    output_type="np").images[0]
    want = (want * 255).round().astype(np.uint8)
    diff = np.abs(ours.astype(int) - want.astype(int))
    assert diff.max() <= 3, f"max diff {diff.max()} levels, mean {diff.mean():.3f}"  # measured: 1 level
    # The blend and overlay are no rounding matter: with them (the pipeline's image) the random-weight model is
    # ~85 levels from diffusers on average, inside the mask too (the blended surroundings reach it through the
    # UNet's convolutions), so comparing only inside the mask would not work either.
    assert np.abs(np.asarray(piped.image, dtype=int) - want.astype(int))[np.asarray(mask) > 0].max() > 3
    assert np.abs(ours.astype(int) - np.asarray(picture, dtype=int)).mean() > 2, "inpainting changed nothing"


# ----------------------------------------------------------------------------------------------------------
# A1111's inpainting conditioning mask strength, txt2img on an inpainting model


def test_mask_weight_lerps_the_conditioning_picture(tiny_model):
    """--inpainting-mask-weight (A1111's "Inpainting conditioning mask strength"): the conditioning picture is
    torch.lerp(picture, picture * (1 - mask), weight) before the VAE. Weight 0 gives the unmasked picture's latent,
    1 the blanked one, 0.5 the latent of the half-blanked picture; the mask channel does not change. Tolerance
    1e-5: the same ONNX encoder on the same pixels (up to the lerp's float32 rounding)."""
    folder = tiny_model("sd1-inpaint")
    model = LoadedModel(folder, "cpu", keep_loaded=True)
    picture, mask = init_picture((W, H)), inpaint_mask()
    concats = {}
    for weight in (0.0, 0.5, 1.0):
        request = Img2ImgRequest(PROMPT, steps=2, sampler="Euler", seed=1, init_image=picture, mask=mask, mask_blur=0,
                                 inpainting_mask_weight=weight, width=W, height=H)
        request.validate()
        init = _img2img_init(model, request, 1, _no_clock)
        assert init.settings["Conditional mask weight"] == weight
        concats[weight] = init.concat
    pixels = decode.from_image(picture)
    m = np.round(np.asarray(mask, np.float32) / 255)[None, None]
    unmasked = decode.encode(model, [picture])
    expected = {0.0: unmasked, 0.5: decode.encode_pixels(model, pixels * (1 - 0.5 * m)),
                1.0: decode.encode_pixels(model, pixels * (1 - m))}
    for weight, concat in concats.items():
        np.testing.assert_array_equal(concat[:, :1], concats[1.0][:, :1])
        np.testing.assert_allclose(concat[:, 1:], expected[weight], atol=1e-5, err_msg=str(weight))
    # the three cases lie over 1000x the tolerance apart (the tiny VAE's latents are small: |z| <= ~0.1)
    for a, b in ((0.0, 0.5), (0.5, 1.0), (0.0, 1.0)):
        assert np.abs(expected[a] - expected[b]).max() > 1e-2, (a, b)


def test_mask_weight_through_the_cli(tiny_model, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    init_picture((W, H)).save(init)
    inpaint_mask().save(mask)
    out = tmp_path / "out"
    assert main(["img2img", "a cat", "--model", str(tiny_model("sd1-inpaint")), "--init-image", str(init), "--mask",
                 str(mask), "--inpainting-mask-weight", "0.25", "--steps", "2", "-o", str(out), "-q"]) == 0
    (png,) = out.glob("*.png")
    assert "Conditional mask weight: 0.25" in Image.open(png).info["parameters"]


@pytest.mark.parametrize("family", INPAINT)
def test_txt2img_on_an_inpainting_model(family, tiny_model, tmp_path, capsys):
    """A1111's txt2img_image_conditioning: the UNet gets a mask of ones and the latent of a mid-grey picture
    (0 in the VAE's [-1, 1]) beside the noisy latent. `sd-onnx generate` makes an image, no traceback."""
    folder = tiny_model(family)
    out = tmp_path / "out"
    assert main(["generate", "a lighthouse", "--model", str(folder), "--steps", "3", "--width", "64", "--height",
                 "72", "--seed", "5", "-o", str(out), "-q"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    (png,) = out.glob("*.png")
    image = Image.open(png)
    assert image.size == (64, 72) and np.asarray(image).std() > 0

    fed = []
    generate(folder, GenerateRequest("a lighthouse", steps=2, sampler="Euler", seed=5, width=64, height=72),
             device="cpu", observe=lambda component, feeds: fed.append(feeds["sample"]) if component == "unet" else 0)
    grey = decode.encode_pixels(LoadedModel(folder, "cpu"), np.zeros((1, 3, 72, 64), np.float32))
    assert fed and all(s.shape == (2, 9, 9, 8) for s in fed)  # CFG batch of 2
    for s in fed:
        assert (s[:, 4] == 1).all()
        np.testing.assert_allclose(s[:, 5:], np.repeat(grey, 2, axis=0), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# quantize


def test_int8_variant_of_an_inpainting_model(tiny_model, tmp_path):
    """int8 calibrates on txt2img runs (mask of ones, grey-picture latent in the extra channels) and, for an
    inpainting model, on inpainting passes over the pictures they made (a real mask and picture latent there);
    the variant keeps the 9-channel input and its config, and inpaints."""
    import shutil

    import onnx

    from sd_onnx.quantize.calibration import record
    from sd_onnx.quantize.variant import QuantizeOptions, quantize_model
    from tests.test_quantize import FAST

    feeds = record(tiny_model("sd1-inpaint"), ["a cat"], 2, 64).feeds["unet"]
    masks_fed = [f["sample"][:, 4] for f in feeds]
    assert any((m == 1).all() for m in masks_fed)  # txt2img
    assert any(0 < m.mean() < 1 for m in masks_fed)  # the inpainting pass: a centre square

    base = shutil.copytree(tiny_model("sd1-inpaint"), tmp_path / "tiny-inpaint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variant = quantize_model(base, QuantizeOptions("int8", **FAST)).folder
    assert json.loads((variant / "unet" / "config.json").read_text())["in_channels"] == 9
    graph = onnx.load(str(variant / "unet" / "model.onnx"), load_external_data=False).graph
    assert graph.input[0].type.tensor_type.shape.dim[1].dim_value == 9
    assert "QuantizeLinear" in {n.op_type for n in graph.node}
    meta = json.loads((variant / "sd_onnx.json").read_text())
    assert meta["components"]["unet"]["precision"] == "int8" and np.isfinite(meta["fidelity"]["psnr_db_mean"])
    request = Img2ImgRequest("a cat", steps=3, sampler="Euler", seed=2, init_image=init_picture((W, H)),
                             mask=inpaint_mask(), width=W, height=H)
    (image,) = run(LoadedModel(variant, "cpu"), request)
    assert image.image.size == (W, H) and np.isfinite(image.latent).all()
