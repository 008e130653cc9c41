"""Upscaler models (ESRGAN family, exported by `sd-onnx export-upscaler`): found by name under
$SD_ONNX_HOME/upscalers, run over overlapping tiles that are blended, so memory is bounded by the tile size."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from sd_onnx.errors import ModelFolderError, UsageError
from sd_onnx.home import upscalers_dir

METADATA = "upscaler.json"
MODEL = "model.onnx"
# A1111's defaults for ESRGAN-family models (Settings > Upscaling: "Tile size", "Tile overlap"), in input pixels.
DEFAULT_TILE = 192
DEFAULT_OVERLAP = 8


def installed_upscalers(root: Path | None = None) -> list[str]:
    """Names of the complete upscaler folders (model.onnx and upscaler.json) under upscalers_dir()."""
    root = upscalers_dir() if root is None else root
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / MODEL).is_file() and (p / METADATA).is_file())


def find_upscaler(name: str | Path) -> Path:
    """An upscaler folder from a path or a name under upscalers_dir()."""
    path = Path(name).expanduser()
    if not (path / METADATA).is_file():
        path = upscalers_dir() / str(name)
    if not (path / METADATA).is_file() or not (path / MODEL).is_file():
        found = ", ".join(installed_upscalers()) or "none"
        raise ModelFolderError(f"upscaler '{name}' not found in {upscalers_dir()} (installed: {found}); "
                               "add one with `sd-onnx export-upscaler FILE.pth`")
    return path


def read_upscaler_info(folder: Path) -> dict:
    try:
        info = json.loads((folder / METADATA).read_text())
        int(info["scale"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFolderError(f"{folder / METADATA}: unreadable ({type(e).__name__}: {e})") from None
    return info


@dataclass(frozen=True)
class SizeRule:
    """What the graph accepts: sides padded up to a multiple (SwinIR's window) and a minimum, then cropped back."""

    multiple_of: int = 1
    minimum: int = 1

    def padded(self, n: int) -> int:
        return max(self.minimum, math.ceil(n / self.multiple_of) * self.multiple_of)


def pad_image(x: NDArray, height: int, width: int) -> NDArray:
    """[C,h,w] padded at the bottom and right to [C,height,width]: reflected as far as it can be, then the edge
    repeated (spandrel's pad_tensor, so the padded model sees what its own torch call would see)."""
    _, h, w = x.shape
    ph, pw = height - h, width - w
    if ph <= 0 and pw <= 0:
        return x
    rh, rw = min(ph, h - 1), min(pw, w - 1)
    x = np.pad(x, ((0, 0), (0, rh), (0, rw)), mode="reflect")
    if ph - rh or pw - rw:
        x = np.pad(x, ((0, 0), (0, ph - rh), (0, pw - rw)), mode="edge")
    return x


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` px covering `n` px, neighbours overlapping by at least `overlap`, spread
    evenly as A1111's split_grid spreads them."""
    if tile <= 0 or n <= tile:
        return [0]
    count = math.ceil((n - overlap) / (tile - overlap))
    count = max(count, 2)
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def blend_weights(starts: list[int], n: int, tile: int, overlap: int, scale: int) -> list[NDArray[np.float32]]:
    """One weight vector per tile along one axis, in output pixels; at every output pixel they sum to 1.

    Where two tiles overlap, the first `margin` = overlap // 4 input pixels next to each tile's inner edge get
    weight 0 (the pixels a tile computes worst: its zero padding is nearest), and the weight moves linearly from
    one tile to the other across the rest. A model whose receptive field reaches no further than `margin` pixels is
    thus reproduced exactly; beyond that the seams are feathered (A1111 feathers across the whole overlap)."""
    size = min(tile, n) if tile > 0 else n
    weights = []
    margin = overlap // 4
    for i, s in enumerate(starts):
        w = np.ones(size * scale, np.float32)
        pos = np.arange(size * scale, dtype=np.float64) / scale + s + 0.5 / scale  # input coords of output px centres
        if i > 0:  # overlap with the previous tile: [starts[i], end of previous)
            lo, hi = s + margin, starts[i - 1] + size - margin
            w *= np.clip((pos - lo) / max(hi - lo, 1e-9), 0, 1) if hi > lo else (pos >= (lo + hi) / 2)
        if i + 1 < len(starts):
            lo, hi = starts[i + 1] + margin, s + size - margin
            w *= np.clip((hi - pos) / max(hi - lo, 1e-9), 0, 1) if hi > lo else (pos < (lo + hi) / 2)
        weights.append(w.astype(np.float32))
    return weights


Runner = Callable[[NDArray[np.float32]], NDArray[np.float32]]


def upscale_tiled(run: Runner, x: NDArray[np.float32], scale: int, tile: int = DEFAULT_TILE,
                  overlap: int = DEFAULT_OVERLAP, rule: SizeRule = SizeRule(),
                  progress: Callable[[int, int], None] | None = None) -> NDArray[np.float32]:
    """[C,h,w] in [0,1] -> [C',h*scale,w*scale] through `run` ([1,C,H,W] -> [1,C',H*s,W*s]), in tiles of at most
    `tile` px (0: the whole image at once), each padded to what the graph accepts and cropped back."""
    if tile and overlap * 2 >= tile:
        raise UsageError(f"tile overlap {overlap} must be less than half the tile size {tile}")
    _, h, w = x.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    wy, wx = blend_weights(ys, h, tile, overlap, scale), blend_weights(xs, w, tile, overlap, scale)
    th, tw = (min(tile, h), min(tile, w)) if tile else (h, w)
    out = None
    done, total = 0, len(ys) * len(xs)
    for y, row_w in zip(ys, wy):
        for x0, col_w in zip(xs, wx):
            patch = x[:, y:y + th, x0:x0 + tw]
            result = run(pad_image(patch, rule.padded(th), rule.padded(tw))[None])[0]
            result = result[:, :th * scale, :tw * scale].astype(np.float32, copy=False)
            if out is None:
                out = np.zeros((result.shape[0], h * scale, w * scale), np.float32)
            out[:, y * scale:(y + th) * scale, x0 * scale:(x0 + tw) * scale] += result * row_w[:, None] * col_w[None, :]
            done += 1
            if progress:
                progress(done, total)
    return out


class UpscalerModel:
    """An exported upscaler, ready to run: `do_upscale(image)` enlarges by the model's own scale."""

    def __init__(self, folder: Path | str, device="auto", threads: int | None = None, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP, low_memory: bool = False):
        from sd_onnx.runtime.providers import Device, resolve_device
        from sd_onnx.runtime.sessions import open_session

        self.folder = find_upscaler(folder)
        self.info = read_upscaler_info(self.folder)
        self.name = self.folder.name
        self.scale = int(self.info["scale"])
        self.rule = SizeRule(int(self.info.get("multiple_of", 1)), int(self.info.get("minimum", 1)))
        if tile < 0 or overlap < 0:
            raise UsageError(f"tile size and overlap must be 0 or more, got {tile} and {overlap}")
        self.tile, self.overlap = tile, overlap
        self.device = device if isinstance(device, Device) else resolve_device(device)
        # open_session finds <folder>/<component>/model.onnx: the upscaler's folder is the component
        self._session = open_session(self.folder.parent, self.folder.name, self.device, threads, low_memory)
        self._input = next(iter(self._session.input_types))

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        return self._session.run({self._input: batch})[0]

    def upscale_array(self, x: NDArray[np.float32], progress=None) -> NDArray[np.float32]:
        """[3,h,w] RGB in [0,1] -> [3,h*scale,w*scale], unclamped."""
        return upscale_tiled(self.run, x, self.scale, self.tile, self.overlap, self.rule, progress)

    def do_upscale(self, image: Image.Image, scale: float | None = None) -> Image.Image:
        """One pass of the model (A1111's do_upscale: the model's native scale, whatever `scale` asks)."""
        x = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
        y = self.upscale_array(x)
        # as A1111's torch_bgr_to_pil_image: clamp, scale, round
        return Image.fromarray(np.rint(np.clip(y, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0), "RGB")
