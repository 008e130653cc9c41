"""`sd-onnx batch --ray ADDRESS` on a real local Ray cluster (a head and a second node started with `ray start` on
this machine): 12 images equal to `generate`'s, through a killed worker process and a killed driver.

Every address given is 127.0.0.1, but Ray 2.60 turns a loopback address into the machine's own (services.
resolve_ip_for_localhost) and its gRPC servers listen on all interfaces; the traffic stays on this machine, and the
cluster takes no driver without its own random token."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sd_onnx.cli import main

pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'sd-onnx[ray]')")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube", "a blue (sphere:1.2)", "a green cone", "a [yellow|white] star", "an orange torus",
           "a purple pyramid"]
SEEDS = (7, 8)  # 6 prompts x 2 seeds = 12 images
# slow enough (a few tenths of a second an image on the tiny model) that a kill lands while work is left
PARAMS = {"steps": 6, "width": 64, "height": 64, "sampler_name": "Euler a", "cfg_scale": 6}
N = len(PROMPTS) * len(SEEDS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_of(marker: str) -> list[int]:
    """Pids of processes whose command line names `marker` (this cluster's temp dir): this cluster's only."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _wait_for_start(log: Path, proc: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if "Ray runtime started" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"ray start exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.2)
    raise AssertionError(f"ray start did not start in {limit} s:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def cluster():
    """A head (2 CPUs) and a second node (1 CPU, its own raylet and worker processes), both `ray start --block` in
    their own sessions, stopped by SIGKILL to those sessions (`ray stop --force` would stop every Ray here). The
    cluster's processes see neither this checkout's PYTHONPATH nor its directory: the driver must ship its code.
    Token authentication with a token of its own, so no other cluster's driver can use it."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        ray_cli = Path(shutil.which("ray") or "ray")
    # short: the raylet's unix sockets live under it, and their paths may not exceed ~107 characters
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    common = ["--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp), "--disable-usage-stats",
              "--dashboard-agent-listen-port", "0", "--object-store-memory", str(100 * 2**20)]
    commands = [
        ["--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
         "--dashboard-port", str(_free_port())],
        ["--address", f"127.0.0.1:{port}", "--num-cpus", "1"],
    ]
    procs = []
    try:
        for i, extra in enumerate(commands):
            log = temp / f"start-{i}.log"
            with open(log, "wb") as f:
                procs.append(subprocess.Popen([str(ray_cli), "start", *extra, *common], env=env, cwd=temp,
                                              stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
            _wait_for_start(log, procs[-1])
        yield {"address": f"127.0.0.1:{port}", "env": env, "temp": temp}
    finally:
        # what `ray stop --force` does (SIGKILL), to this cluster's sessions only
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for pid in _processes_of(str(temp)):  # anything that left those sessions (none expected)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("sd1")


@pytest.fixture(scope="module")
def generated(model, tmp_path_factory) -> dict[tuple[str, int], bytes]:
    """`sd-onnx generate` of each prompt at each seed with PARAMS: (prompt, seed) -> PNG bytes (--randn-source gpu:
    the API's default, which batch lines get)."""
    out = tmp_path_factory.mktemp("generated")
    pictures = {}
    for i, prompt in enumerate(PROMPTS):
        folder = out / str(i)
        assert main(["generate", prompt, "--model", str(model), "-o", str(folder), "--randn-source", "gpu", "-q",
                     "--threads", "1", "--seed", str(SEEDS[0]), "--batch-count", str(len(SEEDS)),
                     "--steps", str(PARAMS["steps"]), "--width", str(PARAMS["width"]),
                     "--height", str(PARAMS["height"]), "--sampler", PARAMS["sampler_name"],
                     "--cfg", str(PARAMS["cfg_scale"])]) == 0
        for png in folder.glob("*.png"):
            pictures[(prompt, int(png.stem.split("-")[1]))] = png.read_bytes()
    assert len(pictures) == N
    return pictures


def _job(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("".join(p + "\n" for p in PROMPTS))
    return path


def _batch(cluster, model: Path, job: Path, out: Path) -> list[str]:
    """The CLI, run from the model's parent with a relative --model (an actor's working directory is not the
    driver's), this checkout on the driver's PYTHONPATH only."""
    return [sys.executable, "-m", "sd_onnx", "batch", str(job), "-o", str(out), "--model", model.name,
            "--seeds", f"{SEEDS[0]}-{SEEDS[-1]}", "--params", json.dumps(PARAMS),
            "--ray", cluster["address"], "--workers", "2"]


def _run(cluster, argv: list[str], model: Path, **kw) -> subprocess.Popen:
    env = {**cluster["env"], "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(argv, env=env, cwd=model.parent, start_new_session=True, text=True, **kw)


def _manifest(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _check(out: Path, generated: dict) -> list[dict]:
    """12 manifest lines, 12 keys, one PNG each and no other, each byte-equal to `generate`'s."""
    records = _manifest(out)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == N, keys
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file"] for r in records)
    assert sorted((r["line"], r["seed"]) for r in records) == [(i + 1, s) for i in range(len(PROMPTS)) for s in SEEDS]
    for r in records:
        assert r["worker"].startswith("ray-"), r
        assert (out / r["file"]).read_bytes() == generated[(PROMPTS[r["line"] - 1], r["seed"])], r
    return records


def _wait_for_lines(out: Path, n: int, proc: subprocess.Popen, limit: float = 180) -> list[dict]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        records = _manifest(out) if (out / "manifest.jsonl").exists() else []
        if len(records) >= n:
            return records
        if proc.poll() is not None:
            raise AssertionError(f"the batch ended ({proc.returncode}) before {n} images:\n{proc.communicate()[1]}")
        time.sleep(0.02)
    raise AssertionError("the batch made no progress")


def test_cluster_batch_equals_generate(cluster, model, generated, tmp_path):
    """12 images on the two-node cluster, each byte-equal to `generate`'s; the two actors ran on the two nodes, and a
    re-run redoes nothing."""
    out = tmp_path / "out"
    job = _job(tmp_path)
    proc = _run(cluster, _batch(cluster, model, job, out), model, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    records = _check(out, generated)
    assert len(stdout.splitlines()) == N
    workers = [r["worker"].split(":") for r in records]  # ray-N, host, node, pid
    assert {w[0] for w in workers} == {"ray-0", "ray-1"}, records
    assert len({w[2] for w in workers}) == 2, records  # one actor on each node (SPREAD)
    again = _run(cluster, _batch(cluster, model, job, out), model, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert f"0 image(s) made, {N} already done" in stderr, stderr
    assert _manifest(out) == records


def test_cluster_workers_auto_fits_the_nodes(cluster, model, generated, tmp_path):
    """`--workers auto` (the default) on nodes of 2 and 1 CPUs finishes, images equal to `generate`'s: its actors ask
    for shares that fit the nodes (one actor asking for the cluster's 3 CPUs fits on no node and waits forever).
    Two prompts, one seed."""
    job = tmp_path / "prompts.txt"
    job.write_text("".join(p + "\n" for p in PROMPTS[:2]))
    out = tmp_path / "out"
    argv = _batch(cluster, model, job, out)
    argv[argv.index("--seeds") + 1] = f"{SEEDS[0]}-{SEEDS[0]}"
    argv[argv.index("--workers") + 1] = "auto"
    proc = _run(cluster, argv, model, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    records = _manifest(out)
    assert sorted((r["line"], r["seed"]) for r in records) == [(1, SEEDS[0]), (2, SEEDS[0])]
    for r in records:
        assert (out / r["file"]).read_bytes() == generated[(PROMPTS[r["line"] - 1], r["seed"])], r


def test_cluster_killed_worker_process(cluster, model, generated, tmp_path):
    """SIGKILL the worker process (a Ray actor on one of the raylets) that made the first image while the job has work
    left: Ray restarts the actor, its calls are re-run, and the job ends with all 12 images, none twice."""
    out = tmp_path / "out"
    proc = _run(cluster, _batch(cluster, model, _job(tmp_path), out), model, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
    try:
        first = _wait_for_lines(out, 1, proc)[0]
        actor, _, pid = first["worker"].rpartition(":")
        os.kill(int(pid), signal.SIGKILL)
        at_kill = len(_manifest(out))
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    assert at_kill < N - 2, "the job was (nearly) done when its worker was killed: nothing was tested"
    records = _check(out, generated)
    index = actor.split(":", 1)[0]  # ray-N: the killed actor, restarted by Ray in a new process
    assert any(r["worker"].startswith(index + ":") and not r["worker"].endswith(f":{pid}") for r in records), records


def test_cluster_killed_driver_resumes(cluster, model, generated, tmp_path):
    """SIGKILL the driver after 3 images, re-run: the finished images are kept (same manifest lines, same files), only
    the rest are made, and the job ends with exactly 12."""
    out = tmp_path / "out"
    job = _job(tmp_path)
    proc = _run(cluster, _batch(cluster, model, job, out), model, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_lines(out, 3, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = _manifest(out)
    assert 3 <= len(first) < N, "the driver finished before it was killed: nothing was tested"
    stamps = {r["file"]: ((out / r["file"]).stat().st_ino, (out / r["file"]).stat().st_mtime_ns) for r in first}
    rerun = _run(cluster, _batch(cluster, model, job, out), model, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    records = _check(out, generated)
    assert records[:len(first)] == first
    for name, stamp in stamps.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp
    made, done, adopted = map(int, re.search(r"(\d+) image\(s\) made, (\d+) already done, (\d+) adopted",
                                             stderr).groups())
    # nothing finished is redone; a PNG the killed driver wrote without its manifest line is adopted, not remade
    assert done == len(first) and made + done + adopted == N, stderr


def test_cluster_model_an_actor_cannot_load_is_one_line(cluster, model, tmp_path):
    """A model whose UNet file is corrupt (the driver only checks that it is there; actors read it) ends the job with
    one line naming the cause, not Ray's traceback, and no image."""
    broken = tmp_path / model.name
    broken.mkdir()
    for item in model.iterdir():
        if item.name != "unet":
            (broken / item.name).symlink_to(item)
    shutil.copytree(model / "unet", broken / "unet")
    (broken / "unet" / "model.onnx").write_bytes(b"not an ONNX file")
    out = tmp_path / "out"
    proc = _run(cluster, _batch(cluster, broken, _job(tmp_path), out), broken, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("sd-onnx: error:") and "unet" in errors[0], stderr
    assert "Traceback" not in stderr
    assert not list(out.glob("*.png"))


def test_cluster_without_its_token_is_one_line(cluster, model, tmp_path):
    """A driver without the cluster's auth token is refused with one line, not a traceback."""
    out = tmp_path / "out"
    env = {**cluster["env"], "PYTHONPATH": str(ROOT), "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_gcs_server_port_wait_time_s": "2"}  # Ray's connection retries, ~20 s by default
    proc = subprocess.run(_batch(cluster, model, _job(tmp_path), out), env=env, cwd=model.parent,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sd-onnx: error: cannot connect to the Ray cluster at 127.0.0.1:"), proc.stderr
    assert "token authentication" in last, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
