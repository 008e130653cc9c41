"""Reading .ckpt / .safetensors files safely: tensors and plain containers only, never code from the file."""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sd_onnx.errors import CheckpointError, first_line


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]
    global_step: int | None


class _LightningCallbackStub:
    """Stands in for pytorch_lightning's ModelCheckpoint, which some SD 1.x .ckpt files pickle beside the weights."""

    def __setstate__(self, state: object) -> None:
        pass


# Globals that real SD checkpoints contain besides tensors; each only rebuilds inert data.
_EXTRA_SAFE_GLOBALS = [
    (_LightningCallbackStub, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]
# torch words a refused global two ways: not allow-listed, or from a blocked module (os, posix, subprocess, ...).
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)")


def load_checkpoint(path: Path) -> Checkpoint:
    """Load an LDM-layout checkpoint; raises CheckpointError with a one-line reason on any bad input."""
    path = Path(path)
    data = read_weights_file(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name}: holds a {type(data).__name__}, not a state dict")
    global_step = data.get("global_step") if isinstance(data.get("global_step"), int) else None
    while isinstance(data.get("state_dict"), dict):  # Lightning wraps the weights; some files wrap twice
        data = data["state_dict"]
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path.name}: contains no tensors")
    return Checkpoint(path=path, state_dict=tensors, global_step=global_step)


def read_weights_file(path: Path) -> object:
    """What a .ckpt/.pth/.safetensors file holds, read without running anything from it (tensors, containers and
    primitives only); the format comes from the first bytes (sniff_format). Shared by checkpoints and upscalers."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"not a checkpoint file: {path}")
    if sniff_format(path) == "safetensors":
        return _load_safetensors(path)
    return _load_pickle_checkpoint(path)


def sniff_format(path: Path) -> str:
    """'zip' (torch.save), 'pickle' (legacy torch.save), 'safetensors' or 'unknown', by the file's first bytes: a
    renamed file keeps its format, not its extension."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path.name}: cannot read it ({e.strerror or e})") from None
    # safetensors: an 8-byte little-endian header length (its first byte may well be 0x80), then the JSON header
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80"):
        return "pickle"
    return "safetensors" if path.suffix.lower() == ".safetensors" else "unknown"


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name}: not a readable .safetensors file ({first_line(e, 200)})") from None


def _load_pickle_checkpoint(path: Path) -> object:
    is_zip = zipfile.is_zipfile(path)
    # torch.load reads a path ending in .safetensors as safetensors: give it a file object then (no mmap)
    by_name = path.suffix.lower() != ".safetensors"
    try:
        with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS), \
                (contextlib.nullcontext(path) if by_name else open(path, "rb")) as source:
            # weights_only=True: torch's restricted unpickler; nothing from the file is executed.
            return torch.load(source, map_location="cpu", weights_only=True, mmap=is_zip and by_name)
    except pickle.UnpicklingError as e:
        refused = _UNSAFE_GLOBAL.search(str(e))
        if refused:
            raise CheckpointError(
                f"{path.name}: refused to load: the pickle asks for '{refused.group(1)}', which is not "
                "a tensor, storage, container or primitive (the file may run code when loaded elsewhere)"
            ) from None
        raise CheckpointError(f"{path.name}: not a readable checkpoint ({_unpickling_reason(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path.name}: truncated or corrupt checkpoint ({first_line(e, 200)})") from None
    except Exception as e:  # noqa: BLE001 -- other bytes (text, garbage) make the unpickler fail in any way
        raise CheckpointError(
            f"{path.name}: not a PyTorch checkpoint, or a corrupt one (unpickling failed: {type(e).__name__} {first_line(e, 200)})"
        ) from None


def _unpickling_reason(e: BaseException) -> str:
    """The specific line of torch's weights-only error, not its generic 'Weights only load failed...' preamble."""
    generic = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler error")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(generic)]
    return specific[0][:200] if specific else first_line(e, 200)


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of the file, A1111's short hash (first 10 hex of sha256) and its legacy 8-hex model hash."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
        # A1111's legacy "model hash": sha256 of 64 KiB at offset 1 MiB, first 8 hex digits.
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    full = sha.hexdigest()
    return {"sha256": full, "short_hash": full[:10], "legacy_hash": legacy}
