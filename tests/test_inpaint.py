"""Inpainting on a normal model, as A1111 does it: mask preparation, latent blending at every step, the init picture laid
back over everything outside the mask, "Only masked" crop and paste-back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sd_onnx.cli import main
from sd_onnx.runtime import decode, masks
from sd_onnx.runtime.denoiser import GuidedUNet
from sd_onnx.runtime.encode import encode_prompts
from sd_onnx.runtime.model import LoadedModel
from sd_onnx.runtime.noise import ImageRng
from sd_onnx.runtime.pipeline import run
from sd_onnx.runtime.requests import Img2ImgRequest
from sd_onnx.runtime.samplers import img2img_start, sample
from tests.test_img2img import init_picture

W, H = 96, 64


def box_mask(box=(50, 10, 80, 40), size=(W, H)) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def _request(**kwargs) -> Img2ImgRequest:
    base = dict(steps=4, sampler="Euler", seed=3, init_image=init_picture((W, H)), mask=box_mask(), width=W,
                height=H)
    return Img2ImgRequest("a dog", **{**base, **kwargs})


def test_outside_the_blurred_mask_the_picture_is_the_init_image(tiny_model):
    """A1111 lays the init picture over the result with the blurred mask as alpha (apply_overlay), so where the
    blurred mask is 0 the output equals the input exactly: no VAE round trip there. Inside, the picture changed."""
    (image,) = run(LoadedModel(tiny_model("sd1"), "cpu"), _request())
    out = np.asarray(image.image, dtype=int)
    init = np.asarray(init_picture((W, H)), dtype=int)
    blurred = np.asarray(masks.gaussian_blur(box_mask(), 4, 4))
    outside = blurred == 0
    assert outside.sum() > W * H / 2
    assert (out[outside] == init[outside]).all()
    assert np.abs(out - init)[15:35, 55:75].mean() > 5
    assert "Mask blur: 4" in image.parameters and "Denoising strength: 0.75" in image.parameters


def test_inpainting_equals_a1111s_blend_composed_by_hand(tiny_model):
    """The pipeline against the same stages by hand with A1111's formulas: at every step denoised = init * (1 - m)
    + m * denoised (k-diffusion samplers), after sampling x = x * m + init * (1 - m), then decode and overlay."""
    folder = tiny_model("sd1")
    (piped,) = run(LoadedModel(folder, "cpu"), _request(sampler="Euler a", denoising_strength=0.6))

    model = LoadedModel(folder, "cpu", keep_loaded=True)
    prepared = masks.prepare(init_picture((W, H)), box_mask(), W, H, 0, 4, False, False, 32, 1)
    init = decode.encode(model, [prepared.image])
    m = np.broadcast_to(prepared.latent_mask, init.shape)
    cond = encode_prompts(model, "a dog", "")
    denoiser = model.denoiser(GuidedUNet(model.session("unet"), cond, 7.0))
    plain = denoiser.denoise

    def blended(x, sigma, t):
        return init * (1 - m) + m * plain(x, sigma, t)

    denoiser.denoise = blended
    x = sample("Euler a", denoiser, ImageRng([3], (4, H // 8, W // 8)), 4, start=img2img_start(init, 4, 0.6))
    x = x * m + init * (1 - m)
    (picture,) = decode.decode(model, x)
    by_hand = masks.apply_overlay(picture, prepared)
    np.testing.assert_array_equal(piped.latent, x[0])
    assert np.asarray(piped.image).tobytes() == np.asarray(by_hand).tobytes()


def test_only_masked_crops_scales_and_pastes_back(tiny_model):
    """An off-centre mask on a 96x64 picture, processed at 64x64: A1111's box is the mask's bounding box plus the
    padding, grown to the processing aspect ratio inside the picture; the result goes back there only."""
    mask = box_mask((70, 8, 85, 20))  # near the right edge
    prepared = masks.prepare(init_picture((W, H)), mask, 64, 64, 0, 4, False, True, 8, 1)
    # bbox of the blurred mask (blur 4 reaches 10 px out: (60, 0, 96, 31)) + 8 px, clamped: (52, 0, 96, 39),
    # then grown to 1:1 (44 wide, 39 high -> 44 high: y1 = 0 - 2 -> shifted down to 0..44)
    assert prepared.paste_to == (52, 0, 44, 44)
    assert prepared.image.size == (64, 64)
    (image,) = run(LoadedModel(tiny_model("sd1"), "cpu"),
                   _request(mask=mask, width=64, height=64, inpaint_full_res=True, inpaint_full_res_padding=8))
    assert image.image.size == (W, H)  # the whole picture comes back
    out = np.asarray(image.image, dtype=int)
    init = np.asarray(init_picture((W, H)), dtype=int)
    changed = np.abs(out - init).max(-1) > 0
    ys, xs = np.nonzero(changed)
    assert changed.any() and xs.min() >= 52 and ys.max() < 44
    assert "Inpaint area: Only masked" in image.parameters and "Masked area padding: 8" in image.parameters


@pytest.mark.parametrize("fill,name", [(0, "fill"), (2, "latent noise"), (3, "latent nothing")])
def test_masked_content_modes(tiny_model, fill, name):
    (image,) = run(LoadedModel(tiny_model("sd1"), "cpu"), _request(inpainting_fill=fill))
    assert f"Masked content: {name}" in image.parameters
    assert np.isfinite(image.latent).all()


def test_alpha_masks_invert_and_other_sizes(tiny_model):
    """A mask painted as opaque strokes on a transparent layer is read by its alpha; a mask twice the picture's size
    is resized onto it; invert repaints the other part."""
    model = LoadedModel(tiny_model("sd1"), "cpu")
    grey = box_mask()
    rgba = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    rgba.putalpha(grey)
    a = next(run(model, _request(mask=grey))).image
    b = next(run(model, _request(mask=rgba))).image
    assert a.tobytes() == b.tobytes()
    big = next(run(model, _request(mask=grey.resize((2 * W, 2 * H), Image.Resampling.NEAREST)))).image
    init = np.asarray(init_picture((W, H)), dtype=int)
    assert (np.asarray(big, dtype=int)[:, :30] == init[:, :30]).all()
    inverted = next(run(model, _request(inpainting_mask_invert=True)))
    assert (np.asarray(inverted.image, dtype=int)[20:30, 60:70] == init[20:30, 60:70]).all()
    assert "Mask mode: Inpaint not masked" in inverted.parameters


def test_resize_and_fill_with_a_mask_extends_the_canvas(tiny_model):
    """How A1111 users outpaint: resize mode 2 onto a wider canvas, with a mask over the new edges."""
    wide = 128
    mask = Image.new("L", (W, H), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 8, H), fill=255)
    (image,) = run(LoadedModel(tiny_model("sd1"), "cpu"), _request(mask=mask, width=wide, height=H, resize_mode=2))
    assert image.image.size == (wide, H)


def test_blur_matches_opencv():
    """A1111 blurs with cv2.GaussianBlur; ours is NumPy in float64. cv2's 8-bit path uses fixed-point kernel weights,
    whose rounding adds up over the 47 taps of sigma 9: measured 1 level at sigma 1 and 4, 2 at sigma 9."""
    cv2 = pytest.importorskip("cv2")
    mask = np.asarray(box_mask((20, 5, 40, 50)))
    for sigma in (1, 4, 9):
        k = 2 * int(2.5 * sigma + 0.5) + 1
        ref = cv2.GaussianBlur(cv2.GaussianBlur(mask, (k, 1), sigma), (1, k), sigma)
        ours = np.asarray(masks.gaussian_blur(Image.fromarray(mask), sigma, sigma))
        assert np.abs(ours.astype(int) - ref.astype(int)).max() <= (1 if sigma < 9 else 2), sigma


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd-onnx: error:"), err
    return err[0]


def test_mask_bad_input_is_one_line(tiny_model, tmp_path, capsys):
    folder = str(tiny_model("sd1"))
    init = tmp_path / "init.png"
    init_picture((W, H)).save(init)
    paths = {}
    for name, picture in {"tall": Image.new("L", (64, 96), 255), "empty": Image.new("L", (W, H), 0),
                          "white": Image.new("L", (W, H), 255)}.items():
        paths[name] = tmp_path / f"{name}.png"
        picture.save(paths[name])
    out = tmp_path / "out"
    base = ["img2img", "a cat", "--model", folder, "--init-image", str(init), "--steps", "2", "-o", str(out), "-q"]
    for extra, message in [
        (["--mask", str(paths["tall"])], "have different shapes"),
        (["--mask", str(paths["empty"])], "the mask is empty"),
        (["--mask", str(paths["white"]), "--inpainting-mask-invert"], "the mask is empty"),
        (["--mask", str(tmp_path / "none.png")], "image not found"),
        (["--mask", str(paths["white"]), "--inpainting-mask-weight", "0.5"], "inpainting models"),
        (["--mask", str(paths["white"]), "--resize-mode", "3"], "cannot take a mask"),
        (["--mask", str(paths["white"]), "--mask-blur", "-1"], "mask blur"),
    ]:
        assert main([*base, *extra]) == 2, extra
        assert message in _one_error_line(capsys), extra
    assert not list(out.glob("*.png"))
    with pytest.raises(SystemExit):
        main([*base, "--mask", str(paths["white"]), "--inpainting-fill", "blur"])
    assert main([*base, "--mask", str(paths["white"])]) == 0  # all white: the whole picture is repainted
    assert len(list(out.glob("*.png"))) == 1
