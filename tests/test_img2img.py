"""img2img and hires fix on the runtime's stages: against diffusers' img2img pipeline, against a hand composition of
the same stages, and as the CLI writes and reads them back (--from-png)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_onnx.cli import main
from sd_onnx.runtime import decode
from sd_onnx.runtime.denoiser import GuidedUNet
from sd_onnx.runtime.encode import encode_prompts
from sd_onnx.runtime.model import LoadedModel
from sd_onnx.runtime.noise import ImageRng, TorchCpuRandn
from sd_onnx.runtime.pipeline import generate, run
from sd_onnx.runtime.requests import GenerateRequest, Img2ImgRequest
from sd_onnx.runtime.samplers import img2img_start, sample
from sd_onnx.runtime.upscale import resize_latent

SIZE = (64, 96)  # width, height
PROMPT = "a black house cat typing on a computer"


def init_picture(size=SIZE, seed=3) -> Image.Image:
    """A smooth picture with structure (gradients and a disc), so the VAE has something to keep."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x / w, y / h, ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 3) ** 2) * 0.8], -1)
    noise = np.random.default_rng(seed).uniform(-0.05, 0.05, rgb.shape)
    return Image.fromarray((np.clip(rgb + noise, 0, 1) * 255).astype(np.uint8))


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_img2img_matches_diffusers(tiny_model, tiny_checkpoint, family, monkeypatch):
    """Same checkpoint, init image, seed-derived noise and schedule slice: at most 3 of 255 levels apart.

    The mapping: A1111 runs int(strength * steps) + 1 steps of the `steps` schedule, from its sigma at index
    steps - t_enc - 1; diffusers runs int(steps * strength') of them from t_start = steps - that. So strength'
    = (t_enc + 1) / steps (plus half a step, against float truncation). diffusers samples the VAE posterior with the
    generator; ours uses its mean, so the reference is given the mean (`retrieve_latents` in argmax mode), and its
    noise is ours (`randn_tensor`). Euler on 10 steps puts the grid on whole timesteps (see test_generate); 3 levels
    allow for ONNX vs torch rounding through the encoder, UNet and decoder."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module

    from tests.test_generate import reference_pipeline

    steps, strength, seed = 10, 0.55, 4321
    t_enc = int(strength * steps)
    picture = init_picture()
    request = Img2ImgRequest(PROMPT, "blurry", steps=steps, sampler="Euler", seed=seed, init_image=picture,
                             denoising_strength=strength)
    ours = np.asarray(generate(tiny_model(family), request, device="cpu").images[0].image)
    assert ours.shape == (SIZE[1], SIZE[0], 3)

    base = reference_pipeline(tiny_checkpoint(family), diffusers.EulerDiscreteScheduler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    w, h = SIZE
    noise = torch.from_numpy(TorchCpuRandn(seed).randn((1, 4, h // 8, w // 8)))
    monkeypatch.setattr(img2img_module, "randn_tensor", lambda shape, **kw: noise.reshape(shape))
    monkeypatch.setattr(img2img_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
    with torch.no_grad():
        ref = pipe(PROMPT, negative_prompt="blurry", image=picture, strength=(t_enc + 1.5) / steps,
                   num_inference_steps=steps, guidance_scale=7.0, output_type="np").images[0]
    ref = (ref * 255).round().astype(np.uint8)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 3, f"max diff {diff.max()} levels, mean {diff.mean():.3f}"
    assert np.abs(ours.astype(int) - np.asarray(picture, dtype=int)).mean() > 2, "img2img changed nothing"


def test_vae_encoder_gives_the_scaled_posterior_mean(tiny_model, tiny_checkpoint):
    """Our encode stage against the torch VAE's latent_dist.mean * scaling_factor: 1e-4 (float32 through ~20
    convolutions)."""
    torch = pytest.importorskip("torch")
    from sd_onnx.export.checkpoint import load_checkpoint
    from sd_onnx.export.convert import build_reference_model

    model = LoadedModel(tiny_model("sd1"), "cpu")
    picture = init_picture()
    ours = decode.encode(model, [picture])
    vae = build_reference_model(load_checkpoint(tiny_checkpoint("sd1"))).vae
    with torch.no_grad():
        ref = vae.encode(torch.from_numpy(decode.from_image(picture))).latent_dist.mean * vae.config.scaling_factor
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4)


class _Counter:
    """Counts UNet calls by the latent size they were made at."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, component: str, feeds: dict) -> None:
        if component == "unet":
            self.calls.append(tuple(feeds["sample"].shape[2:]))


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Lanczos"])
def test_hires_fix_sizes_calls_and_infotext(tiny_model, upscaler):
    counter = _Counter()
    model = LoadedModel(tiny_model("sd1"), "cpu", observe=counter)
    request = GenerateRequest("a cat", steps=4, sampler="Euler", seed=9, width=64, height=64, enable_hr=True,
                              hr_scale=1.5, hr_upscaler=upscaler, hr_second_pass_steps=3, denoising_strength=0.6)
    (image,) = run(model, request)
    assert image.image.size == (96, 96)
    assert counter.calls == [(8, 8)] * 4 + [(12, 12)] * 3  # Euler: one UNet call per step, CFG in the same batch
    settings = image.parameters.splitlines()[-1]
    for field in ("Size: 64x64", "Denoising strength: 0.6", "Hires upscale: 1.5", "Hires steps: 3",
                  f"Hires upscaler: {upscaler}"):
        assert field in settings, settings


