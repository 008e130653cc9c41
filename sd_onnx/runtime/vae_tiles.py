"""VAE decoding in overlapping tiles, for images whose full-size decode would not fit in memory (--low-memory).

The decoder's activations grow with the image (at 1024x1024 one 128-channel tensor is 512 MB and its mid-block
attention over 16384 positions needs a 1 GB score matrix); tiles of TILE latent pixels keep every call at the
512x512 cost. Tiles overlap by OVERLAP latent pixels and are blended with linear ramps, so no seams show; the
mid-block attention then sees one tile at a time, which moves pixels slightly (as A1111's tiled-VAE extensions do).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.typing import NDArray

TILE = 64
OVERLAP = 16
SCALE = 8  # pixels per latent pixel


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> NDArray:
    w = np.ones(length, dtype=np.float32)
    ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
    if not at_start:
        w[:overlap] = ramp
    if not at_end:
        w[-overlap:] = ramp[::-1]
    return w


def decode_tiled(decode: Callable[[NDArray], NDArray], latent: NDArray, tile: int = TILE,
                 overlap: int = OVERLAP) -> NDArray:
    """decode([1,4,h,w]) -> [1,3,8h,8w], applied tile by tile; a latent that fits in one tile is decoded whole."""
    return _tiled(decode, latent, tile, overlap, lambda n: n * SCALE)


def encode_tiled(encode: Callable[[NDArray], NDArray], pixels: NDArray, tile: int = TILE * SCALE,
                 overlap: int = OVERLAP * SCALE) -> NDArray:
    """encode([1,3,H,W]) -> [1,C,H/8,W/8] tile by tile (tiles and overlaps in pixels, multiples of 8)."""
    return _tiled(encode, pixels, tile, overlap, lambda n: n // SCALE)


def _tiled(run: Callable[[NDArray], NDArray], x: NDArray, tile: int, overlap: int,
           out: Callable[[int], int]) -> NDArray:
    """run() over overlapping tiles of x's last two axes, blended with linear ramps; `out` maps an input length
    to the output's."""
    _, _, h, w = x.shape
    if h <= tile and w <= tile:
        return run(x)
    result = None
    weight = np.zeros((1, 1, out(h), out(w)), dtype=np.float32)
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    for y in ys:
        for x0 in xs:
            th, tw = min(tile, h), min(tile, w)
            piece = run(np.ascontiguousarray(x[:, :, y:y + th, x0:x0 + tw]))
            if result is None:
                result = np.zeros((1, piece.shape[1], out(h), out(w)), dtype=np.float32)
            wy = _ramp(out(th), out(overlap), y == ys[0], y == ys[-1])
            wx = _ramp(out(tw), out(overlap), x0 == xs[0], x0 == xs[-1])
            mask = wy[:, None] * wx[None, :]
            region = (slice(None), slice(None), slice(out(y), out(y + th)), slice(out(x0), out(x0 + tw)))
            result[region] += piece * mask
            weight[region] += mask
    return result / weight
