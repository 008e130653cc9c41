"""Issue #13: export and quantize under odd sizes, stale variants, kills, full disks and bad folders."""

from __future__ import annotations

import pytest

from sd_onnx.cli import main

FAMILIES = ("sd1", "sd2", "sd2-v")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd-onnx: error: "), err
    return err[0]


# ----------------------------------------------------------------------------------------------------------
# 3. sizes that are multiples of 8 but not of 64


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_at_sizes_not_a_multiple_of_64(family, tiny_model, tmp_path):
    """72x136 px is latent 9x17: the tiny UNet downsamples 9 -> 5, and its up-block must come back to 9, not 10."""
    from PIL import Image

    out = tmp_path / "out"
    rc = main(["generate", "a fox", "--model", str(tiny_model(family)), "--steps", "2", "--width", "72",
               "--height", "136", "--seed", "1", "--precision", "fp32", "-o", str(out), "-q"])
    assert rc == 0
    [png] = out.glob("*.png")
    assert Image.open(png).size == (72, 136)
