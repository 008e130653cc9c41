"""Seeded latent noise reproducing A1111's sources: torch's CPU randn (mt19937) and its Philox "GPU" imitation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from sd_onnx.errors import UsageError

_U32 = 0xFFFFFFFF
_TWO_PI_F32 = np.float32(2.0 * math.pi)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise UsageError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _numel(shape: Sequence[int]) -> int:
    if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        raise UsageError(f"noise shape must be non-negative integers, got {tuple(shape)!r}")
    return math.prod(int(d) for d in shape)


def _mt19937_key(seed: int) -> NDArray[np.uint32]:
    """init_genrand of MT19937, as torch's at::mt19937 does with the low 32 bits of the seed."""
    key = [seed & _U32]
    for j in range(1, 624):
        key.append((1812433253 * (key[-1] ^ (key[-1] >> 30)) + j) & _U32)
    return np.array(key, dtype=np.uint32)


def _box_muller_16(u: NDArray[np.float32]) -> NDArray[np.float32]:
    """torch's normal_fill_16 over rows of 16 uniforms: cos from the first 8, sin from the last 8."""
    u1 = (np.float32(1.0) - u[:, :8]).astype(np.float64)  # exact: u is k / 2**24
    theta = (_TWO_PI_F32 * u[:, 8:]).astype(np.float64)  # rounded to float32 as the AVX2 kernel does
    radius = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).astype(np.float32)


class TorchCpuRandn:
    """`torch.manual_seed(seed)` then successive `torch.randn(shape)` calls on the CPU, float32, in NumPy."""

    def __init__(self, seed: int) -> None:
        self.seed = _check_seed(seed)
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": _mt19937_key(self.seed), "pos": 624}}
        self._cached_normal: float | None = None  # torch keeps the sin half of the scalar Box-Muller pair

    def _u32(self, n: int) -> NDArray[np.uint64]:
        return self._bits.random_raw(n)

    def _uniform_f32(self, n: int) -> NDArray[np.float32]:
        return ((self._u32(n) & 0xFFFFFF).astype(np.float64) / 2.0**24).astype(np.float32)

    def _scalar_normal(self) -> float:
        """at::normal_distribution<double>: one value per call, the second of each pair cached."""
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        r = [int(v) for v in self._u32(4)]  # random64() = first draw << 32 | second draw
        u1, u2 = (((hi << 32 | lo) & (2**53 - 1)) / 2.0**53 for hi, lo in ((r[0], r[1]), (r[2], r[3])))
        radius, theta = math.sqrt(-2.0 * math.log1p(-u2)), 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def randn(self, shape: Sequence[int]) -> NDArray[np.float32]:
        n = _numel(shape)
        if n < 16:  # torch's serial path for small tensors
            return np.array([self._scalar_normal() for _ in range(n)], dtype=np.float32).reshape(shape)
        u = self._uniform_f32(n)
        out = np.empty(n, dtype=np.float32)
        full = n - n % 16
        out[:full] = _box_muller_16(u[:full].reshape(-1, 16)).reshape(-1)
        if n % 16:  # torch draws 16 fresh uniforms and overwrites the last 16 values
            out[n - 16:] = _box_muller_16(self._uniform_f32(16).reshape(1, 16)).reshape(-1)
        return out.reshape(shape)


_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def philox4x32_10(counter: NDArray[np.uint32], key: tuple[int, int]) -> NDArray[np.uint32]:
    """The Philox4x32-10 block function of Salmon et al. (2011) over columns of a [4, N] counter array."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = key
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + _PHILOX_W[0]) & _U32, (k1 + _PHILOX_W[1]) & _U32
        p0, p1 = c0 * np.uint64(_PHILOX_M[0]), c2 * np.uint64(_PHILOX_M[1])
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & np.uint64(_U32), \
            (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & np.uint64(_U32)
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


# A1111's rng_philox rounds its constants to float32 but does the arithmetic in float64.
_INV_2_32 = float(np.float32(2.3283064e-10))
_INV_2_32_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


class PhiloxRandn:
    """A1111's "NV" noise source (rng_philox.py): CUDA's torch.randn imitated on the CPU.

    Each `randn` call uses Philox4x32-10 with key = seed and counter = (call index, 0, element index, 0),
    and keeps the cosine half of one Box-Muller pair per element.
    """

    def __init__(self, seed: int) -> None:
        self.seed = _check_seed(seed)
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> NDArray[np.float32]:
        n = _numel(shape)
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset & _U32
        counter[2] = np.arange(n, dtype=np.uint64).astype(np.uint32)
        self.offset += 1
        bits = philox4x32_10(counter, (self.seed & _U32, self.seed >> 32)).astype(np.float64)
        u = bits[0] * _INV_2_32 + _INV_2_32 / 2
        v = bits[1] * _INV_2_32_2PI + _INV_2_32_2PI / 2
        return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(shape)


_SOURCES = {"cpu": TorchCpuRandn, "gpu": PhiloxRandn, "nv": PhiloxRandn}


class ImageRng:
    """A1111's ImageRNG: one generator per image seed, so a batch gives the same images as single runs.

    `first()` is the initial latent noise [B, *shape]; `next()` the further noise ancestral and SDE samplers
    draw, each image from its own generator. With `eta_noise_seed_delta` (A1111's ENSD) the generators are
    re-seeded with seed + delta after `first()`.
    """

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], source: str = "cpu",
                 eta_noise_seed_delta: int = 0) -> None:
        if source not in _SOURCES:
            raise UsageError(f"unknown noise source {source!r}; choose 'cpu' or 'gpu'")
        if not seeds:
            raise UsageError("at least one seed is needed")
        self.seeds = [_check_seed(s) for s in seeds]
        self.shape = tuple(shape)
        _numel(self.shape)
        self.source = source
        self.eta_noise_seed_delta = int(eta_noise_seed_delta)
        self._generators: list[TorchCpuRandn | PhiloxRandn] | None = None

    def _draw(self) -> NDArray[np.float32]:
        assert self._generators is not None
        return np.stack([g.randn(self.shape) for g in self._generators])

    def first(self) -> NDArray[np.float32]:
        make = _SOURCES[self.source]
        self._generators = [make(s) for s in self.seeds]
        noise = self._draw()
        if self.eta_noise_seed_delta:
            self._generators = [make(_check_seed(s + self.eta_noise_seed_delta)) for s in self.seeds]
        return noise

    def next(self) -> NDArray[np.float32]:
        return self.first() if self._generators is None else self._draw()
