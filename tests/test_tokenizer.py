"""ClipTokenizer against transformers' CLIPTokenizer, loaded from the folder we write.

Which transformers behaviour we match, and why:
- transformers >= 5 has one `CLIPTokenizer`, backed by `tokenizers` (the former CLIPTokenizerFast):
  NFC, whitespace runs -> " ", lowercase, the CLIP regex split, byte-level BPE with `</w>`. No ftfy,
  no HTML unescaping. That is what diffusers/optimum pipelines run today, so it is the reference.
- transformers 4.x's *slow* CLIPTokenizer (what A1111 uses for SD 1.x, and diffusers did by default)
  differed: with ftfy installed it ran `ftfy.fix_text` (curly quotes -> straight, full-width ->
  ASCII, ligatures split, `&amp;` -> `&`); without ftfy it ran BERT's BasicTokenizer, which puts
  spaces around every CJK character and drops control/format characters (e.g. ZWJ in emoji). We do
  none of that; `test_no_ftfy_rewrites` pins it.
- Every special token, the pad token included, is an added token that is cut out of the text. With
  SD 2.x's pad token "!" a literal "!" in a prompt therefore becomes id 0 (transformers does the
  same; open_clip and A1111 would give 256, "!</w>"). `test_sd2_pad_token_splits_exclamation` pins it.
Comparisons are exact (integer ids): any difference is a bug.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sd_onnx.errors import ModelFolderError, SdOnnxError
from sd_onnx.runtime.tokenizer import ClipTokenizer, write_tokenizer_folder

transformers = pytest.importorskip("transformers")

SD1_PAD, SD2_PAD = "<|endoftext|>", "!"
LONG = ", ".join(["masterpiece", "best quality", "ultra-detailed", "8k", "portrait of a knight"] * 12)

CORPUS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT",
    "A PHOTO OF A CAT!!!",
    "hello, world.",
    "Hello...world?!",
    "well-known e-mail: foo@bar.com",
    "1girl, 2boys, 3.14159, 1024x768, 8k uhd",
    "The year 1999 and 2024-05-01 at 10:30pm",
    "café crème brûlée à la mode",
    "naïve résumé coöperate",
    "Ångström Øresund Łódź",
    "日本語のテキスト",
    "中文提示词，高质量",
    "한국어 프롬프트",
    "Привет мир",
    "μ-law α β γ Δ",
    "emoji 😀🎉🔥 test",
    "family 👨\u200d👩\u200d👧 zwj",
    "flag 🇯🇵 and skin 👍🏽",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\nmixed",
    "multiple     spaces    between",
    "non\u00a0breaking\u2003em space",
    "<b>bold</b> &amp; <i>italic</i>",
    "fish &amp; chips &lt;3 &quot;quoted&quot;",
    "<|startoftext|> literal specials <|endoftext|>",
    "<|ENDOFTEXT|> upper-case specials are text",
    "it's the cat's toy, isn't it? we'll see, they've gone, I'm here, you'd know",
    "IT'S SHOUTING, DON'T",
    "“curly quotes” and ‘single’ it’s",
    "ｆｕｌｌ ｗｉｄｔｈ ＡＢＣ",
    "ligature ﬁne ﬂow",
    "(masterpiece:1.2), [blurry], {braces}, <lora:foo:0.8>",
    "snake_case and camelCase and kebab-case",
    "path/to/file.png C:\\windows\\path",
    "$100 €50 ¥1000 £5 ₹20",
    "math: 2+2=4, x^2, a*b, 50%",
    "#hashtag @mention ~tilde `backtick` |pipe|",
    "a\u0301 decomposed accent",
    "ＡＢＣ１２３",
    "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    LONG,
    " ".join(f"word{i}" for i in range(100)),
    "cat " * 76,
    "cat " * 75,
    "cat " * 74,
]


@pytest.fixture(scope="module", params=[SD1_PAD, SD2_PAD], ids=["sd1", "sd2"])
def pair(request, tmp_path_factory):
    """(ours bundled, ours from the folder, transformers from the folder) for one pad token."""
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_folder(folder, request.param)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    return ClipTokenizer.bundled(request.param), ClipTokenizer.from_folder(folder), ref


def _ref_batch(ref, texts):
    return np.asarray(ref(texts, padding="max_length", max_length=77, truncation=True)["input_ids"])


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 40


def test_batch_matches_transformers(pair):
    bundled, from_folder, ref = pair
    expected = _ref_batch(ref, CORPUS)
    for ours in (bundled, from_folder):
        got = ours(CORPUS)
        assert got.dtype == np.int64 and got.shape == (len(CORPUS), 77)
        for text, g, e in zip(CORPUS, got, expected):
            assert g.tolist() == e.tolist(), text


def test_encode_matches_transformers_without_truncation(pair):
    ours, _, ref = pair
    for text in CORPUS:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    assert len(ours.encode(LONG)) > 75  # the long prompts really exceed one chunk


def test_special_ids(pair):
    ours, from_folder, ref = pair
    for t in (ours, from_folder):
        assert (t.bos_id, t.eos_id, t.max_length) == (49406, 49407, 77)
        assert t.pad_id == ref.pad_token_id
    assert ours.pad_id == (49407 if ours.pad_token == SD1_PAD else 0)


def test_known_openai_clip_ids():
    """Independent of transformers: these ids are OpenAI CLIP's, so the derived vocab is the real one."""
    tok = ClipTokenizer.bundled()
    assert tok(["a photo of a cat"])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert tok.token_id(",</w>") == 267
    assert tok.token_id("!") == 0 and tok.token_id("!</w>") == 256


