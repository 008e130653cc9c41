"""Textual-inversion embeddings as A1111 loads them (`.pt`, `.bin`, `.safetensors`), read without torch.

A prompt word that spells an embedding's file name becomes its vectors (A1111's EmbeddingDatabase matches the
name's token ids). The vectors reach the text encoder as extra rows of its token table: each vector gets an id past
the vocabulary, and the session opens with the grown table as an initializer override (no re-export).
`.pt`/`.bin` files are pickles: a restricted unpickler of our own rebuilds tensors as NumPy arrays from the zip's
storages and refuses every other global, so nothing in the file runs.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from sd_onnx.errors import ModelFolderError
from sd_onnx.runtime.networks import MAP_FILE, TOKEN_EMBEDDING, NetworkError, WeightMap, read_safetensors

SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass
class Embedding:
    name: str
    path: Path
    vectors: NDArray[np.float32]  # [n, D]
    shorthash: str
    ids: list[int] | None = None  # the ids the tokenizer gives its vectors (past the vocabulary)
    error: str | None = None  # a file that failed to load: an error only if a prompt names it


# ---------------------------------------------------------------------------------------------------------------
# torch-free reading of torch.save files

_STORAGE_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
                   "BFloat16Storage": "bf16", "LongStorage": np.int64, "IntStorage": np.int32}


class _Stub:
    """Stands in for torch.nn.ParameterDict / Module objects in an embedding pickle: keeps their state only."""

    def __setstate__(self, state) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {})


def _rebuild_tensor(storage, offset, size, stride, *rest):
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride)).copy()


def _rebuild_parameter(data, *rest):
    return data


def _reconstructor(cls, base, state):
    if cls is not _Stub:
        raise pickle.UnpicklingError("refused object reconstruction")
    return _Stub()


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix

    def find_class(self, module: str, name: str):
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("collections", "OrderedDict"): dict,
            ("copyreg", "_reconstructor"): _reconstructor,
            ("builtins", "object"): object,
            ("builtins", "set"): set, ("__builtin__", "set"): set,  # a Module's state holds a few (hook names)
            ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
            ("torch.nn.modules.container", "ParameterDict"): _Stub,
            ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if module == "torch" and name in ("float32", "float16", "bfloat16"):
            return name
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError("unknown persistent id")
        _, kind, key, _location, _numel = pid[:5]
        dtype = _STORAGE_DTYPES.get(kind) if isinstance(kind, str) else None
        if dtype is None:
            raise pickle.UnpicklingError(f"unsupported storage {kind!r}")
        raw = self._archive.read(f"{self._prefix}data/{key}")
        if dtype == "bf16":
            return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(raw, dtype=dtype)


def read_torch_file(path: Path) -> object:
    """A torch.save zip file's object with tensors as NumPy arrays; legacy (non-zip) pickles are refused."""
    if not zipfile.is_zipfile(path):
        raise NetworkError(f"{path.name}: not a zip-format torch file (a legacy pickle, or corrupt); convert the "
                           "embedding to .safetensors")
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            prefix = pkl[: -len("data.pkl")]
            return _Unpickler(io.BytesIO(archive.read(pkl)), archive, prefix).load()
    except StopIteration:
        raise NetworkError(f"{path.name}: not a torch.save file (no data.pkl)") from None
    except pickle.UnpicklingError as e:
        raise NetworkError(f"{path.name}: refused to load ({e}); only tensors and plain containers are read") from None
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise NetworkError(f"{path.name}: corrupt embedding file ({type(e).__name__}: {e})") from None


def embedding_vectors(data: object, path: Path) -> NDArray[np.float32]:
    """The [n, D] vectors of A1111's layouts: string_to_param (SD1/SD2 .pt), emb_params (.safetensors),
    a one-entry {token: vector} dict (diffusers .bin)."""
    if isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise NetworkError(f"{path.name}: string_to_param must hold one tensor")
        vectors = next(iter(params.values()))
    elif isinstance(data, dict) and "emb_params" in data:
        vectors = data["emb_params"]
    elif isinstance(data, dict) and {"clip_l", "clip_g"} & set(data):
        raise NetworkError(f"{path.name}: an SDXL embedding (clip_l/clip_g); it does not apply to this model")
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), np.ndarray):
        vectors = next(iter(data.values()))
    else:
        raise NetworkError(f"{path.name}: not a textual-inversion embedding layout sd-onnx knows "
                           "(string_to_param, emb_params, or one {token: vector})")
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not vectors.size:
        raise NetworkError(f"{path.name}: embedding vectors of shape {vectors.shape}, expected [n, width]")
    return vectors


