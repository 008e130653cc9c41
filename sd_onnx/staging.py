"""Writing a model folder all-or-nothing: build it in a hidden sibling, rename it into place when complete."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from sd_onnx.errors import SdOnnxError

# .<name>.partial-<pid>-<random>: a folder being written by process <pid>; .<name>.old-<pid>-<random>: the folder it
# replaces, between the two renames of _replace.
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]+$")
# The names before the writer's pid was part of them: .<name>.partial-<random> and .<name>.old-<unix time>.
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?:(?P<partial>partial)-[0-9a-f]{12}|old-\d{9,})$")
LEGACY_STALE_S = 24 * 3600  # a legacy partial folder this old was left by a process that died while writing
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
MODEL_MARKERS = ("model_index.json", "sd_onnx.json")
HEADROOM = 64 << 20  # bytes left free beyond the estimate


@contextlib.contextmanager
def staged_folder(output: Path, force: bool = False, need_bytes: int = 0) -> Iterator[Path]:
    """Yield an empty sibling of `output` to fill; on success it replaces `output`, on any error (an interrupt
    included) it is removed. Stale siblings left by killed writers are cleaned first."""
    output = Path(os.path.abspath(output))
    check_output(output, force)
    check_writable(output.parent)
    clean_stale_staging(output.parent)
    check_free_space(output.parent, need_bytes)
    # Not mkdtemp: its 0700 mode would end up on the finished folder; mkdir honours the umask like any save.
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        _normalise_modes(tmp)
        _replace(tmp, output)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _NO_SPACE:
            raise SdOnnxError(f"no space left on the disk of {output.parent} while writing {output.name} "
                              "(nothing was written; free some space and run it again)") from None
        raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_no_space(e):
            raise SdOnnxError(f"no space left on the disk of {output.parent} while writing {output.name} "
                              "(nothing was written; free some space and run it again)") from None
        raise


def check_output(output: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse, before any work, an output that --force could not replace without losing something: a file, the
    current folder, a folder holding (or inside) one of the inputs, or a folder that is not a model folder."""
    output = Path(os.path.abspath(output))
    if output.is_file() or (output.exists() and not output.is_dir()):
        raise SdOnnxError(f"output {output} is a file, not a folder: choose another -o")
    real = output.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if real == source or real in source.parents:
            raise SdOnnxError(f"output folder {output} would replace the input {source}: choose another -o")
        if source in real.parents:
            raise SdOnnxError(f"output folder {output} is inside the input {source}: choose another -o")
    if real == Path.cwd().resolve() or real in Path.cwd().resolve().parents:
        raise SdOnnxError(f"output folder {output} is the current folder or holds it: choose another -o")
    if not output.exists():
        return
    if not force:
        raise SdOnnxError(f"output folder already exists: {output} (use --force to replace it)")
    if any(output.iterdir()) and not any((output / marker).is_file() for marker in MODEL_MARKERS):
        raise SdOnnxError(f"--force replaces model folders only, and {output} is not one (no model_index.json "
                          "or sd_onnx.json): choose another -o")


def check_writable(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".sd-onnx-probe-")
        probe.close()
    except OSError as e:
        raise SdOnnxError(f"cannot write to {parent}: {e.strerror or e}") from None


def check_free_space(parent: Path, need_bytes: int) -> None:
    """One line, before any work, when the disk cannot hold what is about to be written."""
    if need_bytes <= 0:
        return
    free = shutil.disk_usage(parent).free
    if free < need_bytes + HEADROOM:
        raise SdOnnxError(f"not enough free space in {parent}: about {_mb(need_bytes + HEADROOM)} needed, "
                          f"{_mb(free)} free")


def _mb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def clean_stale_staging(parent: Path) -> list[Path]:
    """Remove the .partial folders whose writer is gone, and put back a folder whose replacement was killed
    between its two renames (else remove the .old copy); returns what was removed or restored."""
    done = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return done
    for entry in entries:
        match = _STAGING.match(entry.name)
        legacy = _LEGACY.match(entry.name) if match is None else None
        if match:
            if not entry.is_dir() or _alive(int(match["pid"])):
                continue
            name, is_old = match["name"], match["kind"] == "old"
        elif legacy and entry.is_dir() and (not legacy["partial"] or _age(entry) > LEGACY_STALE_S):
            name, is_old = legacy["name"], not legacy["partial"]
        else:
            continue
        original = parent / name
        if is_old and not original.exists():
            with contextlib.suppress(OSError):
                entry.rename(original)
                done.append(original)
                continue
        shutil.rmtree(entry, ignore_errors=True)
        done.append(entry)
    return done


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def _is_no_space(e: BaseException) -> bool:
    """ENOSPC from a library that wraps it (onnx's and torch's C++ writers raise their own types)."""
    return isinstance(e, Exception) and any(text in str(e) for text in ("No space left on device", "ENOSPC"))


def _normalise_modes(folder: Path) -> None:
    """Every file and folder with the mode a plain save would give it: some writers (tempfile-based ones) leave
    0600 files in an otherwise 0644 folder."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace(tmp: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def dump_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    return str(value)
