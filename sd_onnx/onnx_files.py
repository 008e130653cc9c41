"""Small torch-free helpers shared by the graph passes of export and quantize."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator


def external_location(proto) -> str | None:
    """The file (relative to the model) that holds the graph's external tensors, or None if all are inline."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            return ExternalDataInfo(tensor).location
    return None


@contextlib.contextmanager
def working_dir(path: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def quiet_logger(name: str = "") -> Iterator[None]:
    """Raise a library's logger (the root logger for "") to ERROR for the duration: diffusers and ONNX Runtime
    chat about deprecations and preprocessing advice."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
