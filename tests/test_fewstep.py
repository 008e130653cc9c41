"""Few-step generation: TAESD export and decode/encode, LCM UNets with timestep_cond, 1-step turbo schedules."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers vs NumPy 2 array protocols
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def approx_home(tmp_path_factory):
    """A private $SD_ONNX_HOME for this module: an installed TAESD changes every later run's previews."""
    home = tmp_path_factory.mktemp("approx-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SD_ONNX_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def taesd_files(tmp_path_factory):
    """A random-weight diffusers AutoencoderTiny and its weights saved as madebyollin's taesd.py files: the encoder
    and decoder as plain nn.Sequential state dicts, the decoder's indices shifted by its Clamp at index 0."""
    from sd_onnx.export.taesd import TAESD_CONFIG

    torch.manual_seed(3)
    vae = diffusers.AutoencoderTiny(**TAESD_CONFIG).eval()
    with torch.no_grad():  # weights spread enough that every layer matters, small enough to stay in range
        for p in vae.parameters():
            p.mul_(0.9)
    folder = tmp_path_factory.mktemp("taesd")
    torch.save(dict(vae.encoder.layers.state_dict()), folder / "taesd_encoder.pth")
    decoder = {}
    for key, value in vae.decoder.layers.state_dict().items():
        index, rest = key.split(".", 1)
        decoder[f"{int(index) + 1}.{rest}"] = value
    torch.save(decoder, folder / "taesd_decoder.pth")
    return vae, folder


@pytest.fixture(scope="module")
def taesd_folder(approx_home, taesd_files):
    from sd_onnx.cli import main

    _, files = taesd_files
    assert main(["export-vae-approx", str(files / "taesd_decoder.pth"), str(files / "taesd_encoder.pth"), "-q"]) == 0
    folder = approx_home / "vae-approx" / "taesd"
    assert (folder / "vae_decoder" / "model.onnx").is_file() and (folder / "vae_encoder" / "model.onnx").is_file()
    return folder


def _ort(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_taesd_onnx_matches_autoencoder_tiny(taesd_files, taesd_folder):
    """The exported decoder and encoder against diffusers' AutoencoderTiny on the same inputs: 1e-4 relative to the
    output's range (float32 through ~40 convolutions; the graphs are the same operations, reordered by ORT)."""
    vae, _ = taesd_files
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((2, 4, 12, 10)).astype(np.float32) * 2
    ours = _ort(taesd_folder / "vae_decoder" / "model.onnx").run(None, {"latent_sample": latent})[0]
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(latent)).sample.numpy()
    assert ours.shape == (2, 3, 96, 80)
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    picture = rng.uniform(-1, 1, (1, 3, 72, 64)).astype(np.float32)
    ours = _ort(taesd_folder / "vae_encoder" / "model.onnx").run(None, {"sample": picture})[0]
    with torch.no_grad():
        ref = vae.encode(torch.from_numpy(picture)).latents.numpy()
    assert ours.shape == (1, 4, 9, 8)
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    meta = json.loads((taesd_folder / "sd_onnx.json").read_text())
    assert meta["kind"] == "taesd" and meta["scaling_factor"] == 1.0


def test_taesd_refuses_other_files(tmp_path, approx_home, tiny_checkpoint):
    """A checkpoint that is not TAESD is one line and exit 2, naming what was expected."""
    from sd_onnx.cli import main

    torch.save({"0.weight": torch.zeros(64, 5, 3, 3)}, tmp_path / "odd.pth")
    for path in (tmp_path / "odd.pth", tiny_checkpoint("sd1")):
        assert main(["export-vae-approx", str(path), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert not (tmp_path / "out").exists()


def test_generate_with_taesd_decodes_with_it(taesd_files, taesd_folder, tiny_model, tmp_path, capsys):
    """`generate --vae taesd`: the PNG is TAESD's decode of the final latent (AutoencoderTiny, scaling 1.0: the
    UNet's latents as they are), the infotext says so as A1111 does, and `--preview` leaves the last step's preview
    (TAESD, full size) on disk."""
    from sd_onnx.cli import main
    from sd_onnx.runtime import pipeline
    from sd_onnx.runtime.model import LoadedModel
    from sd_onnx.runtime.requests import GenerateRequest

    vae, _ = taesd_files
    folder = tiny_model("sd1")
    request = GenerateRequest("a cat", steps=2, cfg_scale=1.0, seed=5, width=64, height=72, sampler="Euler")
    model = LoadedModel(folder, "cpu", vae="taesd")
    (image,) = list(pipeline.run(model, request))
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(image.latent[None])).sample.numpy()
    expected = np.clip(ref[0] / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255
    assert np.abs(np.asarray(image.image, dtype=np.float32) - expected).max() <= 1.0  # rounding to 8 bits
    assert "VAE Decoder: TAESD" in image.parameters

    preview = tmp_path / "preview.png"
    assert main(["generate", "a cat", "--model", str(folder), "--steps", "2", "--cfg", "1", "--seed", "5",
                 "--width", "64", "--height", "72", "--sampler", "Euler", "--vae", "taesd", "--device", "cpu",
                 "--preview", str(preview), "-o", str(tmp_path / "out"), "-q"]) == 0
    png = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert Image.open(png).size == (64, 72) and Image.open(preview).size == (64, 72)
    assert not list(tmp_path.glob(".preview.png.*"))


def test_taesd_encode_and_missing_name(taesd_files, taesd_folder, tiny_model):
    """img2img's encode stage through TAESD (scaling 1.0) matches AutoencoderTiny.encode; an unknown --vae name is
    one line naming the export command."""
    from sd_onnx.errors import ModelFolderError
    from sd_onnx.runtime import decode
    from sd_onnx.runtime.model import LoadedModel

    vae, _ = taesd_files
    model = LoadedModel(tiny_model("sd1"), "cpu", vae="taesd")
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 56, 3), dtype=np.uint8))
    ours = decode.encode(model, [picture])
    with torch.no_grad():
        ref = vae.encode(torch.from_numpy(decode.from_image(picture))).latents.numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    with pytest.raises(ModelFolderError, match="export-vae-approx"):
        LoadedModel(tiny_model("sd1"), "cpu", vae="taesdxl")


