"""Prompts to conditioning: A1111's syntax and 75-token chunks through the text encoder, once per request."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from sd_onnx.runtime.denoiser import check_finite
from sd_onnx.runtime.prompt import apply_emphasis, concat_chunks, pad_to_same_chunks, tokenize_prompt


@dataclass
class Conditioning:
    """Positive and negative prompt embeddings, each [1, 77*n, D], computed once and reused for every image."""

    cond: NDArray
    uncond: NDArray


def encode_prompts(model, prompt: str, negative: str, embeddings=None) -> Conditioning:
    """`model` is a LoadedModel; its text encoder is released afterwards unless the model is kept loaded.
    `embeddings` (an embeddings.EmbeddingDatabase): prompt words that name an embedding become its vectors, whose
    rows the model's text encoder was given (LoadedModel.use_extra_networks)."""
    tokenizer = model.tokenizer()
    pos, neg = pad_to_same_chunks(tokenize_prompt(tokenizer, prompt, embeddings=embeddings),
                                  tokenize_prompt(tokenizer, negative, embeddings=embeddings))
    ids = np.concatenate([pos.ids, neg.ids])
    hidden = model.session("text_encoder").run({"input_ids": ids})[0]  # [2n, 77, D]
    model.release("text_encoder")
    n = pos.n_chunks
    cond = concat_chunks(apply_emphasis(hidden[:n], pos.weights))
    uncond = concat_chunks(apply_emphasis(hidden[n:], neg.weights))
    return Conditioning(check_finite(cond.astype(np.float32), "text encoder (after prompt emphasis)"),
                        check_finite(uncond.astype(np.float32), "text encoder (after prompt emphasis)"))
