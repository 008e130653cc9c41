"""The README's main job: `sd-onnx selftest` builds, exports, generates on every provider and tries int8."""

from __future__ import annotations


def test_selftest_reports_what_works(tmp_path):
    from sd_onnx.selftest import run_selftest

    lines: list[str] = []
    assert run_selftest(log=lines.append, workdir=tmp_path)
    text = "\n".join(lines)
    assert "export: OK" in text
    assert any(line.startswith("cpu ") and " OK " in line for line in lines), text
    assert "quantize --int8: OK" in text, text
    assert "self-test passed" in text
    assert list(tmp_path.glob("*.png"))


def test_selftest_says_when_the_quantize_extra_is_missing(tmp_path, monkeypatch):
    import sys

    from sd_onnx.selftest import _try_int8

    monkeypatch.setitem(sys.modules, "sympy", None)
    lines: list[str] = []
    _try_int8(tmp_path / "no-model-needed", tmp_path, lines.append)
    assert len(lines) == 1 and lines[0].startswith("quantize --int8: unavailable") and "sympy" in lines[0], lines