def test_preview_without_taesd_is_cheap(tiny_model, monkeypatch, tmp_path):
    """No TAESD installed and none chosen: the live preview is A1111's cheap approximation at latent size."""
    from sd_onnx.runtime import decode
    from sd_onnx.runtime.model import LoadedModel

    monkeypatch.setenv("SD_ONNX_HOME", str(tmp_path))
    model = LoadedModel(tiny_model("sd1"), "cpu")
    assert model.preview_vae is None
    assert decode.preview(model, np.zeros((4, 6, 5), np.float32)).size == (5, 6)


# --- LCM: a UNet with a guidance embedding -------------------------------------------------------------------

LCM_DIM = 32
SIZE = (64, 72)


@pytest.fixture(scope="module")
def lcm_checkpoint(tmp_path_factory):
    """The tiny SD 1.x checkpoint with an LCM guidance projection under the LDM prefix."""
    from sd_onnx.export.synthetic import write_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_checkpoint(tmp_path_factory.mktemp("lcm") / "tiny-lcm.ckpt", "sd1", seed=7, cond_proj_dim=LCM_DIM)


@pytest.fixture(scope="module")
def lcm_model(lcm_checkpoint, tmp_path_factory):
    from sd_onnx.export.exporter import export_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_model(lcm_checkpoint, tmp_path_factory.mktemp("lcm-models") / "tiny-lcm").folder


