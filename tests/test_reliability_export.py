"""Issue #13: export and quantize under odd sizes, stale variants, kills, full disks and bad folders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from sd_onnx.cli import main
from sd_onnx.errors import SdOnnxError

FAMILIES = ("sd1", "sd2", "sd2-v")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd-onnx: error: "), err
    return err[0]


# ----------------------------------------------------------------------------------------------------------
# 3. sizes that are multiples of 8 but not of 64


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_at_sizes_not_a_multiple_of_64(family, tiny_model, tmp_path):
    """72x136 px is latent 9x17: the tiny UNet downsamples 9 -> 5, and its up-block must come back to 9, not 10."""
    from PIL import Image

    out = tmp_path / "out"
    rc = main(["generate", "a fox", "--model", str(tiny_model(family)), "--steps", "2", "--width", "72",
               "--height", "136", "--seed", "1", "--precision", "fp32", "-o", str(out), "-q"])
    assert rc == 0
    [png] = out.glob("*.png")
    assert Image.open(png).size == (72, 136)


# ----------------------------------------------------------------------------------------------------------
# shared: a private base folder, a bf16 variant of its UNet, small filesystems


FAST = dict(calibration_prompts=1, calibration_steps=2, calibration_size=64, fidelity_prompts=1, fidelity_steps=1,
            fidelity_size=64)


def _quantize(folder: Path, precision: str = "bf16", output: Path | None = None, log=lambda m: None, **kw) -> Path:
    from sd_onnx.quantize.variant import QuantizeOptions, quantize_model

    kw = {**FAST, "any_cpu": True, "components": ("unet",), **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_model(folder, QuantizeOptions(precision, **kw), output, log=log).folder


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    return Path(shutil.copytree(tiny_model("sd1"), root / "M"))


@pytest.fixture(scope="module")
def bf16(base) -> Path:
    return _quantize(base)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def small_fs(tmp_path):
    """small_fs(megabytes) -> the mount point of a fresh tmpfs of that size (skipped where mounting is refused)."""
    mounted = []

    def make(megabytes: int) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}M", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------------------------------------
# 1. a variant of another export of its base is not used


def test_reexport_leaves_variants_stale_and_generate_ignores_them(base, bf16, tiny_checkpoint, tmp_path, capsys,
                                                                    monkeypatch):
    from sd_onnx.errors import ModelFolderError
    from sd_onnx.export.synthetic import write_checkpoint
    from sd_onnx.home import read_metadata
    from sd_onnx.runtime import providers
    from sd_onnx.runtime.variants import choose_variant

    model = Path(shutil.copytree(base, tmp_path / "M"))
    variant = Path(shutil.copytree(bf16, tmp_path / "M-bf16"))
    sha = read_metadata(model)["source"]["sha256"]
    assert read_metadata(variant)["variant_of"]["base"] == f"sha256:{sha}"
    bf16_cpu = ["AVX2", "AVX512-BF16"]
    assert choose_variant(model, "auto", "auto", bf16_cpu)[0] == variant

    other = tmp_path / "B.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_checkpoint(other, "sd1", seed=8)
    assert main(["export", str(other), "-o", str(model), "--force"]) == 0
    err = capsys.readouterr().err
    assert "left stale: M-bf16" in err, err

    notices = []
    assert choose_variant(model, "auto", "auto", bf16_cpu, notice=notices.append)[0] == model
    assert len(notices) == 1 and "ignoring M-bf16" in notices[0] and "\n" not in notices[0]
    with pytest.raises(ModelFolderError, match="M-bf16 is stale") as info:
        choose_variant(model, "bf16", "auto", bf16_cpu)
    assert "\n" not in str(info.value)

    # the CLI: auto falls back to the fp32 model with one notice line; asked for, one error line
    real = providers.cpu_info()
    monkeypatch.setattr(providers, "cpu_info", lambda: {**real, "flags": [*real["flags"], "AVX512-BF16"]})
    args = ["generate", "a fox", "--model", str(model), "--steps", "1", "--width", "64", "--height", "64",
            "-o", str(tmp_path / "out"), "-q", "--device", "auto"]  # --device cpu never takes bf16 (ORT widens it)
    assert main(args) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "ignoring M-bf16" in line] and not [line for line in err if "bf16 (" in line]
    assert main([*args, "--precision", "bf16"]) == 2
    assert "is stale" in _one_error_line(capsys)

    # a variant made before variants recorded their base: stale when the base was written after it
    meta = read_metadata(variant)
    del meta["variant_of"]["base"]
    (variant / "sd_onnx.json").write_text(json.dumps(meta))
    made = (model / "sd_onnx.json").stat().st_mtime - 60
    os.utime(variant / "sd_onnx.json", (made, made))
    assert choose_variant(model, "auto", "auto", bf16_cpu, notice=notices.append)[0] == model


# ----------------------------------------------------------------------------------------------------------
# 2, 12, 19c. outputs that --force would destroy are refused before any work


def test_output_holding_or_inside_an_input_is_refused(tiny_checkpoint, base, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    ckpt = Path(shutil.copy(tiny_checkpoint("sd1"), folder / "X.ckpt"))
    shutil.copy(tiny_checkpoint("sd1").with_suffix(".yaml"), folder / "X.yaml")
    (folder / "notes.txt").write_text("mine")
    model = Path(shutil.copytree(base, tmp_path / "M"))
    before = _listing(tmp_path)

    assert main(["export", str(ckpt), "-o", str(folder), "--force"]) == 2
    assert "would replace the input" in _one_error_line(capsys)
    assert main(["export", str(model), "-o", str(model / "sub"), "--force"]) == 2  # a diffusers-style folder input
    assert "inside the input" in _one_error_line(capsys)
    assert main(["quantize", str(model), "--int8", "-o", str(model), "--force"]) == 2
    assert "would replace the input" in _one_error_line(capsys)
    assert main(["quantize", str(model), "--int8", "-o", str(tmp_path), "--force"]) == 2
    assert "would replace the input" in _one_error_line(capsys)

    other = tmp_path / "other"  # a folder of the user's that is not a model folder
    other.mkdir()
    (other / "photo.png").write_bytes(b"png")
    before = _listing(tmp_path)
    assert main(["export", str(ckpt), "-o", str(other), "--force"]) == 2
    assert "--force replaces model folders only" in _one_error_line(capsys)
    assert main(["quantize", str(model), "--int8", "-o", str(other), "--force"]) == 2
    assert "--force replaces model folders only" in _one_error_line(capsys)

    # 12: -o . (here a model folder, so only "the current folder" stops it)
    monkeypatch.chdir(model)
    assert main(["export", str(ckpt), "-o", ".", "--force"]) == 2
    assert "is the current folder" in _one_error_line(capsys)
    monkeypatch.chdir(tmp_path)

    # 19c: an existing file
    (tmp_path / "a-file").write_text("x")
    before = _listing(tmp_path)
    assert main(["export", str(ckpt), "-o", str(tmp_path / "a-file")]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    assert main(["quantize", str(model), "--int8", "-o", str(tmp_path / "a-file"), "--force"]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    assert _listing(tmp_path) == before
    assert (folder / "notes.txt").read_text() == "mine" and ckpt.is_file() and (folder / "X.yaml").is_file()


# ----------------------------------------------------------------------------------------------------------
# 5. killed exports: SIGTERM removes the partial folder, SIGKILL's is cleaned by the next export


def _start_export(ckpt: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sd_onnx", "export", str(ckpt), "-o", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_partial(proc: subprocess.Popen, parent: Path, timeout: float = 120.0) -> Path:
    """The export's .partial folder, once the text encoder is in it (mid-export)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in parent.glob(".*.partial-*") if (p / "text_encoder" / "model.onnx").is_file()]
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"export ended before it was killed: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("export never reached its second component")