def test_truncation_keeps_75_and_ends_with_eos():
    tok = ClipTokenizer.bundled()
    row = tok(["cat " * 100])[0]
    assert row.tolist() == [49406] + [2368] * 75 + [49407]


def test_sd2_pad_token_splits_exclamation():
    # Matches transformers (see module docstring); open_clip would give 256 here.
    assert ClipTokenizer.bundled(SD2_PAD).encode("wow!") == [2781, 0]
    assert ClipTokenizer.bundled(SD1_PAD).encode("wow!") == [2781, 256]


def test_no_ftfy_rewrites():
    ftfy = pytest.importorskip("ftfy")
    tok = ClipTokenizer.bundled()
    for text in ("“curly” it’s", "ｆｕｌｌ ｗｉｄｔｈ", "fish &amp; chips"):
        fixed = ftfy.fix_text(text)
        assert fixed != text
        assert tok.encode(text) != tok.encode(fixed), text


def test_cjk_is_not_split_per_character():
    # BasicTokenizer (transformers 4.x slow, no ftfy) would make each character its own word.
    tok = ClipTokenizer.bundled()
    assert tok.encode("日本語") != tok.encode("日 本 語")


def test_legacy_sd15_folder(tmp_path: Path):
    """The SD 1.5 hub layout: specials as AddedToken dicts with normalized=true (bos stays normalized)."""
    write_tokenizer_folder(tmp_path, SD1_PAD)

    def added(c):
        return {"content": c, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    specials = {
        "bos_token": added("<|startoftext|>"),
        "eos_token": added("<|endoftext|>"),
        "pad_token": "<|endoftext|>",
        "unk_token": added("<|endoftext|>"),
    }
    config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        **{k: ({"__type": "AddedToken", **v} if isinstance(v, dict) else v) for k, v in specials.items()},
    }
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(specials))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    ours = ClipTokenizer.from_folder(tmp_path)
    texts = CORPUS + ["<|STARTOFTEXT|> hi", "x<|StartOfText|>", "<|EndOfText|>"]
    assert ours(texts).tolist() == _ref_batch(ref, texts).tolist()
    assert ours.encode("<|STARTOFTEXT|>") == [49406]  # would be 6 text ids if normalized were ignored


def test_from_folder_round_trip_and_max_length(tmp_path: Path):
    write_tokenizer_folder(tmp_path, SD2_PAD)
    tok = ClipTokenizer.from_folder(tmp_path)
    assert tok.pad_id == 0 and tok(["cat"])[0, :5].tolist() == [49406, 2368, 49407, 0, 0]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["model_max_length"] = 10
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    short = ClipTokenizer.from_folder(tmp_path)
    assert short.max_length == 10 and short(["cat " * 20]).shape == (1, 10)


def test_folder_errors(tmp_path: Path):
    with pytest.raises(ModelFolderError, match="vocab.json"):
        ClipTokenizer.from_folder(tmp_path)
    write_tokenizer_folder(tmp_path, SD1_PAD)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<nope>"}))
    with pytest.raises(ModelFolderError, match="<nope>"):
        ClipTokenizer.from_folder(tmp_path)
    with pytest.raises(SdOnnxError):
        ClipTokenizer.bundled("<nope>")
