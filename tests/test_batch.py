"""`sd-onnx batch`: images equal `generate`'s, exactly once, through a killed driver, worker or Ray actor."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sd_onnx.batch import MANIFEST, run_batch
from sd_onnx.cli import main

ROOT = Path(__file__).resolve().parents[1]
# 3 lines, 6 images: a plain one, a batch of 2 (batch_size), and 3 batches (n_iter), at 64x64 with 2 steps
JOB = [
    {"prompt": "a red cube", "seed": 11, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler a"},
    {"prompt": "a blue (sphere:1.2)", "negative_prompt": "blurry", "seed": 20, "steps": 2, "width": 64,
     "height": 64, "batch_size": 2, "cfg_scale": 5, "sampler_name": "DPM++ 2M"},
    {"prompt": "a green cone", "seed": 30, "steps": 2, "width": 64, "height": 64, "n_iter": 3,
     "sampler_name": "Euler"},
]



def _tiny_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


TINY_PNG = _tiny_png()  # a valid init image, for lines whose mistake is elsewhere


def write_job(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def manifest(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / MANIFEST).read_text().splitlines()]


def check_complete(outdir: Path, n: int = 6) -> list[dict]:
    records = manifest(outdir)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == n, keys  # every image once, none twice
    assert sorted(p.name for p in outdir.glob("*.png")) == sorted(r["file"] for r in records)
    assert not list(outdir.glob(".*.partial"))
    return records


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("sd1")


@pytest.fixture(scope="module")
def generated(model, tmp_path_factory) -> dict[tuple[str, int], bytes]:
    """`sd-onnx generate` of each job line with the same parameters: (prompt, seed) -> PNG bytes. The API's
    default noise source is A1111's GPU one (to_request gets "gpu", as `serve` passes), hence --randn-source gpu."""
    out = tmp_path_factory.mktemp("generated")
    flags = {"negative_prompt": "-n", "seed": "--seed", "steps": "--steps", "width": "--width", "height": "--height",
             "batch_size": "--batch-size", "n_iter": "--batch-count", "cfg_scale": "--cfg", "sampler_name": "--sampler"}
    pictures = {}
    for i, line in enumerate(JOB):
        folder = out / str(i)
        argv = ["generate", line["prompt"], "--model", str(model), "-o", str(folder), "--randn-source", "gpu", "-q",
                "--threads", "1"]
        for key, flag in flags.items():
            if key in line:
                argv += [flag, str(line[key])]
        assert main(argv) == 0
        for png in folder.glob("*.png"):
            pictures[(line["prompt"], int(png.stem.split("-")[1]))] = png.read_bytes()
    assert len(pictures) == 6
    return pictures


def test_local_batch_equals_generate_and_resumes(model, generated, tmp_path):
    """(1) 6 images, each byte-equal to `generate`'s; a re-run redoes nothing."""
    job = write_job(tmp_path / "jobs.jsonl", JOB)
    out = tmp_path / "out"
    summary = run_batch(job, out, str(model), workers=1)
    assert (summary.generated, summary.images) == (6, 6)
    records = check_complete(out)
    for r in records:
        assert r["worker"].startswith("local-") and r["seconds"] > 0
        prompt = JOB[r["line"] - 1]["prompt"]
        assert (out / r["file"]).read_bytes() == generated[(prompt, r["seed"])], r
    again = run_batch(job, out, str(model), workers=1)
    assert (again.generated, again.skipped) == (0, 6)
    assert manifest(out) == records


def test_reconcile_adopts_a_finished_png_and_removes_a_broken_one(model, tmp_path):
    """A PNG written just before a crash (no manifest line) is adopted; a truncated one is removed and remade; a
    torn manifest line and a temporary file are cleaned up."""
    job = write_job(tmp_path / "jobs.jsonl", JOB[2:])
    out = tmp_path / "out"
    run_batch(job, out, str(model), workers=1)
    records = manifest(out)
    good, bad = out / records[1]["file"], out / records[2]["file"]
    good_bytes = good.read_bytes()
    bad.write_bytes(bad.read_bytes()[:100])
    text = (out / MANIFEST).read_text().splitlines()
    (out / MANIFEST).write_text(text[0] + "\n" + text[1][:20])  # crash while appending line 2, before line 3
    (out / ".deadbeef.partial").write_bytes(b"half")
    summary = run_batch(job, out, str(model), workers=1)
    assert (summary.skipped, summary.adopted, summary.removed, summary.generated) == (1, 1, 1, 1)
    check_complete(out, 3)
    assert good.read_bytes() == good_bytes


