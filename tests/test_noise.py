"""Noise sources against torch's CPU randn, the Philox known answers, and A1111's ImageRNG behaviour."""

import numpy as np
import pytest

from sd_onnx.errors import UsageError
from sd_onnx.runtime.noise import ImageRng, PhiloxRandn, TorchCpuRandn, philox4x32_10

torch = pytest.importorskip("torch")

# torch's AVX2 kernel uses single-precision polynomial log/sin/cos; we compute those in float64 from the
# same float32 inputs, so values agree to ~1 float32 ulp (|x| < 5 -> 4.8e-7). 1e-6 absolute leaves 2 ulp.
ATOL = 1e-6
SEEDS = [0, 1, 12345, 2089545485, 2**32 - 1]
SHAPES = [(4, 64, 64), (4, 65, 63), (1, 4, 8, 8), (3,)]


def _torch_randn(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).numpy() for shape in shapes]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_cpu_randn_first_and_second_call(seed, shape):
    expected = _torch_randn(seed, [shape, shape])
    ours = TorchCpuRandn(seed)
    for want in expected:  # the second call continues the generator's state
        got = ours.randn(shape)
        assert got.dtype == np.float32 and got.shape == shape
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_torch_cpu_randn_mixed_sequence(seed):
    # Small tensors take torch's scalar double path, which caches the second value of each Box-Muller pair
    # in the generator; that cache outlives the call and is skipped over by the vectorised path.
    shapes = [(3,), (4, 8, 8), (5,), (1,), (17,), (15,), (2, 65, 63), (2,)]
    ours = TorchCpuRandn(seed)
    for shape, want in zip(shapes, _torch_randn(seed, shapes)):
        np.testing.assert_allclose(ours.randn(shape), want, rtol=0, atol=ATOL)


def test_torch_cpu_randn_scalar_path_is_exact():
    ours, want = TorchCpuRandn(42).randn((7,)), _torch_randn(42, [(7,)])[0]
    assert np.array_equal(ours, want)


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123 kat_vectors for philox4x32_10 (Salmon et al. 2011)
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_philox_block_known_answers(counter, key, expected):
    out = philox4x32_10(np.array(counter, dtype=np.uint32).reshape(4, 1), key)
    assert tuple(int(v) for v in out[:, 0]) == expected


def test_philox_randn_matches_a1111_published_values():
    """A1111's rng_philox.py docstring: Generator(seed=0).randn((3, 4)), the values CUDA's torch.randn gives.

    Not verified here (no CUDA): that these equal torch.randn on a current GPU, or any value beyond this one
    seed/shape and the first call. Our port follows rng_philox.py's arithmetic (float32 constants, float64
    Box-Muller), which itself reproduces the printed values to ~3 float32 ulp, hence the 3e-7 tolerance.
    """
    expected = np.array([
        [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
        [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
        [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
    ])
    np.testing.assert_allclose(PhiloxRandn(0).randn((3, 4)), expected, rtol=0, atol=3e-7)


def test_philox_randn_properties():
    g = PhiloxRandn(1234)
    a, b = g.randn((4, 64, 64)), g.randn((4, 64, 64))
    assert a.dtype == np.float32 and not np.allclose(a, b)  # each call advances the Philox offset
    np.testing.assert_array_equal(PhiloxRandn(1234).randn((4, 64, 64)), a)  # deterministic
    # The element index is the counter, so a shape is a prefix of any larger draw of the same call.
    np.testing.assert_array_equal(PhiloxRandn(1234).randn((100,)), a.reshape(-1)[:100])
    sample = np.concatenate([a.ravel(), b.ravel()])
    assert abs(sample.mean()) < 0.02 and abs(sample.std() - 1) < 0.02
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.03
    assert not np.allclose(PhiloxRandn(1235).randn((16,)), a.reshape(-1)[:16])


@pytest.mark.parametrize("source", ["cpu", "gpu"])
def test_image_rng_one_generator_per_image(source):
    make = TorchCpuRandn if source == "cpu" else PhiloxRandn
    seeds, shape = [5, 2**32 - 1, 5], (4, 9, 7)
    rng = ImageRng(seeds, shape, source)
    first, nxt, nxt2 = rng.first(), rng.next(), rng.next()
    assert first.shape == (3, *shape) and first.dtype == np.float32
    for i, seed in enumerate(seeds):
        g = make(seed)
        for got in (first, nxt, nxt2):
            np.testing.assert_array_equal(got[i], g.randn(shape))
    np.testing.assert_array_equal(first[0], first[2])  # same seed, same image, whatever the batch


def test_image_rng_matches_torch_generators():
    seeds, shape = [0, 77], (4, 8, 8)
    rng = ImageRng(seeds, shape, "cpu")
    got = [rng.first(), rng.next()]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for batch in got:
        want = np.stack([torch.randn(shape, generator=g).numpy() for g in gens])
        np.testing.assert_allclose(batch, want, rtol=0, atol=ATOL)


def test_image_rng_next_before_first_and_eta_noise_seed_delta():
    shape = (4, 4, 4)
    np.testing.assert_array_equal(ImageRng([3], shape).next(), ImageRng([3], shape).first())
    rng = ImageRng([3], shape, eta_noise_seed_delta=31337)
    np.testing.assert_array_equal(rng.first()[0], TorchCpuRandn(3).randn(shape))
    np.testing.assert_array_equal(rng.next()[0], TorchCpuRandn(3 + 31337).randn(shape))


@pytest.mark.parametrize("kwargs", [
    {"seeds": [1], "shape": (4, 8, 8), "source": "cuda"},
    {"seeds": [-1], "shape": (4, 8, 8)},
    {"seeds": [2**64], "shape": (4, 8, 8)},
    {"seeds": [1.5], "shape": (4, 8, 8)},
    {"seeds": [], "shape": (4, 8, 8)},
    {"seeds": [1], "shape": (4, -8, 8)},
])
def test_image_rng_usage_errors(kwargs):
    with pytest.raises(UsageError):
        ImageRng(**kwargs)
