"""Working copies of a component graph: typed (symbolic shape inference) and next to its weights."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

from sd_onnx.onnx_files import external_location, working_dir


def feeds_reader(feeds: list[dict]):
    """ONNX Runtime's CalibrationDataReader over recorded feeds (its quantizer and calibrator both take one)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    return Reader()


def copy_file(src: Path, dst: Path) -> None:
    """A real copy: ONNX refuses external data files with several hard links (a hardlink-attack guard)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


@contextlib.contextmanager
def typed_graph(src: Path, workdir: Path, name: str = "model.typed.onnx") -> Iterator[Path]:
    """A copy of src's graph in workdir, every tensor typed by ONNX Runtime's symbolic shape inference (which knows
    the com.microsoft fused ops that ONNX's own inference skips), a copy of its external weights beside it."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    proto = onnx.load(str(src), load_external_data=False)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    location = external_location(proto)
    path = workdir / name
    linked = workdir / location if location else None
    if linked is not None and not linked.exists():
        copy_file(src.parent / location, linked)
    else:
        linked = None
    try:
        # inference reads small constants from the external data: the real copy's, since ONNX refuses a source
        # file with several hard links (a model folder copied with `cp -al`)
        with working_dir(workdir):
            typed = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
        onnx.save(typed, str(path))
        yield path
    finally:
        path.unlink(missing_ok=True)
        if linked is not None:
            linked.unlink(missing_ok=True)
