"""Each A1111 sampler, model call by model call, against diffusers' scheduler on a fake UNet and shared noise.

Every UNet input depends on all previous steps, so comparing the sequence of UNet inputs (x_in, t) of our
run with that of the reference run checks the trajectory step by step; the final latents are compared too.
Schedulers are configured to the SD 1.5 training schedule and to the spacing that gives A1111's grid:
`linspace` (t = linspace(999, 0, steps)) for the k-diffusion samplers, `leading` + steps_offset 1
(range(0, 1000, 1000 // steps) + 1) for DDIM/PLMS. Tolerance: float32 arithmetic on both sides, latents up to
~50 in sigma space, <= 20 model calls: 1e-5 relative plus 1e-5 absolute for entries near 0 (the runs agree to
~1e-6 on x86-64; float32 rounding alone allows a few 1e-7 per step).
"""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sd_onnx.errors import UsageError
from sd_onnx.runtime import samplers as S
from sd_onnx.runtime.denoiser import Denoiser, ldm_alphas_cumprod
from sd_onnx.runtime.samplers import get_sigmas, get_sigmas_karras, get_timesteps, sample

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
K_SPACING = dict(SD15, timestep_spacing="linspace")
VP_LEADING = dict(SD15, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
TOL = dict(rtol=1e-5, atol=1e-5)
T_TOL = dict(rtol=0, atol=1e-3)  # UNet timesteps (0..999) reach both sides through float32 sigmas
SHAPE = (2, 4, 8, 8)
ALPHAS = EulerDiscreteScheduler(**SD15).alphas_cumprod.numpy()
TRAIN_LOG_SIGMAS = np.log(np.sqrt((1 - ALPHAS.astype(np.float64)) / ALPHAS))
BOTH = pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers vs NumPy 2 array protocols


class FakeUNet:
    """A fixed random channel-mixing map of x plus a pattern scaled by a function of t; logs every call."""

    def __init__(self) -> None:
        rng = np.random.default_rng(1234)
        self.w = (0.8 * np.eye(4) + 0.1 * rng.standard_normal((4, 4))).astype(np.float32)
        self.pattern = (0.1 * rng.standard_normal(SHAPE[1:])).astype(np.float32)
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        x, t = np.asarray(x, dtype=np.float32), np.asarray(t, dtype=np.float32)
        self.calls.append((x.copy(), t.copy()))
        mixed = np.einsum("oc,bchw->bohw", self.w, x)
        return (mixed + np.sin(t / 150)[:, None, None, None] * self.pattern).astype(np.float32)


class FakeNoise:
    """ImageRng-like: a fixed initial noise and a fixed list of further draws."""

    def __init__(self, first: np.ndarray, draws: list[np.ndarray] = ()) -> None:
        self._first, self._draws = first, list(draws)

    def first(self) -> np.ndarray:
        return self._first.copy()

    def next(self) -> np.ndarray:
        return self._draws.pop(0).copy()


def gaussians(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]


def train_t(sigma: float) -> float:
    """Fractional timestep of a sigma by interpolation in log sigma (what A1111 feeds the UNet)."""
    return float(np.interp(np.log(float(sigma)), TRAIN_LOG_SIGMAS, np.arange(1000)))


def run_diffusers(sched, unet: FakeUNet, x0: np.ndarray, t_model=None) -> list[np.ndarray]:
    """The standard diffusers denoising loop; returns the sample after each scheduler step."""
    x, out = torch.from_numpy(x0), []
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        t_in = float(t) if t_model is None else t_model(sched, i)
        model_output = torch.from_numpy(unet(x_in.numpy(), np.full(SHAPE[0], t_in, dtype=np.float32)))
        x = sched.step(model_output, t, x).prev_sample
        out.append(x.numpy())
    return out


def assert_same_run(ours: FakeUNet, ref: FakeUNet, ours_final, ref_final, n_calls=None) -> None:
    ref_calls = ref.calls if n_calls is None else ref.calls[:n_calls]
    assert len(ours.calls) == len(ref_calls)
    for i, ((xa, ta), (xb, tb)) in enumerate(zip(ours.calls, ref_calls)):
        np.testing.assert_allclose(ta, tb, **T_TOL, err_msg=f"UNet timestep of call {i}")
        np.testing.assert_allclose(xa, xb, **TOL, err_msg=f"UNet input of call {i}")
    np.testing.assert_allclose(ours_final, ref_final, **TOL, err_msg="final latent")


def unique_sigmas(sched) -> np.ndarray:
    """Heun/KDPM2/SDE schedulers repeat each sigma for their two stages; undo that."""
    s = sched.sigmas.numpy()
    return np.array([v for i, v in enumerate(s) if i == 0 or v != s[i - 1]], dtype=np.float32)


def denoiser(unet: FakeUNet, prediction_type: str = "epsilon") -> Denoiser:
    return Denoiser(unet, ALPHAS, prediction_type)


@pytest.fixture
def inject_randn(monkeypatch):
    """Replaces diffusers' randn_tensor in a scheduler module with a fixed sequence of draws."""
    def inject(module: str, draws: list[np.ndarray]) -> None:
        queue = list(draws)
        monkeypatch.setattr(f"diffusers.schedulers.{module}.randn_tensor",
                            lambda *a, **k: torch.from_numpy(queue.pop(0)))
    return inject


# --- k-diffusion samplers, through the public entry point where diffusers' grid is A1111's ----------------

@BOTH
def test_euler(prediction_type):
    ours, ref = FakeUNet(), FakeUNet()
    sched = EulerDiscreteScheduler(**K_SPACING, prediction_type=prediction_type)
    sched.set_timesteps(10)  # linspace(999, 0, 10) is integral, so linear (diffusers) = log (A1111) interpolation
    np.testing.assert_allclose(sched.sigmas.numpy(), get_sigmas(denoiser(ours), 10), rtol=1e-6)
    noise = gaussians(1, 0)[0]
    x = sample("Euler", denoiser(ours, prediction_type), FakeNoise(noise), 10)
    xs = run_diffusers(sched, ref, noise * float(sched.init_noise_sigma))  # init_noise_sigma = sigma_max here
    assert_same_run(ours, ref, x, xs[-1])


def test_euler_ancestral(inject_randn):
    ours, ref = FakeUNet(), FakeUNet()
    sched = EulerAncestralDiscreteScheduler(**K_SPACING)
    sched.set_timesteps(10)
    noise, draws = gaussians(1, 1)[0], gaussians(10, 2)
    # k-diffusion skips the draw of the last step (sigma_up = 0 there); diffusers draws and multiplies by 0.
    inject_randn("scheduling_euler_ancestral_discrete", draws)
    x = sample("Euler a", denoiser(ours), FakeNoise(noise, draws[:9]), 10)
    xs = run_diffusers(sched, ref, noise * float(sched.init_noise_sigma))
    assert_same_run(ours, ref, x, xs[-1])


def test_lms():
    pytest.importorskip("scipy")  # diffusers' LMS integrates its coefficients with scipy.integrate.quad
    ours, ref = FakeUNet(), FakeUNet()
    sched = LMSDiscreteScheduler(**K_SPACING)  # step(order=4) by default, as A1111's LMS
    sched.set_timesteps(10)
    noise = gaussians(1, 3)[0]
    x = sample("LMS", denoiser(ours), FakeNoise(noise), 10)
    xs = run_diffusers(sched, ref, noise * float(sched.init_noise_sigma))
    assert_same_run(ours, ref, x, xs[-1])


def test_heun():
    ours, ref = FakeUNet(), FakeUNet()
    sched = HeunDiscreteScheduler(**K_SPACING)
    sched.set_timesteps(10)
    np.testing.assert_allclose(unique_sigmas(sched), get_sigmas(denoiser(ours), 10), rtol=1e-6)
    noise = gaussians(1, 4)[0]
    x = sample("Heun", denoiser(ours), FakeNoise(noise), 10)
    xs = run_diffusers(sched, ref, noise * float(sched.init_noise_sigma))
    assert_same_run(ours, ref, x, xs[-1])


def test_dpm2_integrator():
    """KDPM2 vs sample_dpm_2 on the scheduler's own sigmas (A1111's discard-penultimate schedule for the name
    "DPM2" is checked in test_dpm2_discards_penultimate_sigma)."""
    ours, ref = FakeUNet(), FakeUNet()
    sched = KDPM2DiscreteScheduler(**K_SPACING)
    sched.set_timesteps(10)
    sigmas, noise = unique_sigmas(sched), gaussians(1, 5)[0]
    x = S.sample_dpm_2(denoiser(ours), noise * float(sigmas[0]), sigmas)
    xs = run_diffusers(sched, ref, noise * float(sched.init_noise_sigma))
    assert_same_run(ours, ref, x, xs[-1])


def vp_start(noise: np.ndarray, sigma_max: float) -> np.ndarray:
    """diffusers' VP-space solvers start from unit noise; A1111 starts from noise * sigma_max in sigma space,
    which is noise * sigma_max / sqrt(sigma_max^2 + 1) (= 0.99767 noise) in VP space. We start both there."""
    return (noise * (sigma_max / math.sqrt(sigma_max**2 + 1))).astype(np.float32)


@BOTH
def test_dpmpp_2m(prediction_type):
    ours, ref = FakeUNet(), FakeUNet()
    sched = DPMSolverMultistepScheduler(**SD15, algorithm_type="dpmsolver++", solver_order=2,
                                        final_sigmas_type="zero", prediction_type=prediction_type)
    # diffusers' linspace spacing drops t = 0 and rounds; A1111's grid is linspace(999, 0, 10) then sigma 0.
    sched.set_timesteps(timesteps=[999, 888, 777, 666, 555, 444, 333, 222, 111, 0])
    d = denoiser(ours, prediction_type)
    np.testing.assert_allclose(sched.sigmas.numpy(), get_sigmas(d, 10), rtol=1e-6)
    noise = gaussians(1, 6)[0]
    x = sample("DPM++ 2M", d, FakeNoise(noise), 10)
    xs = run_diffusers(sched, ref, vp_start(noise, d.sigma_max))
    assert_same_run(ours, ref, x, xs[-1])


def test_dpmpp_2m_karras():
    ours, ref = FakeUNet(), FakeUNet()
    sched = DPMSolverMultistepScheduler(**SD15, algorithm_type="dpmsolver++", solver_order=2,
                                        final_sigmas_type="zero", use_karras_sigmas=True)
    sched.set_timesteps(10)
    d = denoiser(ours)
    karras = get_sigmas_karras(10, d.sigma_min, d.sigma_max)
    np.testing.assert_allclose(sched.sigmas.numpy(), karras, rtol=1e-6)
    noise = gaussians(1, 7)[0]
    x = sample("DPM++ 2M Karras", d, FakeNoise(noise), 10)
    # diffusers rounds the Karras timesteps it gives the UNet; A1111 passes the fractional t. Align on the latter.
    xs = run_diffusers(sched, ref, vp_start(noise, d.sigma_max), t_model=lambda s, i: train_t(s.sigmas[i]))
    assert_same_run(ours, ref, x, xs[-1])


class BrownianPath:
    """W(sigma) built lazily from a list of N(0, 1) draws as sigma decreases, W(first sigma) = 0; called as
    k-diffusion calls its BrownianTreeNoiseSampler: (W(sigma_next) - W(sigma)) / sqrt(sigma - sigma_next)."""

    def __init__(self, draws: list[np.ndarray]) -> None:
        self.draws, self.w = list(draws), {}

    def at(self, sigma: float) -> np.ndarray:
        known = [v for v in self.w if math.isclose(v, sigma, rel_tol=1e-5)]  # diffusers recomputes exp(-log s)
        if known:
            return self.w[known[0]]
        if not self.w:
            self.w[sigma] = np.zeros(SHAPE, dtype=np.float64)
        else:
            low = min(self.w)
            assert sigma < low, "this path only grows towards smaller sigmas"
            self.w[sigma] = self.w[low] + math.sqrt(low - sigma) * self.draws.pop(0)
        return self.w[sigma]

    def __call__(self, sigma, sigma_next) -> "torch.Tensor":
        s, s_next = float(sigma), float(sigma_next)
        w = self.at(s)
        return torch.from_numpy(((self.at(s_next) - w) / math.sqrt(s - s_next)).astype(np.float32))


def test_dpmpp_sde_karras():
    """A1111 takes DPM++ SDE noise from torchsde Brownian trees seeded per image; we draw the increments from
    ImageRng.next() with the same joint law (the second sub-step's increment contains the first's). diffusers'
    scheduler gets a Brownian path built from the same draws as its noise sampler, so both see the same noise."""
    pytest.importorskip("torchsde")
    from diffusers import DPMSolverSDEScheduler

    ours, ref = FakeUNet(), FakeUNet()
    sched = DPMSolverSDEScheduler(**K_SPACING, use_karras_sigmas=True)
    sched.set_timesteps(10)
    d = denoiser(ours)
    karras = get_sigmas_karras(10, d.sigma_min, d.sigma_max)
    np.testing.assert_allclose(unique_sigmas(sched), karras, rtol=1e-6)
    noise, draws = gaussians(1, 8)[0], gaussians(18, 9)
    sched.noise_sampler = path = BrownianPath(draws)
    x = sample("DPM++ SDE Karras", d, FakeNoise(noise, draws), 10)
    xs = run_diffusers(sched, ref, noise * float(sched.init_noise_sigma))
    assert_same_run(ours, ref, x, xs[-1])
    assert not path.draws  # two draws for each of the 9 steps that do not end at sigma = 0


# --- timestep samplers ------------------------------------------------------------------------------------

@BOTH
def test_ddim(prediction_type):
    """A1111 runs len(timesteps) - 1 DDIM steps, 901 -> ... -> 1 for 10 steps, and returns the latent at t = 1;
    diffusers takes one more step, 1 -> alphas_cumprod[0]. We compare A1111's 9 steps with diffusers' first 9."""
    ours, ref = FakeUNet(), FakeUNet()
    sched = DDIMScheduler(**VP_LEADING, clip_sample=False, prediction_type=prediction_type)
    sched.set_timesteps(10)
    np.testing.assert_array_equal(sched.timesteps.numpy(), get_timesteps(10)[::-1])
    noise = gaussians(1, 10)[0]
    x = sample("DDIM", denoiser(ours, prediction_type), FakeNoise(noise), 10)
    xs = run_diffusers(sched, ref, noise)  # both start from unit noise in VP space
    assert_same_run(ours, ref, x, xs[8], n_calls=9)


def test_plms():
    """PNDM with skip_prk_steps is A1111's PLMS (improved-Euler first step, then Adams-Bashforth 2-4); as for
    DDIM, A1111 stops at t = 1, one scheduler step before diffusers. Epsilon only: for v-prediction diffusers
    averages raw v outputs and converts once, A1111 converts each output to eps first, so they differ."""
    ours, ref = FakeUNet(), FakeUNet()
    sched = PNDMScheduler(**VP_LEADING, skip_prk_steps=True)
    sched.set_timesteps(10)
    noise = gaussians(1, 11)[0]
    x = sample("PLMS", denoiser(ours), FakeNoise(noise), 10)
    xs = run_diffusers(sched, ref, noise)
    assert_same_run(ours, ref, x, xs[9], n_calls=10)


@BOTH
def test_unipc(prediction_type):
    """A1111's UniPC: bh1, order 3, time-uniform in t = (timestep + 1) / 1000 from 1 to 1/1000, lower order at
    the end, predict x0, stopping at alphas_cumprod[0] (diffusers' final_sigmas_type="sigma_min"). With 9 steps
    the time grid 999, 888, ..., 0 is integral, so diffusers' rounded linspace grid is the same."""
    ours, ref = FakeUNet(), FakeUNet()
    sched = UniPCMultistepScheduler(**K_SPACING, solver_order=3, solver_type="bh1", lower_order_final=True,
                                    predict_x0=True, final_sigmas_type="sigma_min",
                                    prediction_type=prediction_type)
    sched.set_timesteps(9)
    noise = gaussians(1, 12)[0]
    x = S.sample_unipc(denoiser(ours, prediction_type), noise.copy(), 9)
    xs = run_diffusers(sched, ref, noise)
    assert_same_run(ours, ref, x, xs[-1])


def test_lcm(inject_randn):
    """A1111's LCM: 8 steps on the 50 distillation timesteps give t = 999, 859, ..., 19, which we hand to
    diffusers as custom timesteps. A1111 applies c_skip to the sigma-space latent, diffusers to the VP latent;
    c_skip <= 7e-6 on this grid, so the difference (< 1e-7 here) is below float32 resolution of the result."""
    ours, ref = FakeUNet(), FakeUNet()
    d = denoiser(ours)
    lcm = S.LcmDenoiser(d)
    sigmas = lcm.get_sigmas(8)
    timesteps = [int(round(train_t(s))) for s in sigmas[:-1]]
    assert timesteps == [999, 859, 719, 579, 439, 299, 159, 19]
    sched = LCMScheduler(**SD15)
    sched.set_timesteps(timesteps=timesteps)
    noise, draws = gaussians(1, 13)[0], gaussians(7, 14)
    inject_randn("scheduling_lcm", draws)
    x = sample("LCM", d, FakeNoise(noise, draws), 8)
    xs = run_diffusers(sched, ref, vp_start(noise, float(sigmas[0])))
    assert_same_run(ours, ref, x, xs[-1])


# --- schedules and the A1111 name table -------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 7, 20, 30])
def test_get_sigmas_is_k_diffusion_compvis_schedule(steps):
    """k-diffusion's DiscreteSchedule.get_sigmas (CompVisDenoiser), transcribed in torch: t uniform from 999 to 0,
    sigma interpolated linearly in log sigma between training steps, then a final 0."""
    a = torch.from_numpy(ALPHAS)
    log_sigmas = (((1 - a) / a) ** 0.5).log()
    t = torch.linspace(999, 0, steps)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    want = torch.cat([((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp(), torch.zeros(1)])
    d = Denoiser(FakeUNet(), ALPHAS)
    got = get_sigmas(d, steps)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    # and diffusers' sigma -> t inverse (same interpolation) recovers A1111's t grid
    sched = EulerDiscreteScheduler(**SD15)
    sched.set_timesteps(sigmas=got.tolist())
    np.testing.assert_allclose(sched.timesteps.numpy(), np.linspace(999, 0, steps), atol=1e-3)
    np.testing.assert_allclose(d.sigma_to_t(got[:-1].astype(np.float64)), np.linspace(999, 0, steps), atol=1e-3)


def test_karras_uses_model_sigma_range():
    d = Denoiser(FakeUNet(), ALPHAS)
    assert math.isclose(d.sigma_min, 0.0291675, rel_tol=1e-5) and math.isclose(d.sigma_max, 14.6146, rel_tol=1e-5)
    s = get_sigmas_karras(5, d.sigma_min, d.sigma_max)
    assert s[-1] == 0 and math.isclose(s[0], d.sigma_max, rel_tol=1e-6)
    assert math.isclose(s[-2], d.sigma_min, rel_tol=1e-5)


def test_timesteps_quirks_of_a1111():
    np.testing.assert_array_equal(get_timesteps(4), [1, 251, 501, 751])
    assert len(get_timesteps(30)) == 31 and get_timesteps(30)[-1] == 991  # range(0, 1000, 33) + 1
    assert len(get_timesteps(9)) == 10  # so A1111's "UniPC" at 9 steps runs 10 UniPC steps


def test_ldm_alphas_cumprod_matches_diffusers():
    np.testing.assert_allclose(ldm_alphas_cumprod(), ALPHAS, rtol=1e-6)


def test_dpm2_discards_penultimate_sigma():
    d = Denoiser(FakeUNet(), ALPHAS)
    noise = gaussians(1, 15)[0]
    sigmas = get_sigmas(d, 11)
    sigmas = np.append(sigmas[:-2], 0.0).astype(np.float32)
    want = S.sample_dpm_2(d, noise * float(sigmas[0]), sigmas)
    np.testing.assert_array_equal(sample("DPM2", d, FakeNoise(noise), 10), want)


def test_unipc_name_runs_len_of_a1111_timesteps():
    d = Denoiser(FakeUNet(), ALPHAS)
    noise = gaussians(1, 16)[0]
    np.testing.assert_array_equal(sample("UniPC", d, FakeNoise(noise), 9), S.sample_unipc(d, noise.copy(), 10))


@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_every_name_runs_with_image_rng_and_reports_progress(name):
    from sd_onnx.runtime.noise import ImageRng

    seen = []
    rng = ImageRng([1, 2], SHAPE[1:], "cpu")
    d = Denoiser(FakeUNet(), ALPHAS, "v_prediction")
    x = sample(name, d, rng, 4, callback=lambda i, n: seen.append((i, n)))
    assert x.shape == SHAPE and x.dtype == np.float32 and np.isfinite(x).all()
    assert seen and [i for i, _ in seen] == list(range(len(seen))) and {n for _, n in seen} == {len(seen)}


def test_names_are_a1111_ui_names():
    assert S.SAMPLER_NAMES == ("Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM++ 2M", "DPM++ 2M Karras",
                               "DPM++ SDE Karras", "DDIM", "PLMS", "LCM", "UniPC")


def test_unknown_name_lists_valid_names():
    with pytest.raises(UsageError) as err:
        sample("Euler b", Denoiser(FakeUNet(), ALPHAS), FakeNoise(gaussians(1, 0)[0]), 10)
    assert "Euler b" in str(err.value) and all(n in str(err.value) for n in S.SAMPLER_NAMES)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps(steps):
    with pytest.raises(UsageError):
        sample("Euler", Denoiser(FakeUNet(), ALPHAS), FakeNoise(gaussians(1, 0)[0]), steps)


def test_bad_prediction_type():
    with pytest.raises(UsageError):
        Denoiser(FakeUNet(), ALPHAS, "sample")


def test_runtime_modules_do_not_import_torch():
    code = ("import sys, sd_onnx.runtime.samplers, sd_onnx.runtime.noise; "
            "sys.exit(any(m in sys.modules for m in ('torch', 'diffusers', 'transformers', 'scipy')))")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0
