"""The ONNX Runtime optimized-graph cache: the second start loads the saved graph, and nothing stale or broken in
the cache can change a result or stop a run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from sd_onnx.runtime.providers import resolve_device
from sd_onnx.runtime.sessions import open_session, optimized_cache_dir


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SD_ONNX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SD_ONNX_NO_CACHE", raising=False)
    return tmp_path / "home"


@pytest.fixture
def model(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny model, free to touch and delete."""
    return Path(shutil.copytree(tiny_model("sd1"), tmp_path / "model"))


def unet_feeds(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
            "timestep": np.array([500, 500], dtype=np.int64),
            "encoder_hidden_states": rng.standard_normal((2, 77, 64), dtype=np.float32)}


def entries() -> list[Path]:
    root = optimized_cache_dir()
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def loaded_from(session) -> Path:
    return Path(session._session._model_path)


def test_second_start_loads_the_saved_graph_and_computes_the_same(home, model):
    cpu = resolve_device("cpu")
    first = open_session(model, "unet", cpu)
    assert loaded_from(first) == model / "unet" / "model.onnx"
    [entry] = entries()
    assert (entry / "model.onnx").is_file() and (entry / "model.onnx_data").is_file()
    assert json.loads((entry / "stamp.json").read_text())["source"] == str((model / "unet" / "model.onnx").resolve())
    second = open_session(model, "unet", cpu)
    assert loaded_from(second) == entry / "model.onnx"
    feeds = unet_feeds()
    np.testing.assert_allclose(second.run(feeds)[0], first.run(feeds)[0], rtol=0, atol=1e-5)
    assert not list(optimized_cache_dir().glob(".staging-*"))


def test_a_changed_model_is_optimized_afresh(home, model):
    """A re-exported or re-quantized model has other files: its stale entry is replaced, not loaded."""
    cpu = resolve_device("cpu")
    open_session(model, "unet", cpu)
    [entry] = entries()
    before = json.loads((entry / "stamp.json").read_text())
    source = model / "unet" / "model.onnx"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    session = open_session(model, "unet", cpu)
    assert loaded_from(session) == source  # not the stale graph
    [entry] = entries()
    assert json.loads((entry / "stamp.json").read_text()) != before
    assert loaded_from(open_session(model, "unet", cpu)) == entry / "model.onnx"


def test_a_damaged_entry_falls_back_to_the_model(home, model):
    cpu = resolve_device("cpu")
    reference = open_session(model, "unet", cpu).run(unet_feeds())[0]
    [entry] = entries()
    (entry / "model.onnx").write_bytes(b"not an onnx graph")
    session = open_session(model, "unet", cpu)
    assert loaded_from(session) == model / "unet" / "model.onnx"
    np.testing.assert_allclose(session.run(unet_feeds())[0], reference, rtol=0, atol=1e-5)
    assert not entry.exists()  # dropped; the next start saves it again
    open_session(model, "unet", cpu)
    assert entries() == [entry]


def test_no_room_on_disk_means_no_cache_and_a_warning(home, model, monkeypatch, capsys):
    import shutil as shutil_module

    usage = shutil_module.disk_usage(model)
    monkeypatch.setattr("sd_onnx.runtime.ort_cache.shutil.disk_usage", lambda _: usage._replace(free=1000))
    session = open_session(model, "unet", resolve_device("cpu"))
    assert session.run(unet_feeds())[0].shape == (2, 4, 8, 8)
    assert entries() == []
    assert "no room" in capsys.readouterr().err


def test_a_read_only_cache_folder_means_no_cache_and_a_warning(home, model, monkeypatch, capsys):
    home.mkdir()
    (home / "cache").write_text("a file where the cache folder should be")
    session = open_session(model, "unet", resolve_device("cpu"))
    assert session.run(unet_feeds())[0].shape == (2, 4, 8, 8)
    assert "not writable" in capsys.readouterr().err


def test_sd_onnx_no_cache_writes_nothing(home, model, monkeypatch):
    monkeypatch.setenv("SD_ONNX_NO_CACHE", "1")
    open_session(model, "unet", resolve_device("cpu"))
    open_session(model, "vae_decoder", resolve_device("cpu"))
    pytest.importorskip("openvino")
    open_session(model, "vae_decoder", resolve_device("openvino"))
    assert not (home / "cache").exists()


def test_entries_of_deleted_models_are_pruned(home, model, tmp_path):
    cpu = resolve_device("cpu")
    other = Path(shutil.copytree(model, tmp_path / "other"))
    open_session(model, "unet", cpu)
    [gone] = entries()
    shutil.rmtree(model)
    open_session(other, "unet", cpu)  # saving a new entry prunes the cache
    [kept] = entries()
    assert kept != gone and not gone.exists()


def test_each_component_gets_its_own_entry_and_an_int8_unet_none(home, model):
    """The int8 UNet runs at ORT_ENABLE_EXTENDED (ENABLE_ALL gave it nothing), so there is nothing to keep."""
    cpu = resolve_device("cpu")
    for component in ("text_encoder", "unet", "vae_decoder"):
        open_session(model, component, cpu)
    assert len(entries()) == 3
    meta_path = model / "sd_onnx.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("components", {}).setdefault("unet", {})["precision"] = "int8"
    meta_path.write_text(json.dumps(meta))
    shutil.rmtree(optimized_cache_dir())
    session = open_session(model, "unet", cpu)
    assert loaded_from(session) == model / "unet" / "model.onnx"
    assert entries() == []


def test_info_reports_what_the_caches_hold(home, model):
    from sd_onnx.info import format_report, machine_report

    assert machine_report()["cache_gb"] == 0
    open_session(model, "unet", resolve_device("cpu"))
    [entry] = entries()
    report = machine_report()
    assert report["cache_gb"] == pytest.approx(sum(p.stat().st_size for p in entry.iterdir()) / 1e9)
    assert f"in {home / 'cache'}" in format_report(report)
