"""`export --merge-lora FILE:WEIGHT`: LoRAs folded into the UNet and text encoder weights in torch, before ONNX export.

Reading a file, matching its keys to layers and computing each delta are the runtime's (sd_onnx.runtime.networks,
NumPy only): a LoRA merged here and the same LoRA applied at generate time with `<lora:NAME:WEIGHT>` go through one
key table and one delta per network kind; only where the weight lives differs (a torch module here, an ONNX
initializer there)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sd_onnx.errors import UsageError
from sd_onnx.export.weight_map import _digest
from sd_onnx.runtime.networks import LORA_SUFFIXES, Network, NetworkError, layer_deltas, layer_index, load_network

COMPONENTS = ("unet", "text_encoder")


@dataclass
class MergeLora:
    """One --merge-lora: the file, its weight, and the network read from it."""

    path: Path
    weight: float
    network: Network


def parse_merge_spec(text: str) -> tuple[Path, float]:
    """`FILE:WEIGHT` (or `FILE`, weight 1) -> (path, weight); one line for a bad weight or a missing file."""
    path_text, sep, tail = text.rpartition(":")
    if not sep or not path_text or ("/" in tail or "\\" in tail) or Path(text).is_file():
        path_text, tail = text, ""  # no weight given (a Windows drive letter's colon is not a weight either)
    weight = 1.0
    if tail:
        try:
            weight = float(tail)
        except ValueError:
            raise UsageError(f"--merge-lora {text}: weight {tail!r} is not a number (write FILE:WEIGHT, "
                             "e.g. lcm-lora.safetensors:1.0)") from None
        if not math.isfinite(weight):
            raise UsageError(f"--merge-lora {text}: weight must be finite")
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"--merge-lora: LoRA file not found: {path}")
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise UsageError(f"--merge-lora: {path.name} is not a .safetensors file (LoRAs are read as safetensors only; "
                         "nothing in a pickle is run)")
    return path, weight


def read_merge_loras(specs: list[str]) -> list[MergeLora]:
    """Every --merge-lora parsed and its file read (before the checkpoint: a bad LoRA fails in a second)."""
    out = []
    for spec in specs:
        path, weight = parse_merge_spec(spec)
        out.append(MergeLora(path, weight, load_network(path.stem, path)))
    return out


def merge_loras(modules: dict[str, torch.nn.Module], merges: list[MergeLora], ldm_names: dict[str, str],
                model_name: str) -> list[dict]:
    """W += weight * delta for every layer each LoRA names, in `modules` ({"unet": ..., "text_encoder": ...}).

    `ldm_names` (digest -> LDM key of the checkpoint's unmerged weights, see weight_map.ldm_fingerprints) lets files
    that name layers by LDM key match, as at run time; the merged weights' digests are added to it so the
    weights.json written after the merge still records each layer's LDM key (run-time LoRAs on top keep working).
    Returns what sd_onnx.json records of each LoRA."""
    for merge in merges:
        components = {comp for comp, _ in merge.network.modules}
        if not components & set(COMPONENTS):
            raise NetworkError(f"--merge-lora {merge.path.name}: holds no UNet or text-encoder layers")
    touched: dict[int, dict[str, int]] = {i: {} for i in range(len(merges))}
    for component in COMPONENTS:
        module = modules.get(component)
        if module is None:
            continue
        layers = {name: sub for name, sub in module.named_modules()
                  if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d))}
        ldm_of = {name: ldm_names.get(_digest(sub.weight.detach().float().numpy())) for name, sub in layers.items()}
        index = layer_index(ldm_of)
        shape_of = lambda layer: tuple(layers[layer].weight.shape)  # noqa: E731
        changed: set[str] = set()
        for i, merge in enumerate(merges):  # one file at a time: what each touched goes into the record
            deltas = layer_deltas([(merge.network, merge.weight)], component, index.get, shape_of, model_name)
            if deltas:
                touched[i][component] = len(deltas)
            with torch.no_grad():
                for layer, delta in deltas.items():
                    weight = layers[layer].weight
                    weight.add_(torch.from_numpy(delta).to(weight.dtype))
            changed.update(deltas)
        for layer in sorted(changed):
            if ldm_of.get(layer):
                ldm_names.setdefault(_digest(layers[layer].weight.detach().float().numpy()), ldm_of[layer])
    return [{"name": m.path.stem, "file": m.path.name, "sha256": _sha256(m.path), "lora_hash": m.network.shorthash,
             "weight": m.weight, "layers": touched[i]} for i, m in enumerate(merges)]


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