def load_embedding(path: Path) -> Embedding:
    if path.suffix.lower() == ".safetensors":
        data = read_safetensors(path)[0]
    else:
        data = read_torch_file(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Embedding(path.stem, path, embedding_vectors(data, path), sha[:12])


# ---------------------------------------------------------------------------------------------------------------
# The database a tokenizer consults


class EmbeddingDatabase:
    """Embeddings of one folder, for one text encoder (its width and vocabulary size); ids assigned in name order."""

    def __init__(self, embeddings: list[Embedding], vocab: int, width: int):
        self.failed = [e for e in embeddings if e.error]
        self.embeddings = [e for e in embeddings if not e.error and e.vectors.shape[1] == width]  # A1111 skips others
        next_id = vocab
        for e in self.embeddings:
            e.ids = list(range(next_id, next_id + len(e.vectors)))
            next_id += len(e.vectors)
        self._lookup: dict[int, list[tuple[list[int], Embedding]]] | None = None
        self._tokenizer_id: int | None = None

    def _index(self, tokenizer) -> dict[int, list[tuple[list[int], Embedding]]]:
        if self._lookup is None or self._tokenizer_id != id(tokenizer):
            lookup: dict[int, list[tuple[list[int], Embedding]]] = {}
            entries = self.embeddings + self.failed
            names = tokenizer.encode_batch([e.name for e in entries])
            for ids, e in zip(names, entries):
                if ids:
                    lookup.setdefault(ids[0], []).append((ids, e))
            for entries in lookup.values():
                entries.sort(key=lambda entry: -len(entry[0]))
            self._lookup, self._tokenizer_id = lookup, id(tokenizer)
        return self._lookup

    def find_at(self, tokens: list[int], position: int, tokenizer) -> tuple[Embedding | None, int]:
        """A1111's find_embedding_at_position: the longest embedding name whose ids start at `position`."""
        for ids, e in self._index(tokenizer).get(tokens[position], []):
            if tokens[position: position + len(ids)] == ids:
                return e, len(ids)
        return None, 0

    def used_in(self, texts: list[str], tokenizer) -> list[Embedding]:
        from sd_onnx.runtime.prompt import parse_prompt_attention

        used: list[Embedding] = []
        for text in texts:
            fragments = [t for t, _ in parse_prompt_attention(text)]
            for tokens in tokenizer.encode_batch(fragments):
                for position in range(len(tokens)):
                    e, _ = self.find_at(tokens, position, tokenizer)
                    if e is not None and e.error:
                        raise NetworkError(e.error)
                    if e is not None and e not in used:
                        used.append(e)
        return used

    def token_rows(self) -> tuple[str, NDArray[np.float32]]:
        """(identity, rows to append to the token table) for every embedding, in id order."""
        identity = ",".join(f"{e.name}:{e.shorthash}" for e in self.embeddings)
        return identity, np.concatenate([e.vectors for e in self.embeddings]).astype(np.float32)


_CACHE: dict[tuple, EmbeddingDatabase] = {}


def database(folder: Path, model) -> EmbeddingDatabase | None:
    """The embeddings under `folder` for `model`'s text encoder, re-read only when the folder's files change;
    None when there are none."""
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if not files:
        return None
    try:
        wmap = WeightMap(model.folder, "text_encoder")
    except ModelFolderError:
        wmap = None
    layer = wmap.lookup(TOKEN_EMBEDDING) if wmap is not None else None
    if layer is None:
        raise ModelFolderError(f"{model.folder.name} was exported before sd-onnx could use textual-inversion "
                               f"embeddings (text_encoder/{MAP_FILE} is missing or incomplete), and {folder} holds "
                               "some: export the model again with `sd-onnx export`")
    vocab, width = wmap.layers[layer]["shape"]
    key = (str(model.folder.resolve()), vocab, width,
           tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = EmbeddingDatabase([_load_or_note(p) for p in files], vocab, width)
    return _CACHE[key]


def _load_or_note(path: Path) -> Embedding:
    """A damaged file beside good ones must not stop prompts that do not name it (A1111 skips it too)."""
    try:
        return load_embedding(path)
    except NetworkError as e:
        return Embedding(path.stem, path, np.zeros((0, 0), np.float32), "", error=f"embedding '{path.stem}': {e}")
    except OSError as e:
        return Embedding(path.stem, path, np.zeros((0, 0), np.float32), "",
                         error=f"embedding '{path.stem}': {path}: cannot read it ({e.strerror or e})")
