"""A1111 prompt syntax: (emphasis:1.2), [less], BREAK, 75-token chunks and the emphasis math."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from sd_onnx.errors import UsageError

CHUNK_TOKENS = 75  # ids per chunk between BOS and EOS (A1111 `chunk_length`)
CHUNK_LENGTH = CHUNK_TOKENS + 2
COMMA_PADDING_BACKTRACK = 20  # A1111's default for `comma_padding_backtrack`
BREAK_WEIGHT = -1.0  # A1111 marks a BREAK with the weight -1
_UP = 1.1
_DOWN = 1 / 1.1

# One match per syntax element; the alternatives are tried in order, as in A1111's `re_attention`:
# escapes, a lone backslash, openers, a ":weight)" closer, plain closers, a text run, a stray colon.
_ELEMENT = re.compile(
    r"""
    \\[()\[\]\\]          # escaped bracket or backslash: the character itself
  | \\                    # a backslash before anything else is dropped
  | [(\[]                 # openers
  | :\s*([+-]?[.\d]+)\s*\)  # (text:1.3)
  | [)\]]                 # closers
  | [^\\()\[\]:]+         # text
  | :                     # a colon that closes nothing
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) runs as A1111 does; BREAK gives ("BREAK", -1.0)."""
    parts: list[list] = []  # [text, weight], mutable while brackets are still open
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for m in _ELEMENT.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(parts))
        elif token == "[":
            open_square.append(len(parts))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:
                raise UsageError(f"prompt weight {weight!r} is not a number in {text!r}") from None
            scale_from(open_round.pop(), factor)
        elif token == ")" and open_round:
            scale_from(open_round.pop(), _UP)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), _DOWN)
        else:
            for i, piece in enumerate(_BREAK.split(token)):
                if i:
                    parts.append(["BREAK", BREAK_WEIGHT])
                parts.append([piece, 1.0])

    # Unclosed brackets act as if closed at the end (round first, then square, like A1111).
    for start in open_round:
        scale_from(start, _UP)
    for start in open_square:
        scale_from(start, _DOWN)

    merged: list[list] = []
    for part in parts or [["", 1.0]]:
        if merged and merged[-1][1] == part[1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return [(t, w) for t, w in merged]


class _Tokenizer(Protocol):
    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def token_id(self, token: str) -> int | None: ...


@dataclass
class PromptChunks:
    """A prompt as CLIP-sized chunks: ids and per-token weights, both [n_chunks, 77]."""

    ids: NDArray[np.int64]
    weights: NDArray[np.float32]
    empty_ids: NDArray[np.int64] | None = None  # [77], the empty-prompt chunk used for padding

    @property
    def n_chunks(self) -> int:
        return int(self.ids.shape[0])


def tokenize_prompt(
    tokenizer: _Tokenizer, text: str, comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK, embeddings=None
) -> PromptChunks:
    """A1111's `tokenize_line`: 75 ids per chunk, comma backtracking, BREAK; with `embeddings` (an
    embeddings.EmbeddingDatabase) a name spelled in the prompt becomes its vectors' ids, counted as A1111 counts
    them (one token each; an embedding that does not fit the rest of a chunk starts the next one)."""
    parsed = parse_prompt_attention(text)
    encoded = tokenizer.encode_batch([t for t, _ in parsed])
    comma = tokenizer.token_id(",</w>")

    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal ids, mults, last_comma
        chunks.append((ids, mults))
        ids, mults, last_comma = [], [], -1

    for tokens, (fragment, weight) in zip(encoded, parsed):
        if fragment == "BREAK" and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(ids)
            elif (
                comma_padding_backtrack
                and len(ids) == CHUNK_TOKENS
                and last_comma != -1
                and len(ids) - last_comma <= comma_padding_backtrack
            ):
                # Move the words after the last comma into the next chunk rather than split them.
                cut = last_comma + 1
                moved_ids, moved_mults = ids[cut:], mults[cut:]
                ids, mults = ids[:cut], mults[:cut]
                close_chunk()
                ids, mults = moved_ids, moved_mults
            if len(ids) == CHUNK_TOKENS:
                close_chunk()
            embedding, spelled = embeddings.find_at(tokens, position, tokenizer) if embeddings else (None, 0)
            if embedding is None:
                ids.append(token)
                mults.append(weight)
                position += 1
                continue
            if len(ids) + len(embedding.ids) > CHUNK_TOKENS:
                close_chunk()
            ids += embedding.ids
            mults += [weight] * len(embedding.ids)
            position += spelled
    if ids or not chunks:
        close_chunk()

    out_ids = np.stack([_chunk_ids(tokenizer, c) for c, _ in chunks])
    out_w = np.ones((len(chunks), CHUNK_LENGTH), dtype=np.float32)
    for row, (_, m) in zip(out_w, chunks):
        row[1 : len(m) + 1] = m
    return PromptChunks(out_ids, out_w, _chunk_ids(tokenizer, []))


def _chunk_ids(tokenizer: _Tokenizer, ids: list[int]) -> NDArray[np.int64]:
    """BOS + ids + EOS..., then everything after the first EOS set to the pad id.

    A1111 fills a chunk with EOS and, where pad differs from EOS (SD 2.x's OpenCLIP pads with 0),
    overwrites what follows the first EOS with the pad id; SD 1.x pads with EOS itself.
    """
    row = np.full(CHUNK_LENGTH, tokenizer.eos_id, dtype=np.int64)
    row[0] = tokenizer.bos_id
    row[1 : len(ids) + 1] = ids
    first_eos = int(np.flatnonzero(row == tokenizer.eos_id)[0])
    row[first_eos + 1 :] = tokenizer.pad_id
    return row


def apply_emphasis(z: NDArray, weights: NDArray) -> NDArray:
    """A1111 "Original" emphasis: z * weight per token, rescaled so each chunk keeps its mean.

    z is [n_chunks, 77, D], weights [n_chunks, 77]. A1111 encodes chunk by chunk and takes the
    mean over the whole chunk tensor, so the mean here is per chunk.
    """
    z64 = np.asarray(z, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if z64.ndim != 3 or w.shape != z64.shape[:2]:
        raise ValueError(f"apply_emphasis: z {z64.shape} and weights {w.shape} do not match")
    with np.errstate(over="ignore", invalid="ignore"):  # an infinite weight gives NaN; encode reports it in one line
        original_mean = z64.mean(axis=(1, 2), keepdims=True)
        scaled = z64 * w[:, :, None]
        scaled *= original_mean / scaled.mean(axis=(1, 2), keepdims=True)
    return scaled.astype(np.asarray(z).dtype, copy=False)


def concat_chunks(z: NDArray) -> NDArray:
    """[n_chunks, 77, D] -> [1, 77 * n_chunks, D], the conditioning the UNet attends to."""
    return z.reshape(1, -1, z.shape[-1])


def pad_to_same_chunks(a: PromptChunks, b: PromptChunks) -> tuple[PromptChunks, PromptChunks]:
    """Pad the shorter prompt with empty-prompt chunks (A1111's "pad prompt/negative prompt")."""
    n = max(a.n_chunks, b.n_chunks)
    return _pad(a, n, b.empty_ids), _pad(b, n, a.empty_ids)


def _pad(p: PromptChunks, n: int, fallback: NDArray[np.int64] | None) -> PromptChunks:
    missing = n - p.n_chunks
    if missing == 0:
        return p
    empty = p.empty_ids if p.empty_ids is not None else fallback
    if empty is None:
        raise ValueError("pad_to_same_chunks: neither prompt carries empty_ids (use tokenize_prompt)")
    ids = np.concatenate([p.ids, np.tile(empty, (missing, 1))])
    weights = np.concatenate([p.weights, np.ones((missing, CHUNK_LENGTH), dtype=p.weights.dtype)])
    return PromptChunks(ids, weights, empty)
