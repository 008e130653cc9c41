"""CLIP BPE tokenizer on HF `tokenizers` (no torch): ids as transformers' CLIPTokenizer gives them."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sd_onnx.errors import ModelFolderError, UsageError

DATA_DIR = Path(__file__).parent / "data"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
SD1_PAD = EOS
SD2_PAD = "!"
MAX_LENGTH = 77
# The CLIP split; transformers adds the two special tokens in front (they never reach it: added
# tokens are cut out before normalisation), kept so the pipeline is byte-for-byte the same.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class _Special:
    content: str
    normalized: bool = False  # plain-string tokens match the raw text, as in transformers


class ClipTokenizer:
    """Text -> CLIP token ids; `tokenizer(texts)` gives the [B, 77] int64 batch the text encoder takes."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos: str = BOS,
        eos: str = EOS,
        unk: str = EOS,
        pad: str = SD1_PAD,
        max_length: int = MAX_LENGTH,
        normalized: frozenset[str] = frozenset(),
    ) -> None:
        for role, token in (("bos", bos), ("eos", eos), ("unk", unk), ("pad", pad)):
            if token not in vocab:
                raise UsageError(f"{role} token {token!r} is not in the CLIP vocabulary")
        if max_length < 2:
            raise UsageError(f"max_length must be at least 2 (BOS and EOS), got {max_length}")
        tok = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=unk,
            )
        )
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # transformers registers every special token (pad included) as an added token, so it is
        # cut out of the text wherever it appears: with SD 2.x's pad "!", "hi!" -> [.., 0].
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=t in normalized) for t in dict.fromkeys((bos, eos, unk, pad))]
        )
        self._tok = tok
        self._bos, self._eos, self._pad = vocab[bos], vocab[eos], vocab[pad]
        self._max_length = max_length
        self.pad_token = pad

    @classmethod
    def bundled(cls, pad_token: str = SD1_PAD) -> ClipTokenizer:
        """The shipped CLIP vocabulary; SD 1.x pads with `<|endoftext|>`, SD 2.x with `!`."""
        vocab, merges = _bundled_vocab()
        return cls(vocab, merges, pad=pad_token)

    @classmethod
    def from_folder(cls, path: Path) -> ClipTokenizer:
        """A diffusers `tokenizer/` folder: vocab.json, merges.txt and the two JSON configs."""
        path = Path(path)
        vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise ModelFolderError(f"tokenizer folder {path}: missing {f.name}")
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            merges = _parse_merges(merges_file.read_text(encoding="utf-8"))
            config = _read_json(path / "tokenizer_config.json")
            special_map = _read_json(path / "special_tokens_map.json")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelFolderError(f"tokenizer folder {path}: {exc}") from exc
        specials = _resolve_specials(config, special_map)
        normalized = frozenset(
            c
            for c in {s.content for s in specials.values()}
            if all(s.normalized for s in specials.values() if s.content == c)
        )
        max_length = config.get("model_max_length", MAX_LENGTH)
        if not isinstance(max_length, int) or max_length > 10**6:  # HF writes 1e30 for "unlimited"
            max_length = MAX_LENGTH
        try:
            return cls(
                vocab,
                merges,
                bos=specials["bos_token"].content,
                eos=specials["eos_token"].content,
                unk=specials["unk_token"].content,
                pad=specials["pad_token"].content,
                max_length=max_length,
                normalized=normalized,
            )
        except UsageError as exc:
            raise ModelFolderError(f"tokenizer folder {path}: {exc}") from exc

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def max_length(self) -> int:
        return self._max_length

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary entry such as `,</w>`, or None."""
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS/EOS and without truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, texts: list[str]) -> NDArray[np.int64]:
        """[B, max_length]: BOS, the first max_length-2 ids, EOS, then pad (HF max_length padding)."""
        if isinstance(texts, str):
            texts = [texts]
        n = self._max_length - 2
        out = np.full((len(texts), self._max_length), self._pad, dtype=np.int64)
        for row, ids in zip(out, self.encode_batch(texts)):
            ids = ids[:n]
            row[0] = self._bos
            row[1 : len(ids) + 1] = ids
            row[len(ids) + 1] = self._eos
        return out


def write_tokenizer_folder(dest: Path, pad_token: str = SD1_PAD) -> None:
    """Write the bundled vocabulary as a diffusers `tokenizer/` folder (transformers/optimum load it)."""
    vocab_text, merges_text = (_bundled_text(n) for n in ("vocab.json.gz", "merges.txt.gz"))
    if pad_token not in json.loads(vocab_text):
        raise UsageError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    config = {
        "add_prefix_space": False,
        **specials,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    (dest / "vocab.json").write_text(vocab_text, encoding="utf-8")
    (dest / "merges.txt").write_text(merges_text, encoding="utf-8")
    (dest / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


_BUNDLED: tuple[dict[str, int], list[tuple[str, str]]] | None = None


def _bundled_text(name: str) -> str:
    return gzip.decompress((DATA_DIR / name).read_bytes()).decode("utf-8")


def _bundled_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    global _BUNDLED
    if _BUNDLED is None:
        _BUNDLED = json.loads(_bundled_text("vocab.json.gz")), _parse_merges(_bundled_text("merges.txt.gz"))
    return _BUNDLED


def _parse_merges(text: str) -> list[tuple[str, str]]:
    merges = []
    for i, line in enumerate(text.split("\n")):
        if (i == 0 and line.startswith("#version")) or not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"merges.txt line {i + 1}: expected two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _resolve_specials(config: dict[str, Any], special_map: dict[str, Any]) -> dict[str, _Special]:
    """special_tokens_map.json wins over tokenizer_config.json, then CLIP's defaults."""
    defaults = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": SD1_PAD}
    out = {}
    for role in _ROLES:
        value = special_map.get(role, config.get(role, defaults[role]))
        if isinstance(value, dict):
            out[role] = _Special(str(value["content"]), bool(value.get("normalized", False)))
        elif isinstance(value, str):
            out[role] = _Special(value)
        else:
            out[role] = _Special(defaults[role])
    return out