def test_hires_resize_box_and_default_steps(tiny_model):
    """Both resize sides given: A1111 upscales to cover the box, then cuts the latent to it. Hires steps 0 means
    the first pass's count, and is not written."""
    counter = _Counter()
    model = LoadedModel(tiny_model("sd1"), "cpu", observe=counter)
    request = GenerateRequest("a cat", steps=3, sampler="Euler", seed=9, width=64, height=96, enable_hr=True,
                              hr_resize_x=128, hr_resize_y=128)
    (image,) = run(model, request)
    assert image.image.size == (128, 128)
    assert counter.calls == [(12, 8)] * 3 + [(16, 16)] * 3
    assert "Hires resize: 128x128" in image.parameters and "Hires steps" not in image.parameters


def test_latent_hires_equals_its_hand_composition(tiny_model):
    """run() with a Latent upscaler is exactly: txt2img latent -> resize_latent -> img2img (A1111's fixed-steps
    rule) with fresh noise of the new size from the same seed -> decode."""
    folder = tiny_model("sd2-v")
    request = GenerateRequest("a cat", "dog", steps=5, sampler="DPM++ 2M", seed=31, width=64, height=80,
                              enable_hr=True, hr_scale=2, hr_upscaler="Latent (bicubic)", hr_second_pass_steps=4,
                              denoising_strength=0.5)
    (piped,) = run(LoadedModel(folder, "cpu"), request)

    model = LoadedModel(folder, "cpu", keep_loaded=True)
    cond = encode_prompts(model, "a cat", "dog")
    denoiser = model.denoiser(GuidedUNet(model.session("unet"), cond, 7.0))
    low = sample("DPM++ 2M", denoiser, ImageRng([31], (4, 10, 8)), 5)
    up = resize_latent(low, 16, 20, "Latent (bicubic)")
    high = sample("DPM++ 2M", denoiser, ImageRng([31], (4, 20, 16)), 4,
                  start=img2img_start(up, 4, 0.5, fixed_steps=True))
    (picture,) = decode.decode(model, high)
    np.testing.assert_array_equal(piped.latent, high[0])
    assert np.asarray(piped.image).tobytes() == np.asarray(picture).tobytes()


def test_img2img_step_rule_matches_a1111():
    """setup_img2img_steps without "fix steps": the whole schedule, int(strength * steps) + 1 steps run; with a
    given step count (the hires pass): exactly that many, on a schedule stretched by 1 / strength."""
    assert (img2img_start(None, 20, 0.75).steps, img2img_start(None, 20, 0.75).t_enc) == (20, 15)
    assert img2img_start(None, 20, 1.0).t_enc == 19  # min(strength, 0.999)
    assert img2img_start(None, 20, 0.0).t_enc == 0
    hr = img2img_start(None, 10, 0.7, fixed_steps=True)
    assert (hr.steps, hr.t_enc) == (14, 9)


