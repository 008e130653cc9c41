"""A1111 prompt syntax, chunking and emphasis, pinned to A1111's documented behaviour.

Weights are compared exactly: the parser does the same float multiplications in the same order as
A1111, so even A1111's 1.5730000000000004 must come out bit for bit. Emphasis math is float32 and
compared with rtol 1e-6 (a few ulps of float32 on values near 1).
"""

from __future__ import annotations

import numpy as np
import pytest

from sd_onnx.errors import UsageError
from sd_onnx.runtime.prompt import (
    PromptChunks,
    apply_emphasis,
    concat_chunks,
    pad_to_same_chunks,
    parse_prompt_attention,
    tokenize_prompt,
)
from sd_onnx.runtime.tokenizer import ClipTokenizer

BOS, EOS = 49406, 49407
CAT, COMMA = 2368, 267

# Copied from the docstring of `parse_prompt_attention` in AUTOMATIC1111/stable-diffusion-webui,
# modules/prompt_parser.py (commit 28bd8e142d5f77b71ae8d7d7140b5da1b3a49906).
A1111_DOCSTRING_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ["a ", 1.0],
            ["house", 1.5730000000000004],
            [" ", 1.1],
            ["on", 1.0],
            [" a ", 1.1],
            ["hill", 0.55],
            [", sun, ", 1.1],
            ["sky", 1.4641000000000006],
            [".", 1.1],
        ],
    ),
]

# Worked out by hand from A1111's algorithm (not in its docstring).
MORE_EXAMPLES = [
    ("(abc)", [["abc", 1.1]]),
    ("[abc]", [["abc", 1 / 1.1]]),
    ("(abc:1.3)", [["abc", 1.3]]),
    ("(abc : 1.3)", [["abc ", 1.3]]),  # spaces before ":" stay in the text, after it are allowed
    ("\\(literal\\)", [["(literal)", 1.0]]),
    ("((abc))", [["abc", 1.1 * 1.1]]),
    ("[[abc]]", [["abc", (1 / 1.1) * (1 / 1.1)]]),
    ("a [b", [["a ", 1.0], ["b", 1 / 1.1]]),  # unclosed square bracket closes at the end
    ("a ]b)", [["a ]b)", 1.0]]),  # closers with nothing open are text
    ("x:1.5)", [["x:1.5)", 1.0]]),  # a weight with no open bracket is text
    ("a \\\\ b", [["a \\ b", 1.0]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1.0], ["b", 1.0]]),
    ("BREAKfast", [["BREAKfast", 1.0]]),  # BREAK only as a word
    ("", [["", 1.0]]),
    # A1111 quirk kept: a BREAK inside brackets gets its weight scaled and stops being a BREAK.
    ("(a BREAK b)", [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]),
]


@pytest.mark.parametrize("text,expected", A1111_DOCSTRING_EXAMPLES + MORE_EXAMPLES)
def test_parse_prompt_attention(text, expected):
    assert parse_prompt_attention(text) == [tuple(p) for p in expected]