def _cli(job: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sd_onnx", "batch", str(job), "-o", str(out), "--model", str(model), *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _wait_for_lines(out: Path, n: int, proc, limit: float = 120) -> int:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if (out / MANIFEST).exists():
            count = len((out / MANIFEST).read_text().splitlines())
            if count >= n:
                return count
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the batch made no progress")


def test_killed_driver_resumes_exactly_once(model, tmp_path):
    """(2) SIGKILL a real `python -m sd_onnx batch` after 2 images, re-run: 6 images, none twice, the finished ones
    untouched (same inode and mtime, same manifest lines)."""
    job = write_job(tmp_path / "jobs.jsonl", [{**line, "steps": 12} for line in JOB])  # slow enough to interrupt
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli(job, out, model, "--workers", "1"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        done = _wait_for_lines(out, 2, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its worker, should it not have noticed the driver's end yet
        except ProcessLookupError:
            pass
    first = manifest(out)
    assert 2 <= len(first) < 6, "the driver finished before it was killed: nothing was tested"
    assert done <= len(first)
    stamps = {r["file"]: ((out / r["file"]).stat().st_ino, (out / r["file"]).stat().st_mtime_ns) for r in first}
    rerun = subprocess.run(_cli(job, out, model, "--workers", "1"), env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    records = check_complete(out)
    assert records[:len(first)] == first
    for name, stamp in stamps.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp
    assert f"{len(first)} already done" in rerun.stderr or "adopted" in rerun.stderr, rerun.stderr


def kill_first_worker():
    """An on_image callback that SIGKILLs the worker process of the first finished image, once, and the list it
    records that pid in."""
    killed = []

    def kill_once(record):
        if not killed:
            pid = int(record["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    return kill_once, killed


def test_killed_worker_process_is_replaced(model, tmp_path):
    """(3) A worker killed mid-job (with units in flight) is replaced; the job still ends with all 6 images."""
    job = write_job(tmp_path / "jobs.jsonl", JOB)
    out = tmp_path / "out"
    kill_once, killed = kill_first_worker()
    summary = run_batch(job, out, str(model), workers=1, on_image=kill_once)
    records = check_complete(out)
    assert summary.retried >= 1
    assert len({r["worker"] for r in records}) == 2  # the first worker's image(s), then its replacement's


@pytest.mark.parametrize("lines,message", [
    (["{\"prompt\": \"ok\", \"steps\": 2}", "{\"prompt\": \"x\", "], "jobs.jsonl:2: not JSON"),
    (["{\"prompt\": \"x\", \"steps\": \"many\"}"], "jobs.jsonl:1: field 'steps'"),
    (["{\"prompt\": \"x\", \"stepz\": 3}"], "jobs.jsonl:1: unknown field 'stepz'"),
    (["[1, 2]"], "jobs.jsonl:1: expected a JSON object"),
    (["{\"prompt\": \"x\", \"width\": 65}"], "jobs.jsonl:1: width must be a multiple of 8"),
    (["{\"prompt\": \"x\", \"init_images\": [\"%%not base64%%\"]}"], "jobs.jsonl:1: init_images[0]: Invalid encoded image"),
    (["{\"prompt\": \"x\", \"init_images\": [\"aGVsbG8=\"]}"], "jobs.jsonl:1: init_images[0]:"),
    (["{\"prompt\": \"x\", \"init_images\": []}"], "jobs.jsonl:1: init_images: img2img needs one"),
    ([json.dumps({"prompt": "x", "init_images": [TINY_PNG], "stepz": 3})],
     "jobs.jsonl:1: unknown field 'stepz' (not an A1111 img2img field)"),
    ([json.dumps({"prompt": "x", "init_images": [TINY_PNG], "enable_hr": True})],
     "jobs.jsonl:1: hires fix is a txt2img option"),
])
def test_bad_input_is_one_line_and_writes_nothing(model, tmp_path, capsys, lines, message):
    job = write_job(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "out"
    assert main(["batch", str(job), "-o", str(out), "--model", str(model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_missing_model_writes_nothing(tmp_path, capsys):
    job = write_job(tmp_path / "jobs.jsonl", JOB[:1])
    out = tmp_path / "out"
    assert main(["batch", str(job), "-o", str(out), "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model folder not found" in err[0]
    assert not out.exists()


def test_prompt_file_with_seeds(model, tmp_path, capsys):
    """A prompt file and --seeds A-B: each prompt once per seed; --params sets the other fields."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na green cone\n")
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "-o", str(out), "--model", str(model), "--seeds", "5-6", "--workers", "1",
                 "--params", json.dumps({"steps": 1, "width": 64, "height": 64})]) == 0
    records = check_complete(out, 4)
    assert sorted((r["line"], r["seed"]) for r in records) == [(1, 5), (1, 6), (3, 5), (3, 6)]
    assert len(capsys.readouterr().out.splitlines()) == 4


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


def test_ray_batch_equals_generate_and_retries_a_killed_actor(model, generated, ray_cluster, tmp_path):
    """(4) On a local 2-CPU Ray cluster, 2 actors: 6 images byte-equal to `generate`'s; the actor that made the first
    image is killed while it has units in flight, restarted by Ray, and its units re-run."""
    job = write_job(tmp_path / "jobs.jsonl", JOB)
    out = tmp_path / "out"
    kill_once, killed = kill_first_worker()
    summary = run_batch(job, out, str(model), workers=2, ray_address=None, on_image=kill_once)
    assert summary.generated == 6
    records = check_complete(out)
    for r in records:
        prompt = JOB[r["line"] - 1]["prompt"]
        assert (out / r["file"]).read_bytes() == generated[(prompt, r["seed"])], r
    assert killed and all(r["worker"].startswith("ray-") for r in records)
    first = records[0]["worker"].split(":")[0]  # ray-N: the killed actor's index; Ray restarted it and re-ran its calls
    assert any(r["worker"].startswith(first + ":") and not r["worker"].endswith(f":{killed[0]}") for r in records)


def _picture(path: Path, flip: bool = False) -> str:
    """A 64x64 noise picture saved to `path`, and its base64 (as an A1111 client sends init_images)."""
    import numpy as np

    pixels = (np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels[:, ::-1] if flip else pixels).save(path)
    return base64.b64encode(path.read_bytes()).decode()


def test_img2img_line_equals_img2img(model, tmp_path):
    """A line with init_images is an img2img request, run by the same workers: its image is byte-equal to
    `sd-onnx img2img`'s with the same parameters. The picture is part of the request's key: the same fields with
    another picture, or without one (txt2img), are other requests, each made once; a re-run redoes none."""
    line = {"prompt": "a red cube", "seed": 5, "steps": 4, "width": 64, "height": 64, "denoising_strength": 0.6,
            "sampler_name": "Euler a", "cfg_scale": 5}
    first = _picture(tmp_path / "init.png")
    other = _picture(tmp_path / "other.png", flip=True)
    job = write_job(tmp_path / "jobs.jsonl", [{**line, "init_images": [first]}, {**line, "init_images": [other]}, line])
    out = tmp_path / "out"
    summary = run_batch(job, out, str(model), workers=1)
    assert summary.generated == 3
    records = {r["line"]: r for r in check_complete(out, 3)}
    assert len({r["request"] for r in records.values()}) == 3
    ref = tmp_path / "ref"
    assert main(["img2img", line["prompt"], "--init-image", str(tmp_path / "init.png"), "--model", str(model),
                 "-o", str(ref), "--randn-source", "gpu", "-q", "--threads", "1", "--seed", "5", "--steps", "4",
                 "--width", "64", "--height", "64", "--denoising-strength", "0.6", "--sampler", "Euler a",
                 "--cfg", "5"]) == 0
    (expected,) = [png.read_bytes() for png in ref.glob("*.png")]
    assert (out / records[1]["file"]).read_bytes() == expected
    assert (out / records[2]["file"]).read_bytes() != expected
    assert "Denoising strength: 0.6" in Image.open(out / records[1]["file"]).info["parameters"]
    again = run_batch(job, out, str(model), workers=1)
    assert (again.generated, again.skipped) == (0, 3)


def test_ray_error_cause_is_the_remote_error_line():
    """A Ray error's text ends with the remote traceback; the driver's line is its last error line, without the class
    name when the error is sd-onnx's own (which is worded for the user), with it otherwise."""
    from sd_onnx.batch import _cause

    ours = RuntimeError("The actor died because of an error raised in its creation task, ...\nTraceback (most recent "
                        "call last):\n  File \"x.py\", line 1\nsd_onnx.errors.SdOnnxError: model folder /m does not "
                        "exist on Ray node h:ab12cd34:77: every node needs the model at the same path\n")
    assert _cause(ours) == ("model folder /m does not exist on Ray node h:ab12cd34:77: every node needs the model at "
                            "the same path")
    theirs = RuntimeError("ray::RayGenerator.__init__()\nTraceback ...\nAttributeError: 'X' has no attribute 'y'")
    assert _cause(theirs) == "AttributeError: 'X' has no attribute 'y'"


@pytest.mark.parametrize("nodes,n,share", [
    ([2, 1], 1, 2),  # not 3: no node has 3 CPUs
    ([2, 1], 2, 1),
    ([3, 1], 2, 1),  # 2 CPUs each would fit one actor only
    ([4, 4, 1], 2, 4),
    ([4, 4, 1], 3, 2),
    ([16], 4, 4),
    ([1], 1, 1),
])
def test_ray_actor_share_fits_on_the_nodes(nodes, n, share):
    from sd_onnx.batch import _ray_share

    assert _ray_share(nodes, n) == share
    assert sum(c // share for c in nodes) >= n
