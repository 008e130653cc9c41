"""A1111's samplers as short NumPy functions over one denoiser wrapper (k-diffusion sigmas or VP timesteps)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from sd_onnx.errors import UsageError
from sd_onnx.runtime.denoiser import Denoiser

Array = NDArray[np.float32]
NoiseFn = Callable[[], Array]  # a fresh N(0, 1) latent batch per call
Callback = Callable[[int, int], None]  # (step_index, total_steps)
DenoiseFn = Callable[[Array, float], Array]  # denoised = D(x, sigma), e.g. a Denoiser


class NoiseSource(Protocol):
    def first(self) -> Array: ...
    def next(self) -> Array: ...


# --- schedules ---------------------------------------------------------------------------------------------

def append_zero(sigmas: NDArray) -> NDArray[np.float32]:
    return np.append(sigmas, 0.0).astype(np.float32)


def get_sigmas(denoiser: Denoiser, steps: int) -> NDArray[np.float32]:
    """A1111's default ("Automatic") schedule: steps points uniform in t from the last timestep to 0, then 0."""
    t = np.linspace(len(denoiser.sigmas) - 1, 0, steps)
    return append_zero(denoiser.t_to_sigma(t))


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> NDArray[np.float32]:
    """The noise schedule of Karras et al. (2022), then 0."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def get_timesteps(steps: int, num_train_timesteps: int = 1000) -> NDArray[np.int64]:
    """A1111's DDIM/PLMS/UniPC timesteps: range(0, 1000, 1000 // steps) + 1, clipped to 999 (ascending)."""
    return np.clip(np.arange(0, num_train_timesteps, num_train_timesteps // steps) + 1, 0, num_train_timesteps - 1)


# --- k-diffusion samplers (sigma space, x = VP latent * sqrt(sigma^2 + 1)) -----------------------------------

def to_d(x: Array, sigma: float, denoised: Array) -> Array:
    """Converts a denoiser output to a Karras ODE derivative."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """The sigma to step down to and the noise to add back for an ancestral step."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _steps(sigmas: NDArray, callback: Callback | None):
    """Yields (i, sigma, sigma_next) as Python floats and reports progress after each step."""
    total = len(sigmas) - 1
    for i in range(total):
        yield i, float(sigmas[i]), float(sigmas[i + 1])
        if callback is not None:
            callback(i, total)


def sample_euler(model: DenoiseFn, x: Array, sigmas: NDArray, noise: NoiseFn | None = None,
                 callback: Callback | None = None) -> Array:
    """Euler steps of Karras et al. (2022) Algorithm 2 (s_churn = 0, A1111's default)."""
    for _, s, s_next in _steps(sigmas, callback):
        x = x + to_d(x, s, model(x, s)) * (s_next - s)
    return x


def sample_euler_ancestral(model: DenoiseFn, x: Array, sigmas: NDArray, noise: NoiseFn,
                           callback: Callback | None = None, eta: float = 1.0, s_noise: float = 1.0) -> Array:
    """Ancestral sampling with Euler steps."""
    for _, s, s_next in _steps(sigmas, callback):
        denoised = model(x, s)
        sigma_down, sigma_up = get_ancestral_step(s, s_next, eta)
        x = x + to_d(x, s, denoised) * (sigma_down - s)
        if s_next > 0:
            x = x + noise() * (s_noise * sigma_up)
    return x


def sample_heun(model: DenoiseFn, x: Array, sigmas: NDArray, noise: NoiseFn | None = None,
                callback: Callback | None = None) -> Array:
    """Heun steps of Karras et al. (2022) Algorithm 2; Euler for the last step to sigma = 0."""
    for _, s, s_next in _steps(sigmas, callback):
        d = to_d(x, s, model(x, s))
        if s_next == 0:
            x = x + d * (s_next - s)
        else:
            x_2 = x + d * (s_next - s)
            d_2 = to_d(x_2, s_next, model(x_2, s_next))
            x = x + (d + d_2) * ((s_next - s) / 2)
    return x


def sample_dpm_2(model: DenoiseFn, x: Array, sigmas: NDArray, noise: NoiseFn | None = None,
                 callback: Callback | None = None) -> Array:
    """DPM-Solver-2: a midpoint step at the geometric mean of the two sigmas; Euler to sigma = 0."""
    for _, s, s_next in _steps(sigmas, callback):
        d = to_d(x, s, model(x, s))
        if s_next == 0:
            x = x + d * (s_next - s)
        else:
            s_mid = math.exp((math.log(s) + math.log(s_next)) / 2)
            x_2 = x + d * (s_mid - s)
            x = x + to_d(x_2, s_mid, model(x_2, s_mid)) * (s_next - s)
    return x


def linear_multistep_coeff(order: int, t: NDArray, i: int, j: int) -> float:
    """Integral over [t_i, t_i+1] of the Lagrange basis polynomial j (exact Gauss-Legendre, degree < 8)."""
    nodes, weights = np.polynomial.legendre.leggauss(4)
    a, b = float(t[i]), float(t[i + 1])
    tau = (b - a) / 2 * nodes + (a + b) / 2
    prod = np.ones_like(tau)
    for k in range(order):
        if k != j:
            prod *= (tau - float(t[i - k])) / (float(t[i - j]) - float(t[i - k]))
    return float((b - a) / 2 * np.dot(weights, prod))


def sample_lms(model: DenoiseFn, x: Array, sigmas: NDArray, noise: NoiseFn | None = None,
               callback: Callback | None = None, order: int = 4) -> Array:
    """Linear multistep over the last `order` derivatives (k-diffusion's sample_lms)."""
    ds: list[Array] = []
    for i, s, _ in _steps(sigmas, callback):
        ds = [*ds, to_d(x, s, model(x, s))][-order:]
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def sample_dpmpp_2m(model: DenoiseFn, x: Array, sigmas: NDArray, noise: NoiseFn | None = None,
                    callback: Callback | None = None) -> Array:
    """DPM-Solver++(2M) of Lu et al. (2022), first order on the first and last steps."""
    old_denoised = None
    for i, s, s_next in _steps(sigmas, callback):
        denoised = model(x, s)
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s) - math.log(s_next)
            d = denoised
            if old_denoised is not None:
                r = (math.log(float(sigmas[i - 1])) - math.log(s)) / h
                d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
            x = x * (s_next / s) - d * math.expm1(-h)
        old_denoised = denoised
    return x


def sample_dpmpp_sde(model: DenoiseFn, x: Array, sigmas: NDArray, noise: NoiseFn,
                     callback: Callback | None = None, eta: float = 1.0, s_noise: float = 1.0,
                     r: float = 0.5) -> Array:
    """DPM-Solver++ (stochastic), k-diffusion's sample_dpmpp_sde.

    k-diffusion (so A1111) takes the noise of both sub-steps from a Brownian tree over sigma: normalised
    increments over [s_mid, s] and [s_next, s], the second containing the first. Two `noise()` draws give
    the same increments here, so the noise has the tree's joint law but not torchsde's values.
    """
    for _, s, s_next in _steps(sigmas, callback):
        denoised = model(x, s)
        if s_next == 0:
            x = x + to_d(x, s, denoised) * (s_next - s)
            continue
        lam, lam_next = -math.log(s), -math.log(s_next)
        s_mid = math.exp(-(lam + (lam_next - lam) * r))
        z_mid = noise()
        sd, su = get_ancestral_step(s, s_mid, eta)
        x_2 = x * (sd / s) - denoised * math.expm1(lam + math.log(sd)) + z_mid * (s_noise * su)
        denoised_2 = model(x_2, s_mid)
        z_next = (z_mid * math.sqrt(s - s_mid) + noise() * math.sqrt(s_mid - s_next)) / math.sqrt(s - s_next)
        sd, su = get_ancestral_step(s, s_next, eta)
        fac = 1 / (2 * r)
        d = denoised * (1 - fac) + denoised_2 * fac
        x = x * (sd / s) - d * math.expm1(lam + math.log(sd)) + z_next * (s_noise * su)
    return x


class LcmDenoiser:
    """A1111's LCMCompVisDenoiser: 50 distillation timesteps (19, 39, ..., 999) and the LCM boundary condition."""

    def __init__(self, denoiser: Denoiser, original_steps: int = 50) -> None:
        self.denoiser = denoiser
        skip = len(denoiser.sigmas) // original_steps
        self.timesteps = np.arange(original_steps) * skip + skip - 1
        self.log_sigmas = denoiser.log_sigmas[self.timesteps]

    def get_sigmas(self, steps: int) -> NDArray[np.float32]:
        idx = np.linspace(len(self.timesteps) - 1, 0, steps)
        return append_zero(np.exp(np.interp(idx, np.arange(len(self.timesteps)), self.log_sigmas)))

    def __call__(self, x: Array, sigma: float) -> Array:
        t = int(self.timesteps[np.argmin(np.abs(math.log(sigma) - self.log_sigmas))])
        scaled = 10.0 * t  # timestep_scaling of the LCM distillation, sigma_data = 0.5
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
        return self.denoiser.denoise(x, sigma, t) * c_out + x * c_skip


def sample_lcm(model: DenoiseFn, x: Array, sigmas: NDArray, noise: NoiseFn,
               callback: Callback | None = None) -> Array:
    """Latent Consistency Model sampling: jump to the denoised latent, re-noise to the next sigma."""
    for _, s, s_next in _steps(sigmas, callback):
        x = model(x, s)
        if s_next > 0:
            x = x + noise() * s_next
    return x


# --- timestep samplers (VP space, A1111's sd_samplers_timesteps_impl) -------------------------------------

def _alphas(denoiser: Denoiser, timesteps: NDArray) -> tuple[NDArray, NDArray]:
    a = denoiser.alphas_cumprod
    return a[timesteps], a[np.concatenate([[0], timesteps[:-1]])]


def sample_ddim(denoiser: Denoiser, x: Array, timesteps: NDArray, noise: NoiseFn | None = None,
                callback: Callback | None = None, eta: float = 0.0) -> Array:
    """DDIM from timesteps[-1] down to timesteps[0]: len(timesteps) - 1 steps, as A1111 runs it."""
    alphas, alphas_prev = _alphas(denoiser, timesteps)
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    total = len(timesteps) - 1
    for i in range(total):
        k = total - i
        a_t, a_prev, sigma_t = float(alphas[k]), float(alphas_prev[k]), float(sigmas[k])
        e_t = denoiser.eps(x, float(timesteps[k]))
        pred_x0 = (x - e_t * math.sqrt(1 - a_t)) / math.sqrt(a_t)
        x = pred_x0 * math.sqrt(a_prev) + e_t * math.sqrt(1 - a_prev - sigma_t**2)
        if sigma_t > 0 and noise is not None:
            x = x + noise() * sigma_t
        if callback is not None:
            callback(i, total)
    return x


def sample_plms(denoiser: Denoiser, x: Array, timesteps: NDArray, noise: NoiseFn | None = None,
                callback: Callback | None = None) -> Array:
    """Pseudo linear multistep (PLMS): an improved-Euler first step, then Adams-Bashforth of order 2, 3, 4."""
    alphas, alphas_prev = _alphas(denoiser, timesteps)

    def step(x: Array, e_t: Array, k: int) -> Array:
        a_t, a_prev = float(alphas[k]), float(alphas_prev[k])
        pred_x0 = (x - e_t * math.sqrt(1 - a_t)) / math.sqrt(a_t)
        return pred_x0 * math.sqrt(a_prev) + e_t * math.sqrt(1 - a_prev)

    old_eps: list[Array] = []
    total = len(timesteps) - 1
    for i in range(total):
        k = total - i
        e_t = denoiser.eps(x, float(timesteps[k]))
        if not old_eps:
            e_prime = (e_t + denoiser.eps(step(x, e_t, k), float(timesteps[k - 1]))) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = step(x, e_prime, k)
        old_eps = [*old_eps[-2:], e_t]
        if callback is not None:
            callback(i, total)
    return x


def _unipc_bh_coefficients(rks: list[float], hh: float, order: int, variant: str):
    """UniPC's B(h) linear systems: returns (B_h, h_phi_1, rhos for the predictor, rhos for the corrector)."""
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = np.array([[rk ** (i - 1) for rk in rks] for i in range(1, order + 1)])
    rhos_p = [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1])) if order > 2 else []
    rhos_c = [0.5] if order == 1 else list(np.linalg.solve(R, np.array(b)))
    return b_h, h_phi_1, rhos_p, rhos_c


