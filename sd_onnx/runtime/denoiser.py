"""The UNet as a denoiser: eps/v prediction behind D(x, sigma), classifier-free guidance, open extra feeds."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from sd_onnx.errors import SdOnnxError, UsageError

Array = NDArray[np.float32]
Model = Callable[[Array, Array], Array]  # raw UNet output (eps or v) for (x_in [B,C,H,W], t [B])


class NonFiniteError(SdOnnxError):
    """A stage produced NaN or infinity (A1111: "A tensor with all NaNs was produced in Unet")."""

    def __init__(self, where: str):
        super().__init__(f"a tensor with NaN or infinite values was produced in the {where}: the model's weights or "
                         "the prompt's emphasis weights are out of range")


def check_finite(x: NDArray, where: str) -> NDArray:
    if not np.isfinite(x).all():
        raise NonFiniteError(where)
    return x


def ldm_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                       num_train_timesteps: int = 1000) -> NDArray[np.float32]:
    """The LDM "linear" (diffusers "scaled_linear") schedule, float64 then float32 as the checkpoints store it."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


class Denoiser:
    """k-diffusion's CompVisDenoiser / CompVisVDenoiser: turns an eps or v UNet into denoised = D(x, sigma)."""

    def __init__(self, model: Model, alphas_cumprod: Sequence[float] | NDArray, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise UsageError(f"prediction type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.model = model
        self.prediction_type = prediction_type
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)  # ascending in t
        self.log_sigmas = np.log(self.sigmas)
        self._last: Callable[[], Array] | None = None
        self.inpaint: tuple[Array, Array] | None = None  # (init latent, nmask: 1 = repaint), A1111's mask blending

    def _keep(self, fresh: Array) -> Array:
        """Inpainting on a normal model: outside the mask the init latent replaces `fresh` (A1111's CFGDenoiser)."""
        init, nmask = self.inpaint
        return init * (1.0 - nmask) + nmask * fresh

    def last_denoised(self) -> Array | None:
        """The clean-latent prediction of the latest UNet call (A1111's `last_latent`): what an interrupted run
        returns and what a live preview shows. Computed on demand, so sampling pays nothing for it."""
        return None if self._last is None else self._last()

    @property
    def sigma_min(self) -> float:
        return float(np.float32(self.sigmas[0]))

    @property
    def sigma_max(self) -> float:
        return float(np.float32(self.sigmas[-1]))

    def sigma_to_t(self, sigma: float | NDArray) -> float | NDArray:
        """Fractional timestep by linear interpolation in log sigma (k-diffusion's DiscreteSchedule)."""
        return np.interp(np.log(sigma), self.log_sigmas, np.arange(len(self.sigmas), dtype=np.float64))

    def t_to_sigma(self, t: float | NDArray) -> float | NDArray:
        return np.exp(np.interp(t, np.arange(len(self.sigmas), dtype=np.float64), self.log_sigmas))

    def _unet(self, x: Array, t: float) -> Array:
        return self.model(x.astype(np.float32), np.full(x.shape[0], t, dtype=np.float32))

    def denoise(self, x: Array, sigma: float, t: float) -> Array:
        """D(x, sigma) with the UNet evaluated at timestep t (sigma_to_t(sigma) unless a sampler quantises it)."""
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        out = self._unet(x * c_in, t)
        if self.prediction_type == "epsilon":
            denoised = x - out * sigma
        else:
            denoised = out * (-sigma * c_in) + x * (c_in * c_in)
        if self.inpaint is not None:  # k-diffusion samplers blend the prediction
            denoised = self._keep(denoised)
        self._last = lambda: denoised
        return denoised

    def __call__(self, x: Array, sigma: float) -> Array:
        return self.denoise(x, sigma, float(self.sigma_to_t(sigma)))

    def alpha_bar(self, t: float) -> float:
        """alphas_cumprod at a (possibly fractional) timestep, log-linear between the training steps."""
        return float(np.exp(np.interp(t, np.arange(len(self.sigmas)), np.log(self.alphas_cumprod))))

    def eps(self, x: Array, t: float) -> Array:
        """The noise prediction for a VP-space latent x at timestep t (what DDIM/PLMS/UniPC step with)."""
        if self.inpaint is not None:  # A1111's timestep samplers blend the input (mask_before_denoising)
            x = self._keep(x)
        out = self._unet(x, t)
        a = self.alpha_bar(t)
        e_t = out if self.prediction_type == "epsilon" else out * math.sqrt(a) + x * math.sqrt(1.0 - a)
        self._last = lambda: ((x - e_t * math.sqrt(1.0 - a)) / math.sqrt(a)).astype(np.float32)
        return e_t



class GuidedUNet:
    """The raw UNet output with classifier-free guidance: uncond and cond in one batch-2B call.

    The feeds stay open: `concat` ([B, C, H, W], e.g. an inpainting model's mask and masked-image latents) is
    joined to the sample on the channel axis, and `extra` feeds ({name: [B, ...]}, e.g. LCM's timestep_cond) are
    passed through, both repeated for the unconditional half."""

    def __init__(self, unet, cond, cfg_scale: float, concat: NDArray | None = None,
                 extra: dict[str, NDArray] | None = None):
        """`unet`: a session, or a LoadedModel whose UNet session is looked up at each call, so that releasing it
        from the model really frees its weights (nothing else holds it)."""
        self._unet, self.cond, self.cfg_scale = unet, cond, cfg_scale
        self.concat, self.extra = concat, extra or {}

    @property
    def unet(self):
        return self._unet if hasattr(self._unet, "run") else self._unet.session("unet")

    def _feeds(self, x: Array, t: Array, ctx: NDArray, copies: int) -> dict[str, NDArray]:
        sample = x if self.concat is None else np.concatenate([x, self.concat.astype(x.dtype)], axis=1)
        tile = (lambda a: a) if copies == 1 else (lambda a: np.concatenate([a] * copies))
        feeds = {"sample": tile(sample), "timestep": tile(t), "encoder_hidden_states": ctx}
        feeds.update({name: tile(value) for name, value in self.extra.items()})
        return feeds

    def prepare(self, batch: int, channels: int, height: int, width: int) -> None:
        """Let a session that compiles for its input shapes (OpenVINO's static UNet) do so now, for the shapes of
        this run's calls, so that its compile counts as loading the UNet rather than as the first step."""
        unet = self.unet
        if hasattr(unet, "prepare"):
            copies = 1 if self.cfg_scale == 1.0 else 2
            x = np.zeros((batch, channels - (0 if self.concat is None else self.concat.shape[1]), height, width),
                         np.float32)
            ctx = np.zeros((batch * copies, *self.cond.cond.shape[1:]), np.float32)
            unet.prepare(self._feeds(x, np.zeros(batch, np.float32), ctx, copies))

    def __call__(self, x: Array, t: Array) -> Array:
        b = x.shape[0]
        if self.cfg_scale == 1.0:
            out = self.unet.run(self._feeds(x, t, np.repeat(self.cond.cond, b, axis=0), 1))[0]
            return check_finite(out, "UNet")
        ctx = np.concatenate([np.repeat(self.cond.uncond, b, axis=0), np.repeat(self.cond.cond, b, axis=0)])
        out = check_finite(self.unet.run(self._feeds(x, t, ctx, 2))[0], "UNet")
        uncond, text = out[:b], out[b:]
        return uncond + self.cfg_scale * (text - uncond)
