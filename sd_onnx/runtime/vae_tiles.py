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
    _, _, h, w = latent.shape
    if h <= tile and w <= tile:
        return decode(latent)
    out = None
    weight = np.zeros((1, 1, h * SCALE, w * SCALE), dtype=np.float32)
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    for y in ys:
        for x in xs:
            th, tw = min(tile, h), min(tile, w)
            piece = decode(np.ascontiguousarray(latent[:, :, y:y + th, x:x + tw]))
            if out is None:
                out = np.zeros((1, piece.shape[1], h * SCALE, w * SCALE), dtype=np.float32)
            wy = _ramp(th * SCALE, overlap * SCALE, y == ys[0], y == ys[-1])
            wx = _ramp(tw * SCALE, overlap * SCALE, x == xs[0], x == xs[-1])
            mask = wy[:, None] * wx[None, :]
            out[:, :, y * SCALE:(y + th) * SCALE, x * SCALE:(x + tw) * SCALE] += piece * mask
            weight[:, :, y * SCALE:(y + th) * SCALE, x * SCALE:(x + tw) * SCALE] += mask
    return out / weight
