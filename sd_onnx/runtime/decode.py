"""The VAE: latents to pictures and pictures to latents, each owning the folder's latent scaling; tiles when asked."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from sd_onnx.runtime.denoiser import check_finite
from sd_onnx.runtime.vae_tiles import decode_tiled, encode_tiled


def to_images(decoded: NDArray) -> list[Image.Image]:
    """VAE output [B,3,H,W] in [-1, 1] -> RGB images (rounded, as diffusers' numpy_to_pil does)."""
    x = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return [Image.fromarray((img * 255).round().astype(np.uint8)) for img in x]


def from_image(image: Image.Image) -> NDArray[np.float32]:
    """An RGB picture -> [1,3,H,W] in [-1, 1], as A1111 feeds the VAE (x / 255 * 2 - 1)."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return (x * 2.0 - 1.0).transpose(2, 0, 1)[None].copy()


def decode(model, latents: NDArray) -> list[Image.Image]:
    """Scaled latents [B,4,h,w] -> pictures, one at a time (the VAE's activations dominate memory at 512px and up);
    in tiles when the model runs with low_memory. The decoder stays open: the caller releases it."""
    session = model.session("vae_decoder")
    run = lambda t: session.run({"latent_sample": t})[0]  # noqa: E731
    pictures = []
    for latent in latents:
        z = latent[None] / np.float32(_scaling(model, "vae_decoder"))
        decoded = decode_tiled(run, z) if model.low_memory else run(z)
        pictures.extend(to_images(check_finite(decoded, "VAE decoder")))
    return pictures


def encode(model, pictures: list[Image.Image]) -> NDArray[np.float32]:
    """Pictures (each a multiple of 8 on both sides) -> scaled latents [B,4,h,w].

    The posterior's mean, not a sample of it: our export's encoder returns the mean, so the seed alone decides the
    noise (A1111 samples the posterior with the global torch generator; the two differ by at most the posterior's
    small standard deviation). An optimum folder's `latent_parameters` (mean and log-variance) is cut to the mean.
    """
    return np.concatenate([encode_pixels(model, from_image(picture)) for picture in pictures])


def encode_pixels(model, x: NDArray) -> NDArray[np.float32]:
    """[1,3,H,W] in [-1, 1] -> the scaled posterior mean [1,C,H/8,W/8] (see encode)."""
    session = model.session("vae_encoder")
    channels = model.latent_channels
    run = lambda t: session.run({"sample": t})[0][:, :channels]  # noqa: E731  (mean of mean + log-variance)
    moments = encode_tiled(run, x) if model.low_memory else run(x)
    return (check_finite(moments, "VAE encoder") * np.float32(_scaling(model, "vae_encoder"))).astype(np.float32)


def _scaling(model, component: str) -> float:
    """Each decoder owns its latent scaling: the full VAE's from its config, TAESD's 1.0 (model.vae_scaling)."""
    scaling = getattr(model, "vae_scaling", None)
    return scaling(component) if scaling is not None else model.scaling_factor


# A1111's "Approximate cheap" preview (sd_vae_approx.cheap_approximation): SD 1.x/2.x latent channels -> RGB in [-1, 1]
CHEAP_FACTORS = np.array([[0.298, 0.207, 0.208],
                          [0.187, 0.286, 0.173],
                          [-0.158, 0.189, 0.264],
                          [-0.184, -0.271, -0.473]], dtype=np.float32)


def preview(model, latent: NDArray) -> Image.Image:
    """A live preview of one latent [4,h,w] (the sampler's scale): TAESD's full-size picture when the run uses TAESD
    or one is installed (A1111's "TAESD" live preview; its decoder stays open until the model releases it), else
    A1111's cheap linear approximation at latent size."""
    if getattr(model, "preview_vae", None) is not None:
        session = model.session("vae_preview")
        decoded = session.run({"latent_sample": latent[None].astype(np.float32) / np.float32(
            model.vae_scaling("vae_preview"))})[0]
        return to_images(decoded)[0]
    rgb = np.einsum("lhw,lr->hwr", latent[:4].astype(np.float32), CHEAP_FACTORS)
    return Image.fromarray((np.clip((rgb + 1) / 2, 0, 1) * 255).round().astype(np.uint8), "RGB")

