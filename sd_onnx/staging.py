"""Writing a model folder all-or-nothing: build it in a hidden sibling, rename it into place when complete."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

from sd_onnx.errors import SdOnnxError


@contextlib.contextmanager
def staged_folder(output: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty sibling of `output` to fill; on success it replaces `output`, on any error it is removed."""
    if output.exists() and not force:
        raise SdOnnxError(f"output folder already exists: {output} (use --force to replace it)")
    check_writable(output.parent)
    # Not mkdtemp: its 0700 mode would end up on the finished folder; mkdir honours the umask like any save.
    tmp = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".sd-onnx-probe-")
        probe.close()
    except OSError as e:
        raise SdOnnxError(f"cannot write to {parent}: {e.strerror or e}") from None


def _replace(tmp: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{int(time.time())}")
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
