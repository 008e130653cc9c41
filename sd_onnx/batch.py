"""`sd-onnx batch`: a JSONL job of A1111 API payloads run by worker processes or Ray actors, each image saved once.

Every image of a job has a key: a hash of its line's request (seed resolved) and the image's seed. Its file is
`KEY.png`, written complete (temporary name, fsync, hard link) before its line is appended to `manifest.jsonl`
(fsync). Only the driver writes; workers return pixels. A re-run reads the manifest, adopts a PNG whose line the last
run did not get to write (if it decodes and its parameters are this request's) or removes it, and generates only
what is missing: a killed driver, worker or actor loses at most the images in flight and never duplicates one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd_onnx.batch_jobs import Unit, read_job
from sd_onnx.errors import SdOnnxError
from sd_onnx.runtime.requests import GenerateRequest

MANIFEST = "manifest.jsonl"
LOCK = ".batch.lock"
MAX_ATTEMPTS = 3  # a unit whose worker dies this many times is a failure, not bad luck
PREFETCH = 2  # units queued per worker, so one is ready when the driver is busy writing the last


@dataclass
class Summary:
    images: int = 0
    skipped: int = 0
    adopted: int = 0
    removed: int = 0
    generated: int = 0
    retried: int = 0
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- output and manifest

def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_png(image: Image.Image, path: Path, parameters: str) -> None:
    """`path` complete or not at all, never over an existing file (encoded as `save_png` does, so the bytes equal
    `sd-onnx generate`'s)."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.stem}.partial")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        _fsync_dir(path.parent)
    except FileExistsError:
        raise SdOnnxError(f"{path} appeared while this batch ran: is another run writing to {path.parent}?") from None
    except OSError as e:
        raise SdOnnxError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


class Manifest:
    """`manifest.jsonl`: one line per finished image, appended and fsynced after its PNG is on disk."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a line cut short by a crash: its PNG is reconciled like one without a line
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            for raw in data[:end].splitlines():
                try:
                    record = json.loads(raw)
                    self.done[record["key"]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SdOnnxError(f"{path} has a line that is not a manifest record: {raw[:80]!r}") from None

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done[record["key"]] = record


def _matches(path: Path, unit: Unit, seed: int) -> bool:
    """The PNG decodes and its parameters are this request's at this seed."""
    from sd_onnx.runtime.infotext import parse_infotext

    try:
        with Image.open(path) as im:
            im.load()
            text = im.info.get("parameters")
            size = im.size
    except Exception:  # noqa: BLE001 - any undecodable file is simply not adopted
        return False
    if not text:
        return False
    r = unit.request
    prompt, negative, s = parse_infotext(text)
    expected = {"Seed": str(seed), "Steps": str(r.steps), "Sampler": r.sampler, "Size": f"{r.width}x{r.height}"}
    try:
        cfg = float(s.get("CFG scale", "nan"))
    except ValueError:
        return False
    return (prompt, negative) == (r.prompt, r.negative_prompt) and all(s.get(k) == v for k, v in expected.items()) \
        and cfg == float(r.cfg_scale) \
        and (not r.enable_hr or size != (r.width, r.height)) and (r.enable_hr or size == (r.width, r.height))


def reconcile(outdir: Path, manifest: Manifest, units: list[Unit], summary: Summary, say: Callable[[str], None]):
    """After a crash: temporary files go; a PNG of this job without a manifest line is adopted or removed."""
    for tmp in outdir.glob(".*.partial"):
        tmp.unlink(missing_ok=True)
    expected = {key: (unit, seed) for unit in units for key, seed in zip(unit.keys, unit.seeds)}
    for key, (unit, seed) in expected.items():
        path = outdir / f"{key}.png"
        if key in manifest.done or not path.exists():
            continue
        if _matches(path, unit, seed):
            manifest.append(_record(key, unit, seed, path, None, "adopted"))
            summary.adopted += 1
        else:
            path.unlink()
            _fsync_dir(outdir)
            summary.removed += 1
            say(f"removed {path.name}: no manifest line and not a finished image of line {unit.line}")


def _record(key: str, unit: Unit, seed: int, path: Path, seconds: float | None, worker: str) -> dict:
    return {"key": key, "request": unit.request_id, "line": unit.line, "seed": seed, "file": path.name,
            "seconds": None if seconds is None else round(seconds, 3), "worker": worker,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# ---------------------------------------------------------------------------------------------------------- workers

class Generator:
    """A worker's model, loaded once; called with a request, it returns each image's pixels and parameters."""

    def __init__(self, folder: str, device: str, threads: int | None):
        from sd_onnx.runtime.model import LoadedModel

        # as generate with --precision auto: on a BF16 CPU with OpenVINO, the fp32 folder runs in bf16 (#22)
        self.model = LoadedModel(folder, device, threads, keep_loaded=True, arithmetic="auto")

    def __call__(self, request: GenerateRequest) -> list[dict]:
        from sd_onnx.runtime.pipeline import run

        t0 = time.perf_counter()
        out = [{"seed": img.seed, "parameters": img.parameters, "mode": img.image.mode, "size": img.image.size,
                "data": img.image.tobytes()} for img in run(self.model, request)]
        for item in out:
            item["seconds"] = (time.perf_counter() - t0) / len(out)
        return out


def _local_worker(conn, folder: str, device: str, threads: int | None) -> None:
    """A spawned worker process: load the model, then run what the driver sends until it hangs up."""
    try:
        gen = Generator(folder, device, threads)
    except Exception as e:  # noqa: BLE001 - reported to the driver as one line
        conn.send(("fatal", None, f"{type(e).__name__}: {e}"))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the driver is gone (killed): nothing to write results to
            return
        if msg is None:
            return
        index, request = msg
        try:
            conn.send(("done", index, gen(request)))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", index, f"{type(e).__name__}: {e}"))


def _run_local(units: list[Unit], folder: Path, device: str, n: int, threads: int | None,
               summary: Summary) -> Iterator[tuple[Unit, list[dict], str]]:
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    pending = deque(range(len(units)))
    attempts = [0] * len(units)
    workers: dict[int, tuple] = {}  # id -> (process, connection, in-flight unit indexes)
    next_id = 0

    def start() -> None:
        nonlocal next_id
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_local_worker, args=(theirs, str(folder), device, threads), daemon=True,
                           name=f"sd-onnx-batch-{next_id}")
        proc.start()
        theirs.close()
        workers[next_id] = (proc, mine, deque())
        next_id += 1

    def feed(wid: int) -> None:
        proc, conn, inflight = workers[wid]
        while pending and len(inflight) < PREFETCH:
            index = pending.popleft()
            attempts[index] += 1
            if attempts[index] > MAX_ATTEMPTS:
                raise SdOnnxError(f"line {units[index].line}: its worker died {MAX_ATTEMPTS} times; giving up")
            inflight.append(index)
            conn.send((index, units[index].request))

    def lost(wid: int) -> None:
        proc, conn, inflight = workers.pop(wid)
        conn.close()
        proc.join(1)
        pending.extendleft(reversed(inflight))  # its units first, in their order
        summary.retried += len(inflight)
        start()

    for _ in range(n):
        start()
    try:
        for wid in list(workers):
            feed(wid)
        while any(w[2] for w in workers.values()) or pending:
            by_conn = {w[1]: wid for wid, w in workers.items()}
            by_sentinel = {w[0].sentinel: wid for wid, w in workers.items()}
            for ready in wait([*by_conn, *by_sentinel], timeout=5):
                wid = by_conn.get(ready, by_sentinel.get(ready))
                if wid not in workers:
                    continue
                proc, conn, inflight = workers[wid]
                try:
                    kind, index, payload = conn.recv() if ready is conn or conn.poll() else (None, None, None)
                except (EOFError, OSError):  # died, possibly mid-message
                    kind = None
                if kind is None:
                    if not proc.is_alive():
                        lost(wid)
                    continue
                if kind == "fatal":
                    raise SdOnnxError(f"a worker could not load the model: {payload}")
                if kind == "error":
                    raise SdOnnxError(f"line {units[index].line}: {payload}")
                inflight.remove(index)
                yield units[index], payload, f"local-{wid}:{proc.pid}"
                feed(wid)
            for wid in [wid for wid, w in workers.items() if not w[0].is_alive() and not w[1].poll()]:
                lost(wid)
            for wid in list(workers):
                feed(wid)
    finally:
        for proc, conn, _ in workers.values():
            try:
                conn.send(None)
            except OSError:
                pass
        for proc, conn, _ in workers.values():
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()


def source_fingerprint() -> str:
    """A hash of this sd_onnx package's Python sources: a Ray actor must run the driver's code, not another copy that
    its node happens to import (an editable install of another checkout, an older release)."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


class RayGenerator(Generator):
    """The Ray actor: Ray Data's pattern (model loaded in __init__, run in __call__), on core actors so each result
    streams to the driver as soon as it is made."""

    def __init__(self, folder: str, device: str, threads: int | None):
        if not Path(folder).is_dir():  # on another machine: the folder is read in place, not shipped
            raise SdOnnxError(f"model folder {folder} does not exist on Ray node {self.where()}: every node needs "
                              "the model at the same path (shared storage)")
        super().__init__(folder, device, threads)

    def where(self) -> str:
        """host:node:pid, the node being Ray's (its id's first 8 digits): several nodes may share a host."""
        import socket

        import ray

        return f"{socket.gethostname()}:{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"

    def ready(self) -> str:
        return source_fingerprint()

    def __call__(self, request: GenerateRequest) -> tuple[list[dict], str]:
        return super().__call__(request), self.where()


def _run_ray(units: list[Unit], folder: Path, device: str, workers: int | str, address: str | None,
             summary: Summary) -> Iterator[tuple[Unit, list[dict], str]]:
    try:
        import ray
    except ImportError:
        raise SdOnnxError("--ray needs Ray: pip install 'sd-onnx[ray]'") from None
    from ray.exceptions import RayActorError, RayTaskError

    started = False
    if not ray.is_initialized():
        # The actors import the driver's sd_onnx, shipped through Ray (uploaded once, cached by content), not whatever
        # the nodes have: a cluster's Python sees neither the driver's PYTHONPATH nor, on other machines, its files.
        # Ray uploads local py_modules for a job only, not per actor.
        package = str(Path(__file__).resolve().parent)
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     runtime_env={"py_modules": [package], "excludes": ["__pycache__"]},
                     **({} if address else {"num_cpus": _cores()}))
        except (ConnectionError, RuntimeError, ValueError) as e:  # no cluster there, or its auth token is not ours
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            chain, cause = str(e), e.__cause__
            while cause is not None:
                chain, cause = chain + "\n" + str(cause), cause.__cause__
            hint = (": it uses token authentication and refused this driver's token (set RAY_AUTH_TOKEN or "
                    "~/.ray/auth_token to the cluster's)") if "auth" in chain.lower() else ""
            raise SdOnnxError(f"cannot connect to {where}: {str(e).strip().splitlines()[0]}{hint}") from None
        started = True
    nodes = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    nodes = [c for c in nodes if c > 0] or [1]
    n = sum(_auto_workers(c) for c in nodes) if workers == "auto" else min(int(workers), sum(nodes))
    share = _ray_share(nodes, n)
    # a killed actor comes back (model loaded again) and its calls are re-run; the driver drops a repeat result
    # SPREAD: one actor per node before two on any, so each node's cores and memory bandwidth are used
    actor_cls = ray.remote(num_cpus=share, max_restarts=MAX_ATTEMPTS, max_task_retries=MAX_ATTEMPTS,
                           scheduling_strategy="SPREAD")(RayGenerator)
    actors = [actor_cls.remote(str(folder), device, share) for _ in range(n)]
    pending = deque(range(len(units)))
    inflight: dict = {}  # object ref -> (unit index, actor index)
    load = [0] * n
    try:
        try:
            found = ray.get([actor.ready.remote() for actor in actors])
        except RayActorError as e:  # its __init__ raised: the error's own line, not Ray's traceback
            raise SdOnnxError(f"a Ray actor did not start: {_cause(e)}") from None
        if set(found) != {source_fingerprint()}:
            raise SdOnnxError("the Ray actors import another sd_onnx than this driver's: ray.init(runtime_env="
                              "{'py_modules': [<this sd_onnx folder>]}) before run_batch, or let it call ray.init")
        def feed(a: int) -> None:
            while pending and load[a] < PREFETCH:
                index = pending.popleft()
                inflight[actors[a].__call__.remote(units[index].request)] = (index, a)
                load[a] += 1

        for a in range(n):
            feed(a)
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            index, a = inflight.pop(ref)
            load[a] -= 1
            try:
                images, where = ray.get(ref)
            except RayActorError as e:
                raise SdOnnxError(f"line {units[index].line}: its Ray actor died more than {MAX_ATTEMPTS} "
                                  f"times ({type(e).__name__})") from None
            except RayTaskError as e:
                raise SdOnnxError(f"line {units[index].line}: {str(e.cause) if e.cause else e}") from None
            yield units[index], images, f"ray-{a}:{where}"
            feed(a)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _cause(error: Exception) -> str:
    """The last line of the exception a Ray error carries (its text ends with the remote traceback's last line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error:" in line or "Exception:" in line:
            return re.sub(r"^sd_onnx\.[\w.]+: ", "", line)  # our own errors speak for themselves
    return lines[-1] if lines else type(error).__name__


def _ray_share(nodes: list[int], n: int) -> int:
    """The most CPUs each of `n` actors can have so that all of them fit on nodes with these CPU counts: a share
    taken from the whole cluster's count (3 CPUs on nodes of 2 and 1 for one actor) fits on no node, and the job would
    wait for it forever."""
    for share in range(max(nodes), 1, -1):
        if sum(c // share for c in nodes) >= n:
            return share
    return 1


def _cores() -> int:
    from sd_onnx.runtime.providers import usable_cores

    return usable_cores()


def _auto_workers(cores: int) -> int:
    """One worker per 4 cores, at least one: each worker holds a whole model (a full-size SD 1.5 is ~4 GB in fp32),
    and a full-size UNet's matrix products use a session's threads well. Measured on 2 cores with a full-size model
    (benchmarks/batch.py, docs/benchmarks.md "#21"): one worker with both threads made 93 images an hour, two workers
    with one thread each 57 (512x512, 20 steps). The tests' tiny model goes the other way (per-op overhead, not
    arithmetic) and is not what a batch runs. --workers N to override."""
    return max(1, cores // 4)


# ----------------------------------------------------------------------------------------------------------- driver

def run_batch(job: Path, outdir: Path, model: str | Path | None = None, device: str = "auto",
              workers: int | str = "auto", ray_address: str | None | bool = False,
              seeds: tuple[int, int] | None = None, params: dict | None = None,
              say: Callable[[str], None] = lambda m: None,
              on_image: Callable[[dict], None] | None = None) -> Summary:
    """Run a job into `outdir` (resuming a previous run there). `ray_address`: False for worker processes here, None
    or "" to start a local Ray cluster, else the cluster to connect to. `on_image(record)` after each manifest line."""
    import fcntl

    from sd_onnx.home import find_model
    from sd_onnx.runtime.images import prepare_outdir
    from sd_onnx.runtime.providers import cpu_info
    from sd_onnx.runtime.variants import choose_variant

    t0 = time.perf_counter()
    units = read_job(Path(job), seeds, params)
    folder = find_model(model)  # every mistake found so far is reported before anything is written
    # as generate --precision auto: a variant beside the model when it is this machine's fastest path
    folder, why = choose_variant(folder, "auto", device, cpu_info()["flags"], notice=say)
    say(f"model: {folder.name}, precision {why}")
    outdir = prepare_outdir(Path(outdir))
    summary = Summary(images=sum(len(u.keys) for u in units))
    lock = open(outdir / LOCK, "a")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SdOnnxError(f"another `sd-onnx batch` is writing to {outdir}") from None
        manifest = Manifest(outdir / MANIFEST)
        reconcile(outdir, manifest, units, summary, say)
        todo = [u for u in units if any(k not in manifest.done for k in u.keys)]
        summary.skipped = summary.images - summary.adopted - sum(
            sum(k not in manifest.done for k in u.keys) for u in todo)
        if todo:
            if ray_address is False:
                n = _auto_workers(_cores()) if workers == "auto" else int(workers)
                n = max(1, min(n, len(todo)))
                threads = max(1, _cores() // n)
                say(f"{len(todo)} batch(es) to run on {n} worker process(es), {threads} thread(s) each")
                results = _run_local(todo, folder, device, n, threads, summary)
            else:
                # absolute: an actor's working directory is not the driver's
                results = _run_ray(todo, folder.resolve(), device, workers, ray_address or None, summary)
            for unit, images, worker in results:
                for key, item in zip(unit.keys, images):
                    if key in manifest.done:  # a retried unit's image that a dead worker's run already delivered
                        continue
                    picture = Image.frombytes(item["mode"], tuple(item["size"]), item["data"])
                    path = outdir / f"{key}.png"
                    write_png(picture, path, item["parameters"])
                    record = _record(key, unit, item["seed"], path, item["seconds"], worker)
                    manifest.append(record)
                    summary.generated += 1
                    summary.files.append(path)
                    if on_image is not None:
                        on_image(record)
    finally:
        lock.close()
    summary.seconds = time.perf_counter() - t0
    return summary
