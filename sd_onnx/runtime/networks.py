"""LoRA at generate time, as A1111's Lora extension: `<lora:NAME:WEIGHT>` tags, files, and W + sum(scale * delta).

As in A1111's `networks.py`/`network_lora.py`, each network kind is one small class that computes a weight delta
from its tensors; the loader only matches keys to layers. Layers are found through the `weights.json` map that export
writes beside each patchable graph (module name or LDM key -> ONNX initializer and its bytes); the patched weights
reach the session as initializer overrides (see sessions.open_session), so nothing is re-exported and torch is never
imported. Files are read with a small safetensors reader of our own (bf16 included, no torch).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from sd_onnx.errors import ModelFolderError, SdOnnxError

MAP_FILE = "weights.json"
LORA_SUFFIXES = (".safetensors",)
# A1111's extra-networks syntax: <kind:arg1:arg2...>; `lora` (and `lyco`, the old LyCORIS extension's name).
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_KINDS = ("lora", "lyco")


class NetworkError(SdOnnxError):
    """A LoRA file or `<lora:...>` tag that cannot be applied (missing, corrupt, unsupported, wrong family)."""


# ---------------------------------------------------------------------------------------------------------------
# Prompt tags


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:NAME:TE[:UNET]>` of a prompt; A1111 defaults te to 1 and unet to te."""

    name: str
    te: float = 1.0
    unet: float = 1.0


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt without its extra-network tags, the LoRA tags in order), as A1111's `parse_prompt`.

    A1111 removes every `<kind:...>` it recognises; named arguments `te=`, `unet=` are accepted as in its
    `extra_networks_lora.py` (positional: name, te multiplier, unet multiplier)."""
    tags: list[LoraTag] = []

    def found(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2).split(":")
        if kind not in _LORA_KINDS:
            return m.group(0)  # hypernetworks and other kinds are not ours: leave the text as written
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        name = positional[0].strip() if positional else ""
        if not name:
            raise NetworkError(f"'{m.group(0)}': no LoRA name (write <lora:NAME:WEIGHT>)")
        te = _multiplier(m.group(0), named.get("te", positional[1] if len(positional) > 1 else "1"))
        unet = _multiplier(m.group(0), named.get("unet", positional[2] if len(positional) > 2 else str(te)))
        tags.append(LoraTag(name, te, unet))
        return ""

    return _EXTRA_NETWORK.sub(found, prompt), tags


def _multiplier(tag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise NetworkError(f"'{tag}': weight {text.strip()!r} is not a number") from None
    if not np.isfinite(value):
        raise NetworkError(f"'{tag}': weight must be finite")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Files


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16,
                       "I64": np.int64, "I32": np.int32}


def read_safetensors(path: Path) -> tuple[dict[str, NDArray], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file, float tensors as float32; bf16 widened without torch."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if not 2 <= n <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
            data = f.read()
    except OSError as e:
        raise NetworkError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise NetworkError(f"{path.name}: not a .safetensors file, or a corrupt one ({e})") from None
    if not isinstance(header, dict):
        raise NetworkError(f"{path.name}: not a .safetensors file, or a corrupt one (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for key, info in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            start, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            if not 0 <= start <= end <= len(data):
                raise ValueError("data past the end of the file (truncated?)")
            array = np.frombuffer(data, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize,
                                  offset=start).reshape(shape)
        except KeyError:
            raise NetworkError(f"{path.name}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}") from None
        except (ValueError, TypeError) as e:
            raise NetworkError(f"{path.name}: corrupt tensor {key!r} ({e})") from None
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[key] = array.astype(np.float32) if array.dtype.kind == "f" else array
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def addnet_hash(path: Path) -> str:
    """A1111's LoRA hash for .safetensors: sha256 of everything after the header (the kohya "addnet" hash)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n + 8)
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def find_network_file(name: str, folder: Path) -> Path:
    """`name` (as typed in the tag: a file stem, or a path relative to the folder) -> its file, else one line with
    the close matches."""
    candidates = {p.relative_to(folder).with_suffix("").as_posix(): p
                  for p in sorted(folder.rglob("*")) if p.suffix.lower() in LORA_SUFFIXES and p.is_file()} \
        if folder.is_dir() else {}
    for key, path in candidates.items():
        if name in (key, path.stem):
            return path
    stems = sorted({p.stem for p in candidates.values()})
    close = difflib.get_close_matches(name, stems, n=3, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else (
        f"; it holds: {', '.join(stems[:8])}" if stems else " (it holds no .safetensors LoRA)")
    raise NetworkError(f"LoRA '{name}' not found in {folder}{hint}")


# ---------------------------------------------------------------------------------------------------------------
# Network kinds: each computes the delta of one layer's weight, in the layer's own (out, in[, kh, kw]) layout.


@dataclass
class LoraModule:
    """LoRA (linear) and LyCORIS LoCon (convolutions): up @ down * alpha / rank (A1111's network_lora)."""

    up: NDArray
    down: NDArray
    alpha: float | None = None

    def delta(self, shape: tuple[int, ...]) -> NDArray:
        rank = self.down.shape[0]
        scale = (self.alpha / rank) if self.alpha is not None else 1.0
        up = self.up.reshape(self.up.shape[0], -1)
        down = self.down.reshape(rank, -1)
        if up.shape[1] != rank:
            raise ValueError(f"up {self.up.shape} and down {self.down.shape} ranks differ")
        if len(shape) == 4 and self.down.ndim == 4 and self.up.ndim == 4 and self.up.shape[2:] != (1, 1):
            raise ValueError("an up-projection with a spatial kernel is not a LoCon layout")
        delta = (up.astype(np.float32) @ down.astype(np.float32)) * np.float32(scale)
        if delta.size != int(np.prod(shape)):
            raise ValueError(f"delta {delta.shape} does not fit the layer's weight {tuple(shape)}")
        return delta.reshape(shape)


# Keys of the kinds we refuse by name rather than misapply (LyCORIS's other algorithms, DoRA, ...).
_UNSUPPORTED = (
    ("hada_w1_a", "LoHa (LyCORIS)"), ("lokr_w1", "LoKr (LyCORIS)"), ("lokr_w2", "LoKr (LyCORIS)"),
    ("on_input", "IA3 (LyCORIS)"), ("oft_blocks", "OFT (LyCORIS)"), ("oft_diag", "OFT (LyCORIS)"),
    ("a1.weight", "GLoRA (LyCORIS)"), ("lora_mid", "LoCon with a CP-decomposed (Tucker) kernel"),
    ("dora_scale", "DoRA"), (".diff", "full weight difference"), ("w_norm", "norm-layer difference"),
)

# (pattern, component, group of the layer name, part); part: "up", "down" or "alpha".
_KEY_LAYOUTS = (
    (re.compile(r"^lora_(unet|te)_(.+)\.(lora_up|lora_down)\.weight$"), None),
    (re.compile(r"^lora_(unet|te)_(.+)\.(alpha)$"), None),
    (re.compile(r"^(unet|text_encoder)\.(.+?)\.(lora_B|lora_A|lora\.up|lora\.down)\.weight$"), None),
    (re.compile(r"^(unet|text_encoder)\.(.+?)\.(alpha)$"), None),
)
_PARTS = {"lora_up": "up", "lora_B": "up", "lora.up": "up", "lora_down": "down", "lora_A": "down",
          "lora.down": "down", "alpha": "alpha"}
_COMPONENTS = {"unet": "unet", "te": "text_encoder", "text_encoder": "text_encoder"}
# A full model's keys (LDM single file, or a diffusers UNet's own state dict): a checkpoint given where a LoRA goes.
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conv_in.", "time_embedding.")
_OTHER_FAMILY = (("lora_te1_", "SDXL"), ("lora_te2_", "SDXL"), ("text_encoder_2.", "SDXL"),
                 ("lora_unet_label_emb", "SDXL"), ("transformer.single_transformer_blocks", "Flux"),
                 ("lora_unet_double_blocks", "Flux"), ("lora_transformer_", "SD3/Flux"))


@dataclass
class Network:
    """One LoRA file: its layers (component, key as written) -> module, and A1111's short hash."""

    name: str
    path: Path
    shorthash: str
    modules: dict[tuple[str, str], LoraModule] = field(default_factory=dict)


def load_network(name: str, path: Path) -> Network:
    tensors, _ = read_safetensors(path)
    if not tensors:
        raise NetworkError(f"{path.name}: holds no tensors")
    if any(key.startswith(_CHECKPOINT_PREFIXES) for key in tensors):
        raise NetworkError(f"{path.name} holds a model's own weights (keys such as "
                           f"{next(k for k in tensors if k.startswith(_CHECKPOINT_PREFIXES))!r}): a checkpoint, "
                           "not a LoRA")
    for key in tensors:
        for marker, family in _OTHER_FAMILY:
            if key.startswith(marker):
                raise NetworkError(f"LoRA '{name}' ({path.name}) is for {family} models (key {key!r}); "
                                   "it does not apply to this model's family")
        for marker, kind in _UNSUPPORTED:
            # a marker with a leading dot names a tensor (`<layer>.diff`): match the key's end only, so that a key
            # like `model.diffusion_model.*` is not taken for a weight difference
            if (key.endswith((marker, marker + "_b")) if marker.startswith(".") else marker in key):
                raise NetworkError(f"LoRA '{name}' ({path.name}) is a {kind} network, which sd-onnx cannot apply "
                                   "yet (LoRA and LoCon are supported)")
    parts: dict[tuple[str, str], dict[str, NDArray]] = {}
    for key, array in tensors.items():
        for pattern, _ in _KEY_LAYOUTS:
            m = pattern.match(key)
            if m:
                component, layer, part = _COMPONENTS[m.group(1)], m.group(2), _PARTS[m.group(3)]
                parts.setdefault((component, layer), {})[part] = array
                break
        else:
            raise NetworkError(f"LoRA '{name}' ({path.name}): key {key!r} is not of a LoRA layout sd-onnx knows "
                               "(kohya lora_unet_*/lora_te_*, diffusers unet.*/text_encoder.*)")
    network = Network(name, path, addnet_hash(path)[:12])
    for layer, p in parts.items():
        if "up" not in p or "down" not in p:
            raise NetworkError(f"LoRA '{name}' ({path.name}): layer {layer[1]!r} lacks its "
                               f"{'up' if 'up' not in p else 'down'} weight (a damaged file?)")
        alpha = float(np.asarray(p["alpha"]).reshape(-1)[0]) if "alpha" in p else None
        network.modules[layer] = LoraModule(p["up"], p["down"], alpha)
    return network


# ---------------------------------------------------------------------------------------------------------------
# The model side: weights.json and the initializers it points at


_LDM_PREFIXES = ("model.diffusion_model.", "cond_stage_model.transformer.", "cond_stage_model.model.",
                 "cond_stage_model.")


def layer_index(layers: dict[str, str | None]) -> dict[str, str]:
    """Every form a LoRA file may name a layer by -> the layer's module name, from {module name: LDM key or None}:
    the module name (diffusers/PEFT files), with `_` for `.` (kohya files of diffusers-era trainers), and the LDM
    key without its component prefix, both ways (kohya files of LDM-era trainers). Export's --merge-lora and the
    runtime's weights.json both match through this one table."""
    index: dict[str, str] = {}
    for name, ldm in layers.items():
        index[name] = name
        index[name.replace(".", "_")] = name
        if ldm:
            for prefix in _LDM_PREFIXES:
                if ldm.startswith(prefix):
                    short = ldm[len(prefix):]
                    index.setdefault(short, name)
                    index.setdefault(short.replace(".", "_"), name)
                    break
    return index


class WeightMap:
    """One component's weights.json: LoRA key forms -> layer entry; reads a layer's weight with NumPy."""

    def __init__(self, folder: Path, component: str):
        self.folder = folder / component
        path = self.folder / MAP_FILE
        if not path.is_file():
            raise ModelFolderError(f"{folder.name} was exported before sd-onnx could apply LoRAs and embeddings "
                                   f"({component}/{MAP_FILE} is missing): export it again with `sd-onnx export`")
        try:
            self.layers: dict[str, dict] = json.loads(path.read_text())["layers"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelFolderError(f"{path}: unreadable ({e}); export the model again") from None
        self.index = layer_index({name: entry.get("ldm") for name, entry in self.layers.items()})

    def lookup(self, key: str) -> str | None:
        return self.index.get(key)

    def read(self, layer: str) -> NDArray[np.float32]:
        """The layer's weight as stored in the graph (transposed for MatMul weights), float32."""
        entry = self.layers[layer]
        if entry["dtype"] != "float32":
            raise ModelFolderError(f"{self.folder}: layer {layer} is stored as {entry['dtype']}; LoRA needs the fp32 "
                                   "model folder")
        try:
            array = np.fromfile(self.folder / entry["file"], dtype=np.float32, count=entry["length"] // 4,
                                offset=entry["offset"])
            return array.reshape(entry["shape"])
        except (OSError, ValueError) as e:
            raise ModelFolderError(f"{self.folder / entry['file']}: cannot read {layer}'s weight ({e}); "
                                   "export the model again") from None


def layer_deltas(uses: list[tuple[Network, float]], component: str, lookup, shape_of, model: str) -> dict[str, NDArray]:
    """layer name -> sum(multiplier * delta) over the networks' layers of `component`, each delta in the layer's own
    (out, in[, kh, kw]) layout. `lookup(key)` names the layer a LoRA key means (None: the model has none),
    `shape_of(layer)` its weight's shape; `model` names the model in errors. Shared by run-time patching (layers
    found through weights.json) and export's --merge-lora (layers of the torch modules)."""
    deltas: dict[str, NDArray] = {}
    for net, mult in uses:
        if mult == 0:
            continue
        for (comp, key), module in net.modules.items():
            if comp != component:
                continue
            layer = lookup(key)
            if layer is None:
                raise NetworkError(f"LoRA '{net.name}' ({net.path.name}) names layer {key!r}, which {model}'s "
                                   f"{component} does not have: a LoRA for another model family?")
            try:
                delta = module.delta(tuple(shape_of(layer)))
            except ValueError as e:
                raise NetworkError(f"LoRA '{net.name}' ({net.path.name}) does not fit {model}'s {component} layer "
                                   f"{layer} ({e}): a LoRA for another model family?") from None
            deltas[layer] = deltas[layer] + mult * delta if layer in deltas else mult * delta
    return deltas


def patched_weights(folder: Path, component: str, uses: list[tuple[Network, float]],
                    weight_map: WeightMap | None = None) -> dict[str, NDArray[np.float32]]:
    """initializer name -> W + sum(multiplier * delta) for every layer the networks touch in `component`."""
    if not any(comp == component and mult != 0 for net, mult in uses for comp, _ in net.modules):
        return {}
    wmap = weight_map or WeightMap(folder, component)

    def shape_of(layer: str) -> tuple:
        entry = wmap.layers[layer]
        if entry.get("shared_with"):
            raise NetworkError(f"{folder.name}: {component} layer {layer} shares its weights with "
                               f"{entry['shared_with'][0]} in the exported graph; it cannot be patched alone")
        return tuple(entry["shape"][::-1] if entry["transposed"] else entry["shape"])

    deltas = layer_deltas(uses, component, wmap.lookup, shape_of, folder.name)
    out = {}
    for layer, delta in deltas.items():
        entry = wmap.layers[layer]
        base = wmap.read(layer)
        out[entry["initializer"]] = base + (delta.T if entry["transposed"] else delta)
    return out


# ---------------------------------------------------------------------------------------------------------------
# What a LoadedModel holds: the active LoRAs and embeddings, and the patched weights of the current set


_FILE_CACHE: dict[tuple[str, int, int], Network] = {}
_FILE_CACHE_SIZE = 16  # parsed LoRA files kept across requests: a changed set re-reads only the new files


def load_network_cached(name: str, path: Path) -> Network:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    network = _FILE_CACHE.pop(key, None) or load_network(name, path)
    network.name = name
    _FILE_CACHE[key] = network  # most recently used last
    while len(_FILE_CACHE) > _FILE_CACHE_SIZE:
        _FILE_CACHE.pop(next(iter(_FILE_CACHE)))
    return network


class ExtraNetworks:
    """The LoRAs (network, te multiplier, unet multiplier) and the token-table rows of textual-inversion vectors
    that sessions of one model open with, and the patched initializers of the current set, computed once per set."""

    def __init__(self) -> None:
        self.uses: list[tuple[Network, float, float]] = []
        self.token_rows: tuple[str, NDArray] | None = None  # (identity of the vectors, [n, D] rows to append)
        self._patched: dict[str, tuple[tuple, dict[str, NDArray]]] = {}

    def key(self, component: str) -> tuple:
        if component == "text_encoder":
            loras = tuple((str(n.path), n.shorthash, te) for n, te, _ in self.uses if te)
            return loras, self.token_rows[0] if self.token_rows is not None else None
        if component == "unet":
            return tuple((str(n.path), n.shorthash, unet) for n, _, unet in self.uses if unet), None
        return (), None

    def activate(self, uses: list[tuple[Network, float, float]], token_rows: tuple[str, NDArray] | None) -> list[str]:
        """Set the next generation's networks; returns the components whose open sessions no longer fit."""
        before = {c: self.key(c) for c in ("text_encoder", "unet")}
        self.uses, self.token_rows = list(uses), token_rows
        return [c for c, k in before.items() if self.key(c) != k]

    def overrides(self, folder: Path, component: str, precision: str) -> dict[str, NDArray]:
        key = self.key(component)
        if key == ((), None):
            return {}
        cached = self._patched.get(component)
        if cached is not None and cached[0] == key:
            return cached[1]
        if precision != "fp32":
            raise NetworkError(f"{folder.name}'s {component} is {precision}: LoRAs and embeddings are applied to the "
                               "fp32 weights only (an int8 layer would need re-quantizing); generate with the fp32 "
                               "model folder")
        self._patched.pop(component, None)  # free the previous set's arrays before computing the new ones
        multiplier = 1 if component == "text_encoder" else 2
        out = patched_weights(folder, component, [(n, (te, unet)[multiplier - 1]) for n, te, unet in self.uses])
        if component == "text_encoder" and self.token_rows is not None:
            wmap = WeightMap(folder, component)
            layer = wmap.lookup(TOKEN_EMBEDDING)
            if layer is None:
                raise ModelFolderError(f"{folder.name}: text_encoder/{MAP_FILE} does not locate the token embedding; "
                                       "export the model again")
            table = wmap.read(layer)
            out[wmap.layers[layer]["initializer"]] = np.concatenate([table, self.token_rows[1]]).astype(np.float32)
        self._patched[component] = (key, out)
        return out

    def forget(self, component: str) -> None:
        """Drop the patched arrays of a released session (the CLI: they would stay beside the next stage)."""
        self._patched.pop(component, None)


TOKEN_EMBEDDING = "text_model.embeddings.token_embedding"


@dataclass
class PromptNetworks:
    """What a generation's prompts ask for: the texts to encode (tags removed), the embeddings the tokenizer may
    expand, and the infotext fields that record the files used (`Lora hashes`, `TI hashes`)."""

    prompt: str
    negative_prompt: str
    embeddings: object | None = None  # embeddings.EmbeddingDatabase
    infotext: dict[str, str] = field(default_factory=dict)


def activate_extra_networks(model, prompt: str, negative_prompt: str) -> PromptNetworks:
    """Read the `<lora:...>` tags (positive prompt, as A1111) and the embeddings a prompt names, and set them on
    `model` (a LoadedModel) for its next sessions. Every named LoRA must load: none is silently left out."""
    from sd_onnx.home import embeddings_dir, loras_dir
    from sd_onnx.runtime import embeddings as ti

    text, tags = extract_lora_tags(prompt)
    folder = Path(model.lora_dir) if model.lora_dir is not None else loras_dir()
    uses, hashes = [], []
    for tag in tags:
        network = load_network_cached(tag.name, find_network_file(tag.name, folder))
        uses.append((network, tag.te, tag.unet))
        alias = tag.name.replace(":", "").replace(",", "")
        if f"{alias}: {network.shorthash}" not in hashes:
            hashes.append(f"{alias}: {network.shorthash}")
    result = PromptNetworks(text, negative_prompt)
    if hashes:
        result.infotext["Lora hashes"] = ", ".join(hashes)
    db = ti.database(Path(model.embeddings_dir) if model.embeddings_dir is not None else embeddings_dir(), model)
    used = db.used_in([text, negative_prompt], model.tokenizer()) if db is not None else []
    if used:
        result.embeddings = db
        result.infotext["TI hashes"] = ", ".join(f"{e.name}: {e.shorthash}" for e in used)
    model.use_extra_networks(uses, db.token_rows() if used else None)
    return result