def sample_unipc(denoiser: Denoiser, x: Array, steps: int, noise: NoiseFn | None = None,
                 callback: Callback | None = None, order: int = 3, variant: str = "bh1",
                 start_timestep: float | None = None) -> Array:
    """UniPC multistep (Zhao et al. 2023) as A1111 runs it: data prediction, time-uniform steps from t = 1 to
    1/N (img2img: from `start_timestep`), lower orders at the start and end, no corrector after the last step."""
    if steps < 1:
        return x
    order = min(order, steps)  # A1111 refuses steps < order instead
    # Continuous time t = (timestep + 1) / N, uniform from 1 to 1/N, i.e. timesteps uniform from N - 1 to 0.
    first = len(denoiser.alphas_cumprod) - 1 if start_timestep is None else start_timestep
    model_t = np.linspace(first, 0, steps + 1)
    log_alpha = np.array([0.5 * math.log(denoiser.alpha_bar(t)) for t in model_t])
    alpha, sigma = np.exp(log_alpha), np.sqrt(1 - np.exp(2 * log_alpha))
    lam = log_alpha - np.log(sigma)

    def data_pred(x: Array, k: int) -> Array:
        return (x - denoiser.eps(x, float(model_t[k])) * float(sigma[k])) / float(alpha[k])

    models, ks = [data_pred(x, 0)], [0]
    for k in range(1, steps + 1):
        p = k if k < order else min(order, steps + 1 - k)
        h = float(lam[k] - lam[ks[-1]])
        rks = [float(lam[ks[-(i + 1)]] - lam[ks[-1]]) / h for i in range(1, p)] + [1.0]
        d1s = [(models[-(i + 1)] - models[-1]) / rks[i - 1] for i in range(1, p)]
        b_h, h_phi_1, rhos_p, rhos_c = _unipc_bh_coefficients(rks, -h, p, variant)
        x_ = x * float(sigma[k] / sigma[ks[-1]]) - models[-1] * float(alpha[k] * h_phi_1)
        x = x_ - sum((float(r) * d for r, d in zip(rhos_p, d1s)), np.zeros_like(x)) * float(alpha[k] * b_h)
        if k < steps:  # corrector with the model output at the predicted point, reused as the next history
            model_k = data_pred(x, k)
            corr = sum((float(r) * d for r, d in zip(rhos_c[:-1], d1s)), np.zeros_like(x))
            x = x_ - (corr + (model_k - models[-1]) * float(rhos_c[-1])) * float(alpha[k] * b_h)
            models, ks = [*models, model_k][-order:], [*ks, k][-order:]
        if callback is not None:
            callback(k - 1, steps)
    return x


