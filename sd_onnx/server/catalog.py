"""The model folders a server may load (installed ones and the one it started with) and the one loaded now.

Requests name a model by A1111's title, name or hash, never by path: only folders listed here can be loaded."""

from __future__ import annotations

import threading
from pathlib import Path

from sd_onnx.home import find_model, installed_models, read_metadata
from sd_onnx.runtime.model import LoadedModel
from sd_onnx.runtime.providers import cpu_info
from sd_onnx.runtime.variants import choose_variant
from sd_onnx.server.errors import ApiError


def title_of(folder: Path) -> str:
    """A1111 titles a checkpoint "<file> [<short hash>]"; a model folder is titled by its name the same way."""
    short = read_metadata(folder).get("source", {}).get("short_hash", "")
    return f"{folder.name} [{short}]" if short else folder.name


class Catalog:
    def __init__(self, model: str | Path | None, device: str = "auto", precision: str = "auto",
                 threads: int | None = None, low_memory: bool = False):
        self.device, self.precision, self.threads, self.low_memory = device, precision, threads, low_memory
        self._lock = threading.Lock()
        found = installed_models()
        self.start = find_model(model) if model is not None or len(found) < 2 else found[0]
        self.folders: dict[str, Path] = {}
        self.refresh()
        self.folder: Path = self.start
        self.model: LoadedModel = self._open(self.start)

    def refresh(self) -> None:
        """Re-read $SD_ONNX_HOME/models (A1111's refresh-checkpoints)."""
        folders = {p.name: p for p in installed_models()}
        folders.setdefault(self.start.name, self.start)
        with self._lock:
            self.folders = dict(sorted(folders.items()))

    def entries(self) -> list[dict]:
        """A1111's /sd-models items."""
        out = []
        for name, folder in self.folders.items():
            source = read_metadata(folder).get("source", {})
            out.append({"title": title_of(folder), "model_name": name, "hash": source.get("short_hash") or None,
                        "sha256": source.get("sha256") or None, "filename": str(folder), "config": None})
        return out

    def find(self, name: str) -> Path:
        """A listed folder by title, name, short hash or sha256 (A1111's checkpoint aliases); 404 otherwise."""
        wanted = str(name).strip()
        for entry in self.entries():
            if wanted and wanted in (entry["title"], entry["model_name"], entry["hash"], entry["sha256"]):
                return self.folders[entry["model_name"]]
        raise ApiError(404, f"model {name!r} not found; available: "
                            f"{', '.join(e['title'] for e in self.entries())}")

    def load(self, folder: Path) -> None:
        """Make `folder` the loaded model (called from the worker, between jobs)."""
        if folder != self.folder:
            model = self._open(folder)
            self.model, self.folder = model, folder

    def _open(self, folder: Path) -> LoadedModel:
        variant, self.why = choose_variant(folder, self.precision, self.device, cpu_info()["flags"])
        model = LoadedModel(variant, self.device, self.threads, self.low_memory, keep_loaded=True,
                            arithmetic="auto" if self.precision == "auto" else "fp32")
        if model.device.inference_precision == "bf16" and self.why == "fp32":
            self.why = model.device.reason
        return model

    @property
    def title(self) -> str:
        return title_of(self.folder)

    @property
    def sha256(self) -> str | None:
        return read_metadata(self.folder).get("source", {}).get("sha256") or None