def test_bad_weight_is_a_user_error():
    with pytest.raises(UsageError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")


@pytest.fixture(scope="module")
def sd1():
    return ClipTokenizer.bundled("<|endoftext|>")


@pytest.fixture(scope="module")
def sd2():
    return ClipTokenizer.bundled("!")


def _row(tokens, pad=EOS):
    """BOS, tokens, EOS, then pad to 77."""
    return [BOS] + tokens + [EOS] + [pad] * (75 - len(tokens))


def test_plain_prompt_is_the_hf_batch(sd1, sd2):
    # Without emphasis syntax a one-chunk prompt is exactly what the HF tokenizer gives.
    text = "a photo of an astronaut riding a horse on mars, highly detailed"
    for tok in (sd1, sd2):
        chunks = tokenize_prompt(tok, text)
        assert chunks.ids.dtype == np.int64 and chunks.weights.dtype == np.float32
        assert chunks.ids.tolist() == tok([text]).tolist()
        assert np.all(chunks.weights == 1.0)


def test_empty_prompt_is_one_chunk(sd1, sd2):
    assert tokenize_prompt(sd1, "").ids.tolist() == [_row([])]
    assert tokenize_prompt(sd2, "").ids.tolist() == [_row([], pad=0)]  # OpenCLIP's id_pad is 0


def test_150_tokens_give_two_chunks(sd1):
    chunks = tokenize_prompt(sd1, "cat " * 150)
    assert chunks.ids.shape == (2, 77) and chunks.weights.shape == (2, 77)
    assert chunks.ids.tolist() == [_row([CAT] * 75)] * 2
    assert tokenize_prompt(sd1, "cat " * 151).n_chunks == 3


def test_comma_backtracking(sd1):
    dog = sd1.token_id("dog</w>")
    text = "cat " * 70 + ", " + "dog " * 10  # comma at position 70, chunk fills up 5 tokens later
    chunks = tokenize_prompt(sd1, text)
    assert chunks.ids.tolist() == [_row([CAT] * 70 + [COMMA]), _row([dog] * 10)]
    # backtracking off: the chunk is cut at exactly 75
    plain = tokenize_prompt(sd1, text, comma_padding_backtrack=0)
    assert plain.ids.tolist() == [_row([CAT] * 70 + [COMMA] + [dog] * 4), _row([dog] * 6)]


def test_comma_too_far_back_is_ignored(sd1):
    dog = sd1.token_id("dog</w>")
    text = "cat " * 50 + ", " + "dog " * 30  # the comma is 25 > 20 tokens before the cut
    chunks = tokenize_prompt(sd1, text)
    assert chunks.ids.tolist() == [_row([CAT] * 50 + [COMMA] + [dog] * 24), _row([dog] * 6)]


def test_break_starts_a_new_chunk(sd1, sd2):
    dog = sd1.token_id("dog</w>")
    assert tokenize_prompt(sd1, "cat BREAK dog").ids.tolist() == [_row([CAT]), _row([dog])]
    assert tokenize_prompt(sd2, "cat BREAK dog").ids.tolist() == [_row([CAT], pad=0), _row([dog], pad=0)]


def test_weights_follow_tokens(sd1):
    dog = sd1.token_id("dog</w>")
    chunks = tokenize_prompt(sd1, "(cat:1.5), [dog]")
    assert chunks.ids[0, :5].tolist() == [BOS, CAT, COMMA, dog, EOS]
    np.testing.assert_array_equal(chunks.weights[0, :5], np.float32([1.0, 1.5, 1.0, 1 / 1.1, 1.0]))
    assert np.all(chunks.weights[0, 5:] == 1.0)


def test_full_chunk_has_no_pad(sd2):
    # 75 tokens: EOS lands on the last slot and there is nothing to pad, even with SD 2.x's pad 0.
    assert tokenize_prompt(sd2, "cat " * 75).ids.tolist() == [_row([CAT] * 75, pad=0)]


def test_apply_emphasis_hand_checked():
    # chunk 0: z = [[1, 2], [3, 4]], weights [1, 2] -> [[1, 2], [6, 8]], mean 4.25;
    # the original mean is 2.5, so everything is scaled by 2.5 / 4.25 = 10/17.
    # chunk 1: all weights 1 -> unchanged (its own mean, not the batch mean, is kept).
    z = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], dtype=np.float32)
    w = np.array([[1, 2], [1, 1]], dtype=np.float32)
    out = apply_emphasis(z, w)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], np.array([[10, 20], [60, 80]]) / 17, rtol=1e-6)
    np.testing.assert_allclose(out[1], z[1], rtol=1e-6)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), z.mean(axis=(1, 2)), rtol=1e-6)


def test_apply_emphasis_shape_mismatch():
    with pytest.raises(ValueError):
        apply_emphasis(np.zeros((1, 77, 8), np.float32), np.ones((2, 77), np.float32))


def test_concat_chunks_order():
    z = np.arange(2 * 77 * 3, dtype=np.float32).reshape(2, 77, 3)
    out = concat_chunks(z)
    assert out.shape == (1, 154, 3)
    np.testing.assert_array_equal(out[0, 77], z[1, 0])  # chunk 1 follows chunk 0


def test_pad_to_same_chunks(sd1, sd2):
    for tok, pad in ((sd1, EOS), (sd2, 0)):
        long, short = tokenize_prompt(tok, "cat " * 100), tokenize_prompt(tok, "cat")
        a, b = pad_to_same_chunks(long, short)
        assert a is long and b.n_chunks == 2
        assert b.ids.tolist() == [_row([CAT], pad=pad), _row([], pad=pad)]
        assert np.all(b.weights[1] == 1.0)
        b2, a2 = pad_to_same_chunks(short, long)  # order of arguments does not matter
        assert b2.ids.tolist() == b.ids.tolist() and a2 is long


def test_pad_without_empty_ids_is_refused():
    one = PromptChunks(np.zeros((1, 77), np.int64), np.ones((1, 77), np.float32))
    two = PromptChunks(np.zeros((2, 77), np.int64), np.ones((2, 77), np.float32))
    with pytest.raises(ValueError):
        pad_to_same_chunks(one, two)