# --- A1111 names -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    """Where img2img and the hires pass enter the schedule: A1111's `setup_img2img_steps`. The schedule is built
    for `steps` and the last `t_enc + 1` steps run from `latent` noised to that point."""

    latent: Array
    steps: int
    t_enc: int


def img2img_start(latent: Array, steps: int, strength: float, fixed_steps: bool = False) -> Start:
    """A1111's step rule. img2img (fixed_steps False): the schedule of `steps`, int(strength * steps) + 1 of them
    run. The hires pass (A1111 passes its steps, which takes the "fix steps" branch): exactly `steps` run, on a
    schedule stretched to steps / strength."""
    strength = min(strength, 0.999)
    if fixed_steps:
        return Start(latent, int(steps / strength) if strength > 0 else 0, steps - 1)
    return Start(latent, steps, int(strength * steps))


def _k_sampler(func, karras: bool = False, discard_penultimate: bool = False):
    def run(denoiser: Denoiser, noise: NoiseSource, steps: int, callback: Callback | None,
            start: Start | None = None) -> Array:
        n = steps + 1 if discard_penultimate else steps
        if karras:
            sigmas = get_sigmas_karras(n, denoiser.sigma_min, denoiser.sigma_max)
        else:
            sigmas = get_sigmas(denoiser, n)
        if discard_penultimate:
            sigmas = np.append(sigmas[:-2], sigmas[-1:])
        return _k_run(func, denoiser, noise, sigmas, callback, start)
    return run


def _k_run(func, model: DenoiseFn, noise: NoiseSource, sigmas: NDArray, callback: Callback | None,
           start: Start | None) -> Array:
    if start is None:
        return func(model, noise.first() * float(sigmas[0]), sigmas, noise.next, callback)
    sigmas = sigmas[start.steps - start.t_enc - 1:]
    return func(model, start.latent + noise.first() * float(sigmas[0]), sigmas, noise.next, callback)


def _lcm(denoiser: Denoiser, noise: NoiseSource, steps: int, callback: Callback | None,
         start: Start | None = None) -> Array:
    model = LcmDenoiser(denoiser)
    return _k_run(sample_lcm, model, noise, model.get_sigmas(steps), callback, start)


def _timestep_sampler(func, pass_count: bool = False):
    def run(denoiser: Denoiser, noise: NoiseSource, steps: int, callback: Callback | None,
            start: Start | None = None) -> Array:
        n_train = len(denoiser.alphas_cumprod)
        if steps > n_train:
            raise UsageError(f"at most {n_train} steps for this sampler, got {steps}")
        timesteps = get_timesteps(steps, n_train)
        if start is None:
            x, options = noise.first(), {}
        else:  # A1111's CompVisSampler.sample_img2img: noised to timesteps[t_enc], run over timesteps[:t_enc]
            a = float(denoiser.alphas_cumprod[timesteps[start.t_enc]])
            x = start.latent * math.sqrt(a) + noise.first() * math.sqrt(1 - a)
            timesteps = timesteps[:start.t_enc]
            options = {"start_timestep": float(timesteps[-1]) if len(timesteps) else 0.0} if pass_count else {}
        schedule = len(timesteps) if pass_count else timesteps
        return func(denoiser, x, schedule, noise.next, callback, **options)
    return run


_SAMPLERS = {
    "Euler a": _k_sampler(sample_euler_ancestral),
    "Euler": _k_sampler(sample_euler),
    "LMS": _k_sampler(sample_lms),
    "Heun": _k_sampler(sample_heun),
    "DPM2": _k_sampler(sample_dpm_2, discard_penultimate=True),
    "DPM++ 2M": _k_sampler(sample_dpmpp_2m),
    "DPM++ 2M Karras": _k_sampler(sample_dpmpp_2m, karras=True),
    "DPM++ SDE Karras": _k_sampler(sample_dpmpp_sde, karras=True),
    "DDIM": _timestep_sampler(sample_ddim),
    "PLMS": _timestep_sampler(sample_plms),
    "LCM": _lcm,
    "UniPC": _timestep_sampler(sample_unipc, pass_count=True),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(_SAMPLERS)


def sample(name: str, denoiser: Denoiser, noise: NoiseSource, steps: int,
           callback: Callback | None = None, start: Start | None = None) -> Array:
    """Runs the A1111 sampler `name` for `steps` steps from noise.first(), or (img2img, hires) from `start`;
    returns the final (unscaled) latent."""
    run = _SAMPLERS.get(name)
    if run is None:
        raise UsageError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLER_NAMES)}")
    if start is not None:
        steps = start.steps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise UsageError(f"steps must be a positive integer, got {steps!r}")
    return np.asarray(run(denoiser, noise, int(steps), callback, start), dtype=np.float32)
