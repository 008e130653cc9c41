"""ONNX Runtime's optimized graphs kept on disk, so that the second start of a model skips graph optimization.

At ORT_ENABLE_ALL the CPU provider also rewrites convolutions into its blocked NCHWc layout. For the full-size UNet
that rewrite costs about 9 s at every start, so it used to be left off (ORT_ENABLE_EXTENDED, 1.3 s). ONNX Runtime
can save the graph it optimized (`optimized_model_filepath`); loaded back, the session starts as fast as the
unoptimized one and runs the NCHWc kernels. The saved graph is specific to this CPU (NCHWc block size follows the
vector width) and to this ONNX Runtime build, so both are part of the key, together with the source files' sizes
and modification times: a re-exported or re-quantized model is optimized afresh.

Layout: <root>/<hash of the source path and providers>/{model.onnx, model.onnx_data, stamp.json}. An entry is
written in a staging folder beside it and renamed into place, so an interrupted run leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

STAMP = "stamp.json"
MODEL = "model.onnx"
DATA = "model.onnx_data"
HEADROOM = 256 << 20  # bytes kept free on the cache's disk beyond the entry itself
STALE_STAGING_S = 24 * 3600  # a staging folder this old was left by a process that died while saving


def source_bytes(stamp: dict) -> int:
    """What the stamped model's folder holds (graph and external weights): about what its optimized copy takes."""
    return sum(size for size, _ in stamp["files"].values())


class OptimizedModelCache:
    def __init__(self, root: Path, providers: tuple[str, ...]):
        self.root = root
        self.providers = tuple(providers)

    def entry(self, stamp: dict) -> Path:
        key = f"{stamp['source']}|{','.join(self.providers)}"
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:16]

    def stamp(self, source: Path) -> dict:
        """What an entry must match to stand for `source`: taken once per start, before ONNX Runtime reads the files,
        so a model changed while it is being optimized is not stamped with its new files."""
        import onnxruntime

        from sd_onnx.runtime.providers import cpu_info

        cpu = cpu_info()
        folder = source.resolve().parent
        files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()}
        return {"source": str(source.resolve()), "files": files, "onnxruntime": onnxruntime.__version__,
                "cpu": [cpu["model"], *cpu["flags"]], "providers": list(self.providers)}

    def lookup(self, stamp: dict) -> Path | None:
        """The cached optimized model of the stamped source, or None when there is none or it is stale."""
        entry = self.entry(stamp)
        try:
            if json.loads((entry / STAMP).read_text()) == stamp and (entry / MODEL).is_file():
                return entry / MODEL
        except (OSError, ValueError):
            pass
        return None

    def staging(self, stamp: dict) -> Path | None:
        """A fresh folder to save the optimized model of the stamped source in, or None when the disk has no room
        for it or the cache folder cannot be written."""
        need = source_bytes(stamp) + HEADROOM
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.root).free < need:
                return None
            folder = self.root / f".staging-{self.entry(stamp).name}-{os.getpid()}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        except OSError:
            return None
        return folder

    def commit(self, staged: Path, stamp: dict) -> Path:
        """Stamp the staged folder and move it into place (replacing a stale entry); the cached model's path."""
        (staged / STAMP).write_text(json.dumps(stamp, indent=1))
        entry = self.entry(stamp)
        shutil.rmtree(entry, ignore_errors=True)
        try:
            staged.rename(entry)
        except OSError:  # another process committed the same entry first
            self.discard(staged)
        self.prune()
        return entry / MODEL

    def discard(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def prune(self) -> None:
        """Drop entries whose source model is gone (a deleted or moved model folder would otherwise keep its copy)."""
        for entry in self.root.iterdir():
            if entry.name.startswith(".staging-"):
                if time.time() - entry.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            try:
                source = Path(json.loads((entry / STAMP).read_text())["source"])
            except (OSError, ValueError, KeyError):
                source = None
            if source is None or not source.is_file():
                shutil.rmtree(entry, ignore_errors=True)
