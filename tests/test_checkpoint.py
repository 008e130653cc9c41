"""Checkpoint reading: every bad input ends in one clear SdOnnxError line and leaves nothing behind; nothing in a
file is ever executed; the odd-but-real layouts (legacy pickle, double wrapping, Lightning globals) load."""

from __future__ import annotations

import builtins
import os
import pickle
import shutil
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sd_onnx.errors import SdOnnxError

torch = pytest.importorskip("torch")

from sd_onnx.cli import main  # noqa: E402
from sd_onnx.export.checkpoint import load_checkpoint  # noqa: E402
from sd_onnx.export.exporter import export_model  # noqa: E402
from sd_onnx.families import UNET_KEY, VAE_KEY, detect_family  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors gain nothing from threads; OpenMP's spinning is very slow when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_refused(source: Path, tmp_path: Path, *fragments: str, output: Path | None = None, **kwargs) -> str:
    """export_model fails with one line naming the problem, and tmp_path is left as it was: no output folder
    (nor any change to an existing one), no .partial folder, no probe file."""
    out = output if output is not None else tmp_path / "out"
    before = _listing(tmp_path)
    with pytest.raises(SdOnnxError) as info:
        export_model(source, out, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 600, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert _listing(tmp_path) == before
    return message


@pytest.fixture(scope="module")
def sd1(tiny_checkpoint) -> tuple[Path, dict]:
    """The tiny SD 1.x fixture checkpoint and its state dict."""
    ckpt = tiny_checkpoint("sd1")
    return ckpt, load_checkpoint(ckpt).state_dict


def _with_yaml(path: Path, like: Path) -> Path:
    shutil.copy(like.with_suffix(".yaml"), path.with_suffix(".yaml"))
    return path


def _same_tensors(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------------------------------------
# unreadable inputs


def test_missing_file(tmp_path):
    assert_refused(tmp_path / "absent.ckpt", tmp_path, "checkpoint not found", "absent.ckpt")


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "models").mkdir()
    assert_refused(tmp_path / "models", tmp_path, "not a diffusers model")


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_truncated_ckpt(layout, sd1, tmp_path):
    ckpt, sd = sd1
    if layout == "zip":
        data = ckpt.read_bytes()
    else:
        whole = tmp_path / "whole.ckpt"
        torch.save({"state_dict": sd}, whole, _use_new_zipfile_serialization=False)
        data = whole.read_bytes()
        whole.unlink()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    assert_refused(cut, tmp_path, "cut.ckpt:", "truncated or corrupt" if layout == "zip" else "checkpoint")


def _zip_without_torch_data(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "not a torch archive")


GARBAGE = {
    "random-bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(64 * 1024)),
    "text": lambda p: p.write_text("this is a text file, not a checkpoint\nsecond line\n"),
    "yaml": lambda p: p.write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"),
    "empty": lambda p: p.write_bytes(b""),
    "zip-without-data.pkl": _zip_without_torch_data,
}


@pytest.mark.parametrize("kind", GARBAGE)
def test_garbage_ckpt(kind, tmp_path):
    bad = tmp_path / "model.ckpt"
    GARBAGE[kind](bad)
    message = assert_refused(bad, tmp_path, "model.ckpt:")
    assert "checkpoint" in message


def _truncated_safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.randn(64, 64), "b": torch.randn(10)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


CORRUPT_SAFETENSORS = {
    "random-bytes": lambda p: p.write_bytes(np.random.default_rng(1).bytes(4096)),
    "truncated": _truncated_safetensors,
    "header-past-end": lambda p: p.write_bytes((10**6).to_bytes(8, "little") + b'{"a": 1}'),
    "bad-json": lambda p: p.write_bytes((9).to_bytes(8, "little") + b"{not json"),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("kind", CORRUPT_SAFETENSORS)
def test_corrupt_safetensors(kind, tmp_path):
    bad = tmp_path / "model.safetensors"
    CORRUPT_SAFETENSORS[kind](bad)
    assert_refused(bad, tmp_path, "model.safetensors: not a readable .safetensors file")


# ----------------------------------------------------------------------------------------------------------
# malicious pickles: refused, nothing executed


class _Payload:
    """Unpickles as call(*args): what a malicious checkpoint does to plain pickle / torch.load(weights_only=False)."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


PAYLOADS = {
    # payload -> (callable, args for a marker path, the global's name as the error message must give it)
    "os.system": lambda m: (os.system, (f"touch '{m}'",), f"{os.system.__module__}.system"),
    "builtins.exec": lambda m: (builtins.exec, (f"open({str(m)!r}, 'w').close()",), "exec"),
    "builtins.open": lambda m: (builtins.open, (str(m), "w"), f"{builtins.open.__module__}.open"),
}
FORMATS = ("zip", "legacy", "pickle-protocol-2")


def _write_malicious(path: Path, fmt: str, payload: _Payload) -> None:
    data = {"state_dict": {"w": torch.zeros(2)}, "global_step": 1, "extra": payload}
    if fmt == "zip":
        torch.save(data, path)
    elif fmt == "legacy":
        torch.save(data, path, _use_new_zipfile_serialization=False)
    else:  # plain pickle has no persistent ids for tensors (it would reduce them through a torch global first)
        path.write_bytes(pickle.dumps({"state_dict": {"w": [0.0, 0.0]}, "extra": payload}, protocol=2))


def _unsafe_load(path: Path, fmt: str) -> None:
    """The control: loading the same file the unsafe way does run the payload."""
    if fmt == "pickle-protocol-2":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_malicious_pickle_is_refused(fmt, payload, tmp_path):
    marker = tmp_path / "pwned"
    call, args, name = PAYLOADS[payload](marker)
    bad = tmp_path / "evil.ckpt"
    _write_malicious(bad, fmt, _Payload(call, args))
    assert zipfile.is_zipfile(bad) == (fmt == "zip")

    message = assert_refused(bad, tmp_path, "evil.ckpt: refused to load", f"'{name}'")
    assert not marker.exists()
    with pytest.raises(SdOnnxError, match="refused to load"):
        load_checkpoint(bad)
    assert not marker.exists(), message

    _unsafe_load(bad, fmt)
    assert marker.exists(), "control: the payload should run when loaded without restrictions"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [4, pickle.HIGHEST_PROTOCOL])
def test_plain_pickle_of_new_protocol_is_refused(protocol, tmp_path):
    """pickle.dump's default protocols (FRAME, STACK_GLOBAL) are refused by torch before any global is read:
    the message cannot name the global, but nothing runs."""
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"extra": _Payload(os.system, (f"touch '{marker}'",))}, protocol=protocol))
    assert_refused(bad, tmp_path, "evil.ckpt:")
    assert not marker.exists()
    pickle.loads(bad.read_bytes())
    assert marker.exists()


def test_cli_reports_a_refused_checkpoint_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    _write_malicious(bad, "zip", _Payload(os.system, (f"touch '{marker}'",)))
    assert main(["export", str(bad), "-o", str(tmp_path / "out"), "-q"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sd-onnx: error: evil.ckpt: refused to load")
    assert "posix.system" in err or "nt.system" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# readable files that are not (complete) SD checkpoints


@pytest.mark.parametrize("drop, fragments", [
    ("model.diffusion_model.out.2.weight", ("unet is missing 1 weight", "conv_out.weight")),
    ("model.diffusion_model.output_blocks.1.0.", ("unet is missing",)),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", ("unet is missing 1 weight",)),
    ("first_stage_model.decoder.up.1.block.0.nin_shortcut.weight", ("vae is missing 1 weight",)),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", ("text_encoder is missing 1 weight",)),
    (UNET_KEY, ("not a Stable Diffusion checkpoint", UNET_KEY)),
    (VAE_KEY, ("not a Stable Diffusion checkpoint", VAE_KEY)),
])
def test_missing_weights(drop, fragments, sd1, tmp_path):
    from safetensors.torch import save_file

    ckpt, sd = sd1
    kept = {k: v.contiguous() for k, v in sd.items() if not k.startswith(drop)}
    assert len(kept) < len(sd)
    source = _with_yaml(tmp_path / "partial.safetensors", ckpt)
    save_file(kept, str(source))
    message = assert_refused(source, tmp_path, *fragments)
    assert '"' not in message  # the reason is not a quoted repr of a KeyError


def _small(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


def test_sdxl_like_checkpoint_is_an_unknown_family(tmp_path):
    from safetensors.torch import save_file

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({
        UNET_KEY: _small(4, 4, 3, 3), VAE_KEY: _small(4, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": _small(8, 8),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": _small(8, 4),
        "conditioner.embedders.1.model.token_embedding.weight": _small(8, 4),
    }, str(sdxl))
    assert_refused(sdxl, tmp_path, "unknown family", "SDXL")


@pytest.mark.parametrize("content, fragment", [
    ({"state_dict": {"encoder.weight": _small(2, 2)}}, "not a Stable Diffusion checkpoint"),
    ({"state_dict": {"epoch": 3, "lr": 0.1}}, "contains no tensors"),
    ([_small(2)], "holds a list"),
])
def test_checkpoint_of_no_family(content, fragment, tmp_path):
    other = tmp_path / "other.ckpt"
    torch.save(content, other)
    assert_refused(other, tmp_path, fragment)


# ----------------------------------------------------------------------------------------------------------
# output folder problems


def test_output_under_a_regular_file(sd1, tmp_path):
    """Works as root too, where permission bits do not stop writes."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a folder should be")
    assert_refused(sd1[0], tmp_path, "cannot write to", output=blocker / "model")
    assert blocker.is_file()


def test_output_in_read_only_folder(sd1, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("permission bits do not apply to this user (root); see test_output_under_a_regular_file")
        assert_refused(sd1[0], tmp_path, "cannot write to", str(parent), output=parent / "model")
    finally:
        parent.chmod(0o700)


def test_existing_output_needs_force(sd1, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    message = assert_refused(sd1[0], tmp_path, "already exists", "--force", output=out)
    assert "out" in message and (out / "old.txt").read_text() == "previous export"

    # --force replaces a model folder only: a folder of other files is refused, and kept as it was
    assert_refused(sd1[0], tmp_path, "not one (no model_index.json", output=out, force=True)
    (out / "model_index.json").write_text("{}")
    result = export_model(sd1[0], out, force=True)
    assert result.folder == out and (out / "model_index.json").is_file() and (out / "unet" / "model.onnx").is_file()
    assert not (out / "old.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .partial- or .old- folders left


# ----------------------------------------------------------------------------------------------------------
# odd but valid layouts load


@pytest.mark.parametrize("written, named", [("safetensors", ".ckpt"), ("zip", ".safetensors"), ("pickle", ".bin")])
def test_format_comes_from_the_first_bytes_not_the_name(written, named, sd1, tmp_path):
    """A safetensors file renamed .ckpt once failed with "Unsupported operand 48" (its header length read as
    pickle opcodes)."""
    from safetensors.torch import save_file

    from sd_onnx.export.checkpoint import sniff_format

    path = tmp_path / f"renamed{named}"
    if written == "safetensors":
        save_file({k: v.contiguous() for k, v in sd1[1].items()}, str(path))
    else:
        torch.save({"state_dict": sd1[1]}, path, _use_new_zipfile_serialization=written == "zip")
    assert sniff_format(path) == written
    assert _same_tensors(load_checkpoint(path).state_dict, sd1[1])


def test_legacy_pickle_checkpoint_loads(tiny_checkpoint, tmp_path):
    sd = load_checkpoint(tiny_checkpoint("sd2")).state_dict
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": sd, "global_step": 875000}, legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy)
    ckpt = load_checkpoint(legacy)
    assert _same_tensors(ckpt.state_dict, sd)
    assert ckpt.global_step == 875000
    family, _ = detect_family(ckpt.state_dict, ckpt.global_step)
    assert family.name == "sd2"  # SD 2.0-base's global step means eps; any other step means 768-v


@pytest.mark.parametrize("wrapping", ["bare", "single", "double"])
def test_state_dict_wrapping(wrapping, sd1, tmp_path):
    sd = sd1[1]
    data = {"bare": dict(sd), "single": {"state_dict": sd, "global_step": 7},
            "double": {"state_dict": {"state_dict": sd}, "global_step": 7}}[wrapping]
    path = tmp_path / f"{wrapping}.ckpt"
    torch.save(data, path)
    ckpt = load_checkpoint(path)
    assert _same_tensors(ckpt.state_dict, sd)
    assert ckpt.global_step == (None if wrapping == "bare" else 7)


@pytest.fixture
def fake_lightning():
    """A stand-in pytorch_lightning.callbacks.model_checkpoint module, present only while the test saves."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    saved = {n: sys.modules.get(n) for n in names}
    modules = {n: types.ModuleType(n) for n in names}
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    modules[names[-1]].ModelCheckpoint = cls
    sys.modules.update(modules)

    def remove():
        for n in names:
            if saved[n] is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = saved[n]

    yield cls, remove
    remove()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_lightning_model_checkpoint_global_loads(fmt, fake_lightning, tmp_path):
    """SD 1.x .ckpt files pickle Lightning's ModelCheckpoint class (as a dict key) beside the weights."""
    ModelCheckpoint, remove = fake_lightning
    callback = ModelCheckpoint()
    callback.__dict__.update({"monitor": None, "best_model_score": 0.25, "save_top_k": -1})
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3), "alphas": torch.rand(10)}
    data = {"state_dict": sd, "global_step": 470000, "epoch": 6,
            "callbacks": {ModelCheckpoint: {"best_model_score": 0.25, "best_model_path": "/x.ckpt"}},
            "callback_object": callback}
    path = tmp_path / "lightning.ckpt"
    torch.save(data, path, **({} if fmt == "zip" else {"_use_new_zipfile_serialization": False}))
    remove()
    if fmt == "zip":
        with zipfile.ZipFile(path) as z:
            pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    else:
        pkl = path.read_bytes()
    assert b"pytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint" in pkl
    assert "pytorch_lightning.callbacks.model_checkpoint" not in sys.modules

    ckpt = load_checkpoint(path)
    assert _same_tensors(ckpt.state_dict, sd)
    assert ckpt.global_step == 470000
    assert "pytorch_lightning" not in sys.modules  # the stub stood in; nothing was imported