def _lcm_reference(checkpoint: Path):
    from transformers import CLIPTokenizer

    from sd_onnx.export.checkpoint import load_checkpoint
    from sd_onnx.export.convert import build_reference_model
    from sd_onnx.runtime.tokenizer import write_tokenizer_folder

    model = build_reference_model(load_checkpoint(checkpoint))
    tok_dir = checkpoint.parent / f"{checkpoint.stem}-tokenizer"
    write_tokenizer_folder(tok_dir, pad_token=model.family.pad_token)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.LatentConsistencyModelPipeline(
            vae=model.vae, text_encoder=model.text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
            unet=model.unet, scheduler=diffusers.LCMScheduler.from_config(model.scheduler_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_guidance_embedding_matches_diffusers():
    """Our NumPy get_guidance_scale_embedding against diffusers' (torch, float32): 2e-3, diffusers' own rounding of
    float32 arguments up to w * 1000 = 7000 rad (7000 * 2**-24 per ulp, times a few ulps through exp and mul)."""
    pipe_cls = diffusers.LatentConsistencyModelPipeline
    from sd_onnx.runtime.fewstep import guidance_scale_embedding

    for w, dim in ((7.0, 256), (0.5, 32), (3.0, 33)):
        ref = pipe_cls.get_guidance_scale_embedding(None, torch.tensor([w]), embedding_dim=dim).numpy()
        np.testing.assert_allclose(guidance_scale_embedding(w, dim), ref, rtol=0, atol=2e-3)


def test_lcm_export_detects_timestep_cond(lcm_model):
    import onnx

    config = json.loads((lcm_model / "unet" / "config.json").read_text())
    assert config["time_cond_proj_dim"] == LCM_DIM
    graph = onnx.load(str(lcm_model / "unet" / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert inputs["timestep_cond"] == ["cond_batch", LCM_DIM]


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_matches_latent_consistency_pipeline(lcm_model, lcm_checkpoint, steps):
    """`LCM` sampler on an LCM UNet against diffusers' LatentConsistencyModelPipeline, same checkpoint, seed-derived
    noise (initial and per step, one torch CPU generator) and A1111's LCM timesteps handed to diffusers as custom
    timesteps (4 steps: A1111 picks 999, 679, 339, 19 where diffusers' default is 999, 759, 499, 259). Guidance is the
    embedded scale w - 1 = 7, one UNet batch. At most 3 of 255 levels on any pixel (ONNX vs torch float rounding
    after the VAE, as test_generate allows); the guidance embedding must matter (a run at w=2 differs)."""
    from sd_onnx.runtime.denoiser import Denoiser, ldm_alphas_cumprod
    from sd_onnx.runtime.model import LoadedModel
    from sd_onnx.runtime.noise import TorchCpuRandn
    from sd_onnx.runtime.pipeline import GenerateRequest, run
    from sd_onnx.runtime.samplers import LcmDenoiser

    seed, (w, h) = 321, SIZE
    request = GenerateRequest("a cat in a hat", steps=steps, cfg_scale=8.0, sampler="LCM", seed=seed, width=w, height=h)
    calls = []
    model = LoadedModel(lcm_model, "cpu", observe=lambda c, feeds: calls.append(feeds) if c == "unet" else None)
    ours = np.asarray(next(run(model, request)).image).astype(int)
    assert len(calls) == steps and all(c["sample"].shape[0] == 1 for c in calls)  # no unconditional batch

    lcm = LcmDenoiser(Denoiser(lambda x, t: x, ldm_alphas_cumprod()))
    timesteps = [int(lcm.timesteps[np.argmin(np.abs(np.log(s) - lcm.log_sigmas))]) for s in lcm.get_sigmas(steps)[:-1]]
    assert timesteps[0] == 999 and [float(c["timestep"][0]) for c in calls] == timesteps
    pipe = _lcm_reference(lcm_checkpoint)
    sigma_max = float(lcm.denoiser.sigma_max)
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn((1, 4, h // 8, w // 8), generator=generator)  # the generator then gives the step noise
    np.testing.assert_allclose(raw.numpy(), TorchCpuRandn(seed).randn((1, 4, h // 8, w // 8)), rtol=0, atol=1e-6)
    latents = raw * (sigma_max / (sigma_max**2 + 1) ** 0.5)  # k-diffusion's x = noise * sigma_max, in VP space
    with torch.no_grad():
        ref = pipe("a cat in a hat", height=h, width=w, timesteps=timesteps, guidance_scale=8.0, latents=latents,
                   generator=generator, output_type="np").images[0]
    ref = (ref * 255).round().astype(int)
    diff = np.abs(ours - ref)
    assert diff.max() <= 3, f"max diff {diff.max()} levels, mean {diff.mean():.3f}"
    assert ours.std() > 1.0
    other = np.asarray(next(run(LoadedModel(lcm_model, "cpu"), GenerateRequest(
        "a cat in a hat", steps=steps, cfg_scale=2.0, sampler="LCM", seed=seed, width=w, height=h))).image)
    assert np.abs(other.astype(int) - ours).max() > 3


# --- SD-Turbo class: one step at t = 999 without CFG ------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd2", "sd1"])
def test_one_step_turbo_matches_diffusers(tiny_model, tiny_checkpoint, family):
    """`--sampler "Euler a" --steps 1 --cfg 1` (SD-Turbo's recipe on SD 2.1 and SDXS-class models on SD 1.5) against
    diffusers' StableDiffusionPipeline with EulerAncestralDiscreteScheduler(timestep_spacing="trailing"), 1 step,
    guidance 0, as the SD-Turbo model card runs it: both evaluate the UNet once at t = 999, conditional batch only,
    and return its denoised latent. At most 3 of 255 levels (ONNX vs torch rounding after the VAE)."""
    from tests.test_generate import reference_pipeline

    from sd_onnx.runtime.model import LoadedModel
    from sd_onnx.runtime.noise import TorchCpuRandn
    from sd_onnx.runtime.pipeline import GenerateRequest, run

    seed, (w, h) = 77, SIZE
    calls = []
    model = LoadedModel(tiny_model(family), "cpu", observe=lambda c, f: calls.append(f) if c == "unet" else None)
    ours = np.asarray(next(run(model, GenerateRequest("a red fox", steps=1, cfg_scale=1.0, sampler="Euler a",
                                                      seed=seed, width=w, height=h))).image).astype(int)
    assert len(calls) == 1 and calls[0]["sample"].shape[0] == 1
    assert abs(float(calls[0]["timestep"][0]) - 999) < 1e-3
    pipe = reference_pipeline(tiny_checkpoint(family), diffusers.EulerAncestralDiscreteScheduler)
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                          timestep_spacing="trailing")
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]
    noise = torch.from_numpy(TorchCpuRandn(seed).randn((1, 4, h // 8, w // 8)))
    with torch.no_grad():  # trailing spacing: init_noise_sigma is sigma_max, as k-diffusion's start
        ref = pipe("a red fox", height=h, width=w, num_inference_steps=1, guidance_scale=0.0, latents=noise,
                   output_type="np").images[0]
    ref = (ref * 255).round().astype(int)
    diff = np.abs(ours - ref)
    assert diff.max() <= 3, f"max diff {diff.max()} levels, mean {diff.mean():.3f}"
    assert ours.std() > 1.0


def test_lcm_with_taesd_runs_without_torch(lcm_model, taesd_folder, tmp_path):
    """The few-step path (LCM UNet with timestep_cond, TAESD decode, --preview) stays torch-free: a subprocess where
    torch, diffusers and transformers are unimportable."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; sys.modules.update(torch=None, diffusers=None, transformers=None); "
        "from sd_onnx.cli import main; "
        f"rc = main(['generate', 'a cat', '--model', {str(lcm_model)!r}, '--sampler', 'LCM', '--steps', '2', "
        f"'--cfg', '8', '--vae', 'taesd', '--width', '64', '--height', '64', '--device', 'cpu', "
        f"'--preview', {str(tmp_path / 'p.png')!r}, '-o', {str(tmp_path)!r}, '-q']); "
        "assert not any(sys.modules.get(m) for m in ('torch', 'diffusers', 'transformers')); sys.exit(rc)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "p.png").is_file() and len(list(tmp_path.glob("*.png"))) == 2
