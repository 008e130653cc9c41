"""End to end: `generate` on exported tiny models equals diffusers' StableDiffusionPipeline on the same checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_onnx.cli import main
from sd_onnx.runtime.noise import TorchCpuRandn
from sd_onnx.runtime.pipeline import GenerateRequest, generate

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SIZE = (64, 96)  # width, height: non-square on purpose
PROMPT = "a black house cat typing on a computer"  # no emphasis syntax: diffusers would tokenize it literally


def reference_pipeline(checkpoint: Path, scheduler):
    from transformers import CLIPTokenizer

    from sd_onnx.export.checkpoint import load_checkpoint
    from sd_onnx.export.convert import build_reference_model
    from sd_onnx.runtime.tokenizer import write_tokenizer_folder

    model = build_reference_model(load_checkpoint(checkpoint))
    tok_dir = checkpoint.parent / f"{checkpoint.stem}-tokenizer"
    write_tokenizer_folder(tok_dir, pad_token=model.family.pad_token)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
            unet=model.unet, scheduler=scheduler.from_config(model.scheduler_config, timestep_spacing="linspace"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(pipe, seed: int, steps: int, prompt: str = PROMPT, negative: str = "", cfg: float = 7.0,
                    **kwargs) -> np.ndarray:
    w, h = SIZE
    noise = torch.from_numpy(TorchCpuRandn(seed).randn((1, 4, h // 8, w // 8)))
    pipe.scheduler.set_timesteps(steps)
    # A1111/k-diffusion start from noise * sigma_max; diffusers multiplies the given latents by its
    # init_noise_sigma (sqrt(sigma_max^2 + 1) for linspace spacing), so hand it the ratio.
    sigma_max = float(((1 - pipe.scheduler.alphas_cumprod[-1]) / pipe.scheduler.alphas_cumprod[-1]) ** 0.5)
    latents = noise * (sigma_max / float(pipe.scheduler.init_noise_sigma))
    with torch.no_grad():
        out = pipe(prompt, negative_prompt=negative, height=h, width=w, num_inference_steps=steps,
                   guidance_scale=cfg, latents=latents, output_type="np", **kwargs).images[0]
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    "family,sampler,scheduler_name,steps",
    [
        ("sd1", "Euler", "EulerDiscreteScheduler", 10),
        ("sd2", "Euler", "EulerDiscreteScheduler", 10),
        ("sd2-v", "Euler", "EulerDiscreteScheduler", 10),
        ("sd1", "Heun", "HeunDiscreteScheduler", 10),
    ],
)
def test_generate_matches_diffusers_pipeline(tiny_model, tiny_checkpoint, family, sampler, scheduler_name, steps):
    """Same checkpoint, prompt, seed-derived latents and sampler: at most 3 of 255 levels apart on any pixel.

    10 steps put the linspace grid on whole timesteps, where diffusers' (linear in sigma) and
    k-diffusion's (linear in log sigma) interpolations agree, so the only differences are ONNX vs torch
    float arithmetic; 3 levels allows for that rounding after the VAE.
    """
    folder = tiny_model(family)
    request = GenerateRequest(PROMPT, "blurry", steps=steps, cfg_scale=7.0, sampler=sampler, seed=1234,
                              width=SIZE[0], height=SIZE[1])
    ours = np.asarray(generate(folder, request, device="cpu").images[0].image)
    pipe = reference_pipeline(tiny_checkpoint(family), getattr(diffusers, scheduler_name))
    ref = reference_image(pipe, 1234, steps, negative="blurry")
    assert ours.shape == ref.shape == (SIZE[1], SIZE[0], 3)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 3, f"max diff {diff.max()} levels, mean {diff.mean():.3f}"
    assert ours.std() > 1.0, "a flat image would make the comparison meaningless"


def test_dpmpp_2m_matches_diffusers(tiny_model, tiny_checkpoint):
    """DPM++ 2M against DPMSolverMultistepScheduler on A1111's grid (999, 888, ..., 0); 3 levels as above."""
    folder = tiny_model("sd1")
    request = GenerateRequest(PROMPT, "", steps=10, sampler="DPM++ 2M", seed=99, width=SIZE[0], height=SIZE[1])
    ours = np.asarray(generate(folder, request, device="cpu").images[0].image)
    pipe = reference_pipeline(tiny_checkpoint("sd1"), diffusers.DPMSolverMultistepScheduler)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, final_sigmas_type="zero", lower_order_final=True, euler_at_final=False)
    w, h = SIZE
    noise = torch.from_numpy(TorchCpuRandn(99).randn((1, 4, h // 8, w // 8)))
    timesteps = [999 - 111 * i for i in range(9)] + [0]
    ac = pipe.scheduler.alphas_cumprod
    sigma_max = float(((1 - ac[-1]) / ac[-1]) ** 0.5)
    # diffusers' DPM-Solver works on VP latents (init_noise_sigma 1): x_vp = x_ve / sqrt(sigma^2 + 1)
    latents = noise * sigma_max / (sigma_max**2 + 1) ** 0.5
    with torch.no_grad():
        ref = pipe(PROMPT, height=h, width=w, timesteps=timesteps, guidance_scale=7.0, latents=latents,
                   output_type="np").images[0]
    ref = (ref * 255).round().astype(np.uint8)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 3, f"max diff {diff.max()} levels"


def test_seed_reproducible_across_batch_positions(tiny_model):
    """--batch-size 2 image 2 equals --seed S+1 alone (A1111's per-image generators); exact on one provider."""
    folder = tiny_model("sd1")
    base = dict(steps=4, sampler="Euler a", width=64, height=64)
    batch = generate(folder, GenerateRequest("a cat", seed=500, batch_size=2, **base), device="cpu").images
    single = generate(folder, GenerateRequest("a cat", seed=501, **base), device="cpu").images
    again = generate(folder, GenerateRequest("a cat", seed=500, **base), device="cpu").images
    assert [img.seed for img in batch] == [500, 501]
    np.testing.assert_allclose(batch[1].latent, single[0].latent, atol=1e-5)
    np.testing.assert_allclose(batch[0].latent, again[0].latent, atol=1e-5)
    assert not np.allclose(batch[0].latent, batch[1].latent)


def test_long_prompt_and_emphasis_change_the_image(tiny_model):
    """Prompts past 75 tokens are chunked (not cut): the words after token 75 still change the result."""
    folder = tiny_model("sd1")
    long = ", ".join(["a very detailed painting of a cat"] * 12)
    base = dict(steps=3, sampler="Euler", width=64, height=64, seed=3)
    a = generate(folder, GenerateRequest(long, **base), device="cpu").images[0].latent
    b = generate(folder, GenerateRequest(long + ", red", **base), device="cpu").images[0].latent
    c = generate(folder, GenerateRequest(long + ", (red:1.5)", **base), device="cpu").images[0].latent
    assert not np.allclose(a, b) and not np.allclose(b, c)


def test_cli_writes_png_with_a1111_parameters(tiny_model, tmp_path, capsys):
    folder = tiny_model("sd1")
    rc = main(["generate", "a cat", "-n", "ugly", "--model", str(folder), "--steps", "2", "--width", "64",
               "--height", "64", "--seed", "42", "--batch-size", "2", "-o", str(tmp_path), "-q"])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == ["00000-42.png", "00001-43.png"]
    text = Image.open(tmp_path / "00001-43.png").text["parameters"]
    lines = text.split("\n")
    meta = json.loads((folder / "sd_onnx.json").read_text())
    assert lines[0] == "a cat" and lines[1] == "Negative prompt: ugly"
    assert lines[2].startswith("Steps: 2, Sampler: Euler a, CFG scale: 7, Seed: 43, Size: 64x64, ")
    assert f"Model hash: {meta['source']['short_hash']}, Model: {folder.name}" in lines[2]
    # A second run continues the numbering, as A1111 does.
    assert main(["generate", "a cat", "--model", str(folder), "--steps", "1", "--width", "64", "--height", "64",
                 "--seed", "7", "-o", str(tmp_path), "-q"]) == 0
    assert (tmp_path / "00002-7.png").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--width", "100"], "multiple of 8"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--sampler", "Euler b"], "valid names: Euler a, Euler, LMS"),
        (["--device", "cuda"], "onnxruntime-gpu"),
        (["--seed", "-5"], "seed must be"),
    ],
)
def test_cli_bad_input_one_line(tiny_model, tmp_path, capsys, args, message):
    rc = main(["generate", "x", "--model", str(tiny_model("sd1")), "-o", str(tmp_path), "-q", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.glob("*.png"))


def test_cli_missing_and_incomplete_model(tmp_path, capsys, tiny_model):
    assert main(["generate", "x", "--model", str(tmp_path / "nope"), "-q"]) == 2
    assert "model folder not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    assert main(["generate", "x", "--model", str(broken), "-q"]) == 2
    assert "not a complete model folder" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["generate", "x", "--model", str(tiny_model("sd1")), "-o", str(blocker / "out"), "-q"]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_generate_runs_without_torch(tiny_model, tmp_path):
    """The runtime path imports no torch/diffusers/transformers: a subprocess where importing them fails."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    for name in ("torch", "diffusers", "transformers"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} must not be imported by the runtime')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(Path(__file__).parents[1])]))
    code = (
        "import sys; from sd_onnx.cli import main; "
        f"rc = main(['generate', 'a cat', '--model', {str(tiny_model('sd1'))!r}, '--steps', '2', '--width', '64', "
        f"'--height', '64', '--seed', '1', '-o', {str(tmp_path / 'out')!r}, '-q']); "
        "assert not any(m in sys.modules for m in ('torch', 'diffusers', 'transformers')); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "00000-1.png").exists()


def test_default_model_from_home(tiny_model, tmp_path, monkeypatch, capsys):
    """Without --model: the only model under $SD_ONNX_HOME/models is used; with two, the error lists them."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(tiny_model("sd1"), home / "models" / "first")
    monkeypatch.setenv("SD_ONNX_HOME", str(home))
    args = ["generate", "a cat", "--steps", "1", "--width", "64", "--height", "64", "--seed", "1",
            "-o", str(tmp_path / "out"), "-q"]
    assert main(args) == 0
    assert (tmp_path / "out" / "00000-1.png").exists()
    shutil.copytree(tiny_model("sd1"), home / "models" / "second")
    assert main(args) == 2
    assert "several models installed" in capsys.readouterr().err
    assert main([*args[:1], "a cat", "--model", "second", *args[2:]]) == 0
