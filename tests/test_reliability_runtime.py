"""#13 on the generate side: nothing lost, nothing half-written, no traceback. Signals and pipes go to real processes."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_onnx.cli import main
from sd_onnx.runtime import images as images_module
from sd_onnx.runtime.images import save_png
from sd_onnx.runtime.progress import Progress, end_line

ROOT = Path(__file__).parents[1]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd-onnx: error:"), err
    return err[0]


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    """The CLI as a user starts it from a terminal: SIGINT at its default even when pytest itself was started in
    the background by a non-interactive shell (`cmd &`), which starts it with SIGINT ignored, an inheritance that
    made the child ignore the test's Ctrl-C and finish all 100 images."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "sd_onnx", *args], env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def test_non_finite_prompt_weight_is_one_line_and_saves_nothing(tiny_model, tmp_path, capsys):
    """A weight past float range makes the emphasis NaN: A1111 stops with "A tensor with all NaNs was produced"."""
    out = tmp_path / "out"
    assert main(["generate", f"(a cat:1{'0' * 400})", "--model", str(tiny_model("sd1")), "--steps", "2", "--width", "64",
                 "--height", "64", "-o", str(out), "-q"]) == 2
    assert "NaN or infinite values" in _one_error_line(capsys)
    assert not list(out.glob("*.png"))


def test_nan_weight_in_the_unet_is_one_line_and_saves_nothing(tiny_model, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    folder = Path(shutil.copytree(tiny_model("sd1"), tmp_path / "nan-model"))
    path = folder / "unet" / "model.onnx"
    proto = onnx.load(str(path))
    init = next(t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4)
    weights = numpy_helper.to_array(init).copy()
    weights.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=1024)
    out = tmp_path / "out"
    assert main(["generate", "a cat", "--model", str(folder), "--steps", "2", "--width", "64", "--height", "64",
                 "-o", str(out), "-q"]) == 2
    assert "produced in the UNet" in _one_error_line(capsys)
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_stopped_batch_run_keeps_the_images_it_finished(tiny_model, tmp_path, sig, code, word):
    """Each image is saved as soon as its batch is decoded: a stop during batch k keeps batches 1..k-1."""
    out = tmp_path / "out"
    proc = _cli("generate", "a cat", "--model", str(tiny_model("sd1")), "--steps", "4", "--width", "64", "--height",
                "64", "--seed", "1", "--batch-count", "100", "-o", str(out), "-q",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.png"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    saved = sorted(out.glob("*.png"))
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == f"sd-onnx: {word}" and "Traceback" not in stderr
    assert 3 <= len(saved) < 100
    assert [str(p) for p in saved] == stdout.split()
    for p in saved:  # complete files only
        Image.open(p).load()
    assert not list(out.glob(".*"))


def test_two_runs_into_one_folder_never_overwrite_each_other(tiny_model, tmp_path):
    out = tmp_path / "out"
    args = ("generate", "a cat", "--model", str(tiny_model("sd1")), "--steps", "2", "--width", "64", "--height",
            "64", "--seed", "7", "--batch-count", "6", "-o", str(out), "-q")
    procs = [_cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    names = [line for stdout, _ in results for line in stdout.split()]
    assert len(names) == len(set(names)) == 12
    assert len(list(out.glob("*.png"))) == 12


def test_save_png_skips_taken_names_and_numbers(tmp_path):
    picture = Image.new("RGB", (8, 8), (10, 20, 30))
    (tmp_path / "00000-5.png").write_bytes(b"someone else's")
    (tmp_path / "00001-9.png").write_bytes(b"another run's")
    path = save_png(picture, tmp_path, 0, 5, "a cat\nSteps: 1, Sampler: Euler, Seed: 5")
    assert path.name == "00002-5.png"
    assert (tmp_path / "00000-5.png").read_bytes() == b"someone else's"
    assert Image.open(path).info["parameters"].startswith("a cat")


def test_a_failed_save_leaves_no_partial_png(tmp_path, monkeypatch):
    picture = Image.new("RGB", (8, 8))
    real_save = Image.Image.save

    def half_then_fail(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(images_module.SdOnnxError, match="No space left on device"):
        save_png(picture, tmp_path, 0, 1, "x")
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert list(tmp_path.iterdir()) == []


def test_broken_pipe_stops_printing_not_saving(tiny_model, tmp_path):
    out = tmp_path / "out"
    gen = _cli("generate", "a cat", "--model", str(tiny_model("sd1")), "--steps", "2", "--width", "64", "--height",
               "64", "--seed", "3", "--batch-count", "4", "-o", str(out), "-q",
               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.run(["head", "-1"], stdin=gen.stdout, capture_output=True, timeout=300)
    gen.stdout.close()
    stderr = gen.stderr.read().decode()
    gen.wait(timeout=300)
    assert gen.returncode == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert head.stdout.decode().strip().endswith("00000-3.png")
    assert len(list(out.glob("*.png"))) == 4

    info = _cli("info", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.run(["head", "-c", "20"], stdin=info.stdout, capture_output=True, timeout=120)
    info.stdout.close()
    stderr = info.stderr.read().decode()
    info.wait(timeout=120)
    assert info.returncode == 0 and "Traceback" not in stderr, stderr
    assert len(head.stdout) == 20


def test_a_prompt_with_invalid_utf8_is_one_line(tiny_model, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "sd_onnx", "generate", b"a \xff\xfe cat", "--model",
                           str(tiny_model("sd1")), "-o", str(tmp_path / "out"), "-q"],
                          env=env, capture_output=True, timeout=120)
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, err
    assert "not valid UTF-8" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--width", "51200"], "width 51200 is over the limit of 2048 px"),
    (["--height", "4096"], "height 4096 is over the limit"),
    (["--batch-size", "9"], "batch size must be between 1 and 8"),
    (["--batch-count", "101"], "batch count must be between 1 and 100"),
])
def test_sizes_and_batches_are_capped_as_in_a1111(tiny_model, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["generate", "a cat", "--model", str(tiny_model("sd1")), "-o", str(out), "-q", *args]) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


def test_the_size_cap_can_be_raised(monkeypatch):
    from sd_onnx.runtime.requests import GenerateRequest

    monkeypatch.setenv("SD_ONNX_MAX_SIZE", "4096")
    GenerateRequest("a cat", width=4096, height=64).validate()


def test_threads_must_be_at_least_one(tiny_model, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "a cat", "--model", str(tiny_model("sd1")), "--threads", "0"])
    assert stop.value.code == 2
    assert "--threads: must be at least 1" in capsys.readouterr().err


def test_output_that_is_a_file_says_so(tiny_model, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert main(["generate", "a cat", "--model", str(tiny_model("sd1")), "--steps", "1", "--width", "64",
                 "--height", "64", "-o", str(target), "-q"]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    assert target.read_text() == "keep me"


def test_an_interrupt_starts_its_own_line_after_a_progress_bar():
    stream = io.StringIO()
    bar = Progress("sampling", enabled=True, stream=stream)
    bar(0, 10)
    end_line()
    stream.write("sd-onnx: interrupted\n")
    assert stream.getvalue().splitlines()[-1] == "sd-onnx: interrupted"
    bar2 = Progress("sampling", enabled=True, stream=stream)
    bar2(0, 1)  # a finished bar ends its own line: no blank line after it
    end_line()
    assert not stream.getvalue().endswith("\n\n")
