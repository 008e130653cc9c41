"""Textual inversion at generate time: A1111's embedding files (read without torch) give diffusers'
load_textual_inversion image; their vectors count in the 75-token chunks as A1111 counts them; `TI hashes`."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest

from sd_onnx.errors import SdOnnxError
from sd_onnx.runtime.embeddings import EmbeddingDatabase, Embedding, load_embedding
from sd_onnx.runtime.model import LoadedModel
from sd_onnx.runtime.pipeline import GenerateRequest, run
from sd_onnx.runtime.prompt import tokenize_prompt
from sd_onnx.runtime.tokenizer import ClipTokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tests.test_generate import SIZE, reference_image, reference_pipeline  # noqa: E402

STEPS = 10


def write_embeddings(folder: Path, width: int, seed: int = 5) -> dict[str, Path]:
    """An A1111 .pt (string_to_param in a ParameterDict, 2 vectors), an emb_params .safetensors (1 vector) and a
    diffusers-style .bin ({token: vector})."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    pt = folder / "tiemb.pt"
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(2, width, generator=gen) * 0.5)})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "tiemb", "step": 100}, pt)
    st = folder / "badthing.safetensors"
    save_file({"emb_params": torch.randn(1, width, generator=gen) * 0.5}, str(st))
    binf = folder / "conceptx.bin"
    torch.save({"<conceptx>": torch.randn(width, generator=gen) * 0.5}, binf)
    return {"tiemb": pt, "badthing": st, "conceptx": binf}


@pytest.fixture(scope="module")
def ti_setup(tiny_model, tiny_checkpoint, tmp_path_factory):
    folder = tiny_model("sd1")
    pipe = reference_pipeline(tiny_checkpoint("sd1"), diffusers.EulerDiscreteScheduler)
    files = write_embeddings(tmp_path_factory.mktemp("embeddings"), pipe.text_encoder.config.hidden_size)
    return folder, pipe, files


def test_embedding_files_read_without_torch(ti_setup):
    _, _, files = ti_setup
    pt = torch.load(files["tiemb"], weights_only=False)["string_to_param"]["*"].detach().numpy()
    np.testing.assert_array_equal(load_embedding(files["tiemb"]).vectors, pt)
    assert load_embedding(files["badthing"]).vectors.shape[0] == 1
    assert load_embedding(files["conceptx"]).vectors.shape[0] == 1


def test_embeddings_match_diffusers_load_textual_inversion(ti_setup):
    """A 2-vector .pt in the prompt and a 1-vector .safetensors in the negative prompt: diffusers' image with both
    loaded by load_textual_inversion, within 3 levels (as test_generate); the infotext lists both TI hashes."""
    folder, pipe, files = ti_setup
    prompt, negative = "a photo of tiemb cat", "badthing, blurry"
    model = LoadedModel(folder, "cpu")
    model.embeddings_dir = files["tiemb"].parent
    request = GenerateRequest(prompt, negative, steps=STEPS, sampler="Euler", seed=77, width=SIZE[0], height=SIZE[1])
    image = next(run(model, request))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # diffusers' own loader refuses a pickled ParameterDict (weights_only): hand it the tensor (a trusted test file)
        vectors = torch.load(files["tiemb"], weights_only=False)["string_to_param"]["*"].detach()
        pipe.load_textual_inversion({"tiemb": vectors}, token="tiemb")
        pipe.load_textual_inversion(str(files["badthing"]), token="badthing")
        try:
            ref = reference_image(pipe, 77, STEPS, prompt=prompt, negative=negative)
        finally:
            pipe.unload_textual_inversion()
    ours = np.asarray(image.image)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 3, f"max diff {diff.max()} levels, mean {diff.mean():.3f}"
    plain = reference_image(pipe, 77, STEPS, prompt=prompt, negative=negative)
    assert np.abs(plain.astype(int) - ref.astype(int)).mean() > 1, "the embeddings barely change the image"
    sha = {n: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for n, p in files.items()}
    assert f'TI hashes: "tiemb: {sha["tiemb"]}, badthing: {sha["badthing"]}"' in image.parameters


def test_embedding_vectors_count_in_chunks_as_a1111():
    """74 words then a 3-vector embedding: it does not fit the 75 left in chunk 1 (74 + 3 > 75), so A1111 closes
    the chunk and starts the next with the embedding; its vectors get ids past the vocabulary."""
    tokenizer = ClipTokenizer.bundled()
    db = EmbeddingDatabase([Embedding("tiemb", Path("tiemb.pt"), np.ones((3, 8), np.float32), "0" * 12)],
                           vocab=49408, width=8)
    words = " ".join(["cat"] * 74)
    chunks = tokenize_prompt(tokenizer, f"{words} tiemb dog", embeddings=db)
    assert chunks.n_chunks == 2
    assert list(chunks.ids[1, 1:4]) == [49408, 49409, 49410]
    assert chunks.ids[0, 75] == tokenizer.eos_id  # chunk 1 padded after its 74 words
    fits = tokenize_prompt(tokenizer, f"{' '.join(['cat'] * 72)} tiemb", embeddings=db)
    assert fits.n_chunks == 1 and list(fits.ids[0, 73:76]) == [49408, 49409, 49410]
    weighted = tokenize_prompt(tokenizer, "a (tiemb:1.3) cat", embeddings=db)
    assert list(weighted.weights[0, 2:5]) == pytest.approx([1.3] * 3)


def test_corrupt_embedding_fails_only_when_named(ti_setup, tmp_path):
    folder, _, files = ti_setup
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "brokenemb.pt").write_bytes(b"PK\x03\x04 definitely not a zip")
    (emb / "tiemb.pt").write_bytes(files["tiemb"].read_bytes())
    model = LoadedModel(folder, "cpu")
    model.embeddings_dir = emb
    base = dict(steps=2, sampler="Euler", seed=1, width=64, height=64)
    next(run(model, GenerateRequest("a tiemb cat", **base)))
    with pytest.raises(SdOnnxError, match="brokenemb"):
        next(run(model, GenerateRequest("a brokenemb cat", **base)))


def test_pickled_code_in_an_embedding_is_refused(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Evil()}}, path)
    with pytest.raises(SdOnnxError, match="refused"):
        load_embedding(path)