@pytest.mark.parametrize("sampler,expected_calls", [("Euler", 8), ("Euler a", 8), ("DDIM", 6), ("UniPC", 7),
                                                    ("Heun", 15), ("LCM", 8)])
def test_img2img_runs_the_a1111_step_count(tiny_model, sampler, expected_calls):
    """strength 0.75 of 10 steps, t_enc = 7: k-diffusion samplers run t_enc + 1 = 8 steps (Heun: two calls a step
    but the last); A1111's DDIM walks its slice timesteps[:7], len - 1 = 6 calls; UniPC runs 7 steps: one model
    call to start and one corrector call after each step but the last."""
    counter = _Counter()
    model = LoadedModel(tiny_model("sd1"), "cpu", observe=counter)
    request = Img2ImgRequest("a cat", steps=10, sampler=sampler, seed=1, init_image=init_picture((64, 64)),
                             denoising_strength=0.75)
    (image,) = run(model, request)
    assert image.image.size == (64, 64)
    assert len(counter.calls) == expected_calls


def test_img2img_size_defaults_to_the_init_image_and_resize_modes(tiny_model, tmp_path):
    picture = init_picture((70, 101))  # rounded to 72 x 104
    path = tmp_path / "init.png"
    picture.save(path)
    (image,) = run(LoadedModel(tiny_model("sd1"), "cpu"),
                   Img2ImgRequest("a cat", steps=2, sampler="Euler", seed=1, init_image=path))
    assert image.image.size == (72, 104)
    for mode in (1, 2, 3):
        (image,) = run(LoadedModel(tiny_model("sd1"), "cpu"),
                       Img2ImgRequest("a cat", steps=2, sampler="Euler", seed=1, init_image=picture, width=64,
                                      height=64, resize_mode=mode))
        assert image.image.size == (64, 64)
        assert ("Resize mode" in image.parameters) == (mode != 0)


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def test_from_png_reproduces_generate_and_img2img_exactly(tiny_model, tmp_path):
    folder = str(tiny_model("sd1"))
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["generate", 'a "quoted", (cat:1.2)\nNegative prompt: not really', "-n", "dog, blurry",
                 "--model", folder, "--steps", "3", "--seed", "4294967295", "--batch-size", "2", "--sampler",
                 "DPM++ 2M", "--cfg", "6.123456789", "--width", "64", "--height", "72", "--enable-hr", "--hr-scale",
                 "1.25", "--hr-upscaler", "Nearest", "-o", str(first), "-q"]) == 0
    made = _pngs(first)
    assert [p.name.split("-", 1)[1] for p in made] == ["4294967295.png", "4294967296.png"]  # no wrap past 2**32-1
    for png in made:
        assert main(["generate", "--from-png", str(png), "--model", folder, "-o", str(again), "-q"]) == 0
    for pos, (original, copy) in enumerate(zip(made, _pngs(again))):
        a, b = Image.open(original), Image.open(copy)
        assert a.tobytes() == b.tobytes()
        # the copy was made alone from the image's own seed: the same text but for the batch fields
        assert a.info["parameters"].replace(f"Batch size: 2, Batch pos: {pos}, ", "") == b.info["parameters"]
    init = tmp_path / "init.png"
    init_picture((64, 64)).save(init)
    i2i, i2i_again = tmp_path / "i2i", tmp_path / "i2i-again"
    assert main(["img2img", "a fox", "--init-image", str(init), "--model", folder, "--steps", "4", "--seed", "8",
                 "--denoising-strength", "0.4", "-o", str(i2i), "-q"]) == 0
    assert main(["img2img", "--from-png", str(_pngs(i2i)[0]), "--init-image", str(init), "--model", folder,
                 "-o", str(i2i_again), "-q"]) == 0
    assert Image.open(_pngs(i2i)[0]).tobytes() == Image.open(_pngs(i2i_again)[0]).tobytes()


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd-onnx: error:"), err
    return err[0]