def test_sigterm_mid_export_removes_the_partial_folder(tiny_checkpoint, tmp_path):
    out = tmp_path / "models" / "M"
    proc = _start_export(tiny_checkpoint("sd1"), out)
    partial = _wait_for_partial(proc, out.parent)
    assert str(proc.pid) in partial.name
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "sd-onnx: terminated"
    assert list(out.parent.iterdir()) == []


def test_killed_export_leftovers_are_not_models_and_are_cleaned(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from sd_onnx.home import find_model, installed_models

    monkeypatch.setenv("SD_ONNX_HOME", str(tmp_path))
    models = tmp_path / "models"
    proc = _start_export(tiny_checkpoint("sd1"), models / "M")
    partial = _wait_for_partial(proc, models)
    proc.kill()
    proc.wait(timeout=60)
    assert partial.is_dir()
    # a quantize killed after it wrote its metadata: a complete-looking folder, but hidden
    dead = _dead_pid()
    quantize_partial = models / f".N-int8.partial-{dead}-0123456789ab"
    quantize_partial.mkdir()
    (quantize_partial / "model_index.json").write_text("{}")
    (quantize_partial / "sd_onnx.json").write_text(json.dumps({"precision": "int8", "variant_of": {"folder": "N"}}))
    # a replacement killed between its two renames: the previous folder is only in .old
    old = models / f".P.old-{dead}-0123456789ab"
    old.mkdir()
    (old / "model_index.json").write_text("{}")
    legacy = models / ".Q.partial-0123456789ab"  # named before the pid was part of the name, a day old
    legacy.mkdir()
    os.utime(legacy, (time.time() - 2 * 86400,) * 2)
    assert installed_models() == []

    assert main(["export", str(tiny_checkpoint("sd1")), "-o", str(models / "R"), "-q"]) == 0
    assert sorted(p.name for p in models.iterdir()) == ["P", "R"]
    assert (models / "P" / "model_index.json").is_file()
    assert installed_models() == [models / "P", models / "R"] and find_model("R") == models / "R"


# ----------------------------------------------------------------------------------------------------------
# 10. a full disk: one line up front where the size is known, one line and nothing left when writing fails


def test_export_to_a_disk_too_small_is_refused_up_front(tiny_checkpoint, small_fs, capsys):
    disk = small_fs(4)
    assert main(["export", str(tiny_checkpoint("sd1")), "-o", str(disk / "M"), "-q"]) == 2
    line = _one_error_line(capsys)
    assert "not enough free space" in line and "MB needed" in line, line
    assert list(disk.iterdir()) == []


def test_disk_full_while_exporting_is_one_line_and_leaves_nothing(tiny_checkpoint, small_fs, capsys, monkeypatch):
    from sd_onnx import staging
    from sd_onnx.export import exporter

    monkeypatch.setattr(staging, "check_free_space", lambda parent, need: None)  # as if the estimate were low
    monkeypatch.setattr(exporter, "check_free_space", lambda parent, need: None)
    disk = small_fs(6)
    assert main(["export", str(tiny_checkpoint("sd1")), "-o", str(disk / "M"), "-q"]) == 2
    assert "no space left" in _one_error_line(capsys)
    assert list(disk.iterdir()) == []


def test_quantize_to_a_disk_too_small(base, small_fs, capsys, monkeypatch):
    from sd_onnx import staging
    from sd_onnx.quantize import variant

    disk = small_fs(8)
    assert main(["quantize", str(base), "--bf16", "--any-cpu", "-o", str(disk / "V")]) == 2
    line = _one_error_line(capsys)
    assert "not enough free space" in line, line
    monkeypatch.setattr(staging, "check_free_space", lambda parent, need: None)
    monkeypatch.setattr(variant, "check_free_space", lambda parent, need: None)
    with pytest.raises(SdOnnxError, match="no space left") as info:
        _quantize(base, output=disk / "V", components=None)
    assert "\n" not in str(info.value)
    assert list(disk.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# 11. --opset out of range


@pytest.mark.parametrize("opset", ["5", "13", "99"])
def test_opset_out_of_range_is_one_line_before_any_work(opset, tiny_checkpoint, tmp_path, capsys):
    assert main(["export", str(tiny_checkpoint("sd1")), "-o", str(tmp_path / "M"), "--opset", opset]) == 2
    assert f"--opset {opset} is not supported: choose 14.." in _one_error_line(capsys)
    assert capsys.readouterr().out == "" and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# 13, 18. quantize of a folder without vae_encoder; every file of a variant has the usual mode


def test_quantize_skips_a_missing_vae_encoder_and_writes_usual_modes(base, tmp_path, capsys):
    folder = Path(shutil.copytree(base, tmp_path / "no-encoder"))
    shutil.rmtree(folder / "vae_encoder")
    assert main(["quantize", str(folder), "--fp16", "--components", "vae_encoder", "-q"]) == 2
    assert "has no vae_encoder" in _one_error_line(capsys)

    lines = []
    variant = _quantize(folder, "fp16", components=None, log=lines.append)
    assert [line for line in lines if line.startswith("skipping vae_encoder")]
    assert not (variant / "vae_encoder").exists()
    meta = json.loads((variant / "sd_onnx.json").read_text())
    assert "vae_encoder" not in meta["components"] and meta["components"]["unet"]["precision"] == "fp16"
    probe = tmp_path / "probe"
    probe.write_text("")
    modes = {str(p.relative_to(variant)): oct(p.stat().st_mode & 0o777) for p in variant.rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct(probe.stat().st_mode & 0o777)}, modes


# ----------------------------------------------------------------------------------------------------------
# 14. broken metadata: one line before any work; `info` lists the folder as broken


BROKEN = [
    pytest.param("sd_onnx.json", "null", "holds null, not a JSON object", id="meta-null"),
    pytest.param("sd_onnx.json", "[]", "holds list, not a JSON object", id="meta-list"),
    pytest.param("sd_onnx.json", '{"scaling_factor": "abc"}', "'scaling_factor' must be a number", id="scaling-str"),
    pytest.param("sd_onnx.json", '{"scaling_factor": 0}', "'scaling_factor' must be a positive", id="scaling-0"),
    pytest.param("scheduler/scheduler_config.json", '{"beta_start": ', "not valid JSON", id="sched-bad-json"),
    pytest.param("scheduler/scheduler_config.json", '{"num_train_timesteps": "1000"}',
                 "'num_train_timesteps' must be an integer", id="sched-wrong-type"),
    pytest.param("scheduler/scheduler_config.json", '"x"', "holds str, not a JSON object", id="sched-str"),
]


@pytest.fixture(scope="module")
def scratch(base, tmp_path_factory) -> Path:
    return Path(shutil.copytree(base, tmp_path_factory.mktemp("broken") / "B"))


@pytest.mark.parametrize("name, content, fragment", BROKEN)
def test_broken_metadata_is_one_line(name, content, fragment, scratch, tmp_path, capsys, monkeypatch):
    from sd_onnx.errors import ModelFolderError
    from sd_onnx.home import check_folder

    original = (scratch / name).read_text()
    (scratch / name).write_text(content)
    try:
        with pytest.raises(ModelFolderError, match=fragment):
            check_folder(scratch)
        assert main(["generate", "a fox", "--model", str(scratch), "--steps", "1", "--width", "64", "--height",
                     "64", "-o", str(tmp_path / "out"), "-q"]) == 2
        assert fragment in _one_error_line(capsys)
        assert not (tmp_path / "out").exists()
        # info lists it as broken, with the reason, and goes on
        monkeypatch.setenv("SD_ONNX_HOME", str(tmp_path / "home"))
        (tmp_path / "home" / "models").mkdir(parents=True)
        (tmp_path / "home" / "models" / "bad").symlink_to(scratch)
        assert main(["info"]) == 0
        out = capsys.readouterr().out
        assert "broken:      bad: " in out and fragment in out, out
    finally:
        (scratch / name).write_text(original)


# ----------------------------------------------------------------------------------------------------------
# 19b. a variant whose original was deleted is a model of its own


def test_standalone_variant_is_listed_and_found(bf16, tmp_path, monkeypatch):
    from sd_onnx.home import find_model, installed_models
    from sd_onnx.info import format_report, machine_report

    monkeypatch.setenv("SD_ONNX_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    alone = Path(shutil.copytree(bf16, tmp_path / "models" / bf16.name))
    assert installed_models() == [alone] and find_model(None) == alone
    report = machine_report()
    assert report["models"] == [alone.name] and alone.name in format_report(report)


def test_export_warns_about_non_finite_weights(tiny_checkpoint, tmp_path, capsys):
    """#13 item 4: a checkpoint with a NaN tensor exports (the file is what it is) but says so on stderr."""
    import torch

    from sd_onnx.cli import main

    source = tmp_path / "nan.ckpt"
    data = torch.load(tiny_checkpoint("sd1"), weights_only=True)
    weights = data.get("state_dict", data)
    key = next(k for k in weights if k.startswith("model.diffusion_model.") and weights[k].is_floating_point())
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = float("nan")
    torch.save(data, source)
    shutil.copy(tiny_checkpoint("sd1").with_suffix(".yaml"), source.with_suffix(".yaml"))
    assert main(["export", str(source), "-o", str(tmp_path / "out"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "hold NaN or infinite values" in err and key in err
