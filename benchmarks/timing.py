"""Shared by the benchmark scripts: time a callable after building it, the way every child process does, and run
such a child."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HOME_HELP = "$SD_ONNX_HOME for our configurations (default: a fresh temporary folder, removed at the end)"
_scratch: list[tempfile.TemporaryDirectory] = []


def measure(build: Callable[[], Callable[[], object]], warmup: int = 1, repeats: int = 3) -> dict:
    """Build the runner (timed as load_s), run it `warmup` times (the first timed as first_s), then `repeats`
    timed runs; peak_rss_gb is this process's high-water mark."""
    t0 = time.perf_counter()
    run = build()
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"load_s": load, "first_s": first, "times": times,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_child(cmd: list[str], label: str) -> dict | None:
    """Run one configuration's child process; its last stdout line is its JSON result. A failure is reported with
    the end of its stderr and gives None, so one broken configuration does not end an hour-long run."""
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{label}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_home(home: Path | None) -> Path:
    """Point $SD_ONNX_HOME, for this process and every child it runs, at `home`, or at a fresh temporary folder
    (removed when this process exits), so our configurations start with the runtimes' caches empty."""
    if home is None:
        _scratch.append(tempfile.TemporaryDirectory(prefix="sd-onnx-bench-home-"))
        home = Path(_scratch[-1].name)
    os.environ["SD_ONNX_HOME"] = str(home)
    return home


def torch_pipeline(pipeline_class: str, checkpoint: Path, workdir: Path):
    """A diffusers pipeline (PyTorch eager fp32, Euler with A1111's linspace grid) on the modules built from an LDM
    checkpoint: the peer that end_to_end.py and img2img.py time against."""
    import diffusers
    from transformers import CLIPTokenizer

    from sd_onnx.export.checkpoint import load_checkpoint
    from sd_onnx.export.convert import build_reference_model
    from sd_onnx.runtime.tokenizer import write_tokenizer_folder

    model = build_reference_model(load_checkpoint(checkpoint))
    write_tokenizer_folder(workdir / "tokenizer", pad_token=model.family.pad_token)
    pipe = getattr(diffusers, pipeline_class)(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=CLIPTokenizer.from_pretrained(workdir / "tokenizer"),
        unet=model.unet, scheduler=diffusers.EulerDiscreteScheduler.from_config(model.scheduler_config,
                                                                                timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def auto_choice(folder: Path):
    """The variant and device `generate --device auto --precision auto` takes for `folder` on this machine, and a
    line saying which."""
    from sd_onnx.home import check_folder
    from sd_onnx.runtime.providers import cpu_info, resolve_device
    from sd_onnx.runtime.variants import choose_variant, precision_of

    variant, why = choose_variant(folder, "auto", "auto", cpu_info()["flags"])
    device = resolve_device("auto", precision=precision_of(check_folder(variant)), arithmetic="auto")
    return variant, device, f"{variant.name}, {why}, on {device.name} ({device.reason})"