def test_img2img_bad_input_is_one_line_and_writes_nothing(tiny_model, tmp_path, capsys):
    folder = str(tiny_model("sd1"))
    out = tmp_path / "out"
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    truncated = tmp_path / "cut.png"
    init_picture().save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    good = tmp_path / "good.png"
    init_picture().save(good)
    cases = [
        (["--init-image", str(tmp_path / "missing.png")], "image not found"),
        (["--init-image", str(not_image)], "cannot read"),
        (["--init-image", str(truncated)], "cannot read"),
        (["--init-image", str(tmp_path)], "is a folder"),
        ([], "needs an init image"),
        (["--init-image", str(good), "--denoising-strength", "1.5"], "denoising strength must be between 0 and 1"),
        (["--init-image", str(good), "--denoising-strength", "-0.1"], "denoising strength must be between 0 and 1"),
        (["--init-image", str(good), "--width", "100"], "multiple of 8"),
    ]
    for extra, message in cases:
        assert main(["img2img", "a cat", "--model", folder, "-o", str(out), "-q", *extra]) == 2, extra
        assert message in _one_error_line(capsys), extra
    assert main(["generate", "a cat", "--model", folder, "-o", str(out), "--enable-hr", "--hr-upscaler", "ESRGAN_9x",
                 "-q"]) == 2
    line = _one_error_line(capsys)
    assert "unknown hires upscaler 'ESRGAN_9x'" in line and "Latent (nearest-exact)" in line and "Lanczos" in line
    assert main(["generate", "a cat", "--model", folder, "-o", str(out), "--enable-hr", "--hr-scale", "8", "-q"]) == 2
    assert "hires width 4096 is over the limit of 2048 px" in _one_error_line(capsys)
    assert not out.exists()


def test_missing_vae_encoder_is_one_line(tiny_model, tmp_path, capsys):
    import shutil

    folder = Path(shutil.copytree(tiny_model("sd1"), tmp_path / "no-encoder"))
    shutil.rmtree(folder / "vae_encoder")
    init = tmp_path / "init.png"
    init_picture((64, 64)).save(init)
    assert main(["img2img", "a cat", "--init-image", str(init), "--model", str(folder), "-o", str(tmp_path / "o"),
                 "--steps", "2", "-q"]) == 2
    assert "vae_encoder" in _one_error_line(capsys)
    assert not list((tmp_path / "o").glob("*.png"))


def test_interrupt_and_skip_keep_what_was_made(tiny_model):
    """A1111's Interrupt ends the job at the next step and returns the latest prediction; Skip does that for the
    current batch and goes on."""
    from sd_onnx.runtime.control import RunControl

    counter = _Counter()
    model = LoadedModel(tiny_model("sd1"), "cpu", observe=counter)
    control = RunControl()
    stop_at_second_step = lambda label: (lambda i, total: control.interrupt() if i == 1 else None)  # noqa: E731
    request = GenerateRequest("a cat", steps=10, sampler="Euler", seed=2, width=64, height=64, batch_count=3)
    made = list(run(model, request, stop_at_second_step, control=control))
    assert len(made) == 1 and len(counter.calls) == 2
    assert np.isfinite(made[0].latent).all() and np.asarray(made[0].image).std() > 0

    counter.calls.clear()
    control = RunControl()
    skip_first_batch = lambda label: (  # noqa: E731
        lambda i, total: control.skip() if control.batch == 0 and i == 0 else None)
    made = list(run(model, request, skip_first_batch, control=control))
    assert len(made) == 3 and len(counter.calls) == 1 + 10 + 10
    assert control.step == control.total == 10


def test_the_unet_is_freed_before_the_last_decode(tiny_model):
    """A 512px run must not hold the UNet's weights and the VAE decoder's activations at once: when the decoder is
    first fed, nothing references the UNet session any more (not the pipeline, not the guidance wrapper)."""
    import gc
    import weakref

    seen = {}

    def observe(component, feeds):
        if component == "vae_decoder" and "unet_alive" not in seen:
            gc.collect()
            seen["unet_alive"] = unet_ref() is not None

    model = LoadedModel(tiny_model("sd1"), "cpu", observe=observe)
    unet_ref = weakref.ref(model.session("unet"))
    request = GenerateRequest("a cat", steps=2, sampler="Euler", seed=1, width=64, height=64)
    assert len(list(run(model, request))) == 1
    assert seen == {"unet_alive": False}
