"""#20 on a GPU: our fp32 and fp16 UNet step and 20-step image on CUDA against ONNX Runtime's plain export, ONNX
Runtime's own SD fp16 optimization of the same export, and PyTorch fp16, in one run (benchmarks/gpu.sh runs it).

    python benchmarks/gpu_step.py --workdir /tmp/sd-onnx-gpu-bench          # full-size SD 1.5, random weights, CUDA
    python benchmarks/gpu_step.py --workdir /tmp/sd-onnx-gpu-dry --tiny      # dry run: tiny model, CPU provider

Prepares in --workdir (kept, so a second run measures at once): a random-weight checkpoint (make_checkpoint.py's
generator), our export and a plain one (--no-optimize), our fp16 variant (`sd-onnx quantize --fp16`, short
calibration), and ONNX Runtime's own fp16 UNet (what its models/stable_diffusion/optimize_pipeline.py --float16
does: optimize_model(model_type="unet", use_gpu=True) with its fp16 fusion options, then convert_float_to_float16).
Each configuration then runs in a process of its own (clean GPU memory): a UNet step with guidance (batch 2,
64x64 latent, 77 tokens), median of --repeats after --warmup; ours and PyTorch also make a 512x512 image in 20
Euler steps (median of two after one warm-up image). Ours open a fresh $SD_ONNX_HOME, so their first load includes
the one-time GPU fusion pass (reported as "load s").
--tiny runs every phase on the tiny test architecture with CPUExecutionProvider and PyTorch fp32 on the CPU (CUDA-only
fusions off): it checks that the script works before a GPU is lent; its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from timing import measure, run_child  # benchmarks/timing.py (scripts run from their folder)

PROMPT, NEGATIVE, SEED, CFG = "a black house cat typing on a computer", "blurry", 1, 7.0
CONFIGS = {
    # name: (is ours, description, folder it runs)
    "ours-fp32": (True, "sd-onnx fp32 folder (GPU fusions made at first start, cached)", "fp32"),
    "ours-fp16": (True, "sd-onnx fp16 variant (`quantize --fp16`)", "fp16"),
    "ort-plain": (False, "ONNX Runtime, plain export, no optimization, default options", "plain"),
    "ort-fp16": (False, "ONNX Runtime's own SD fp16 optimization of the plain export (optimize_pipeline-style)",
                 "ort-fp16"),
    "torch-fp16": (False, "PyTorch fp16, diffusers UNet2DConditionModel .half()", None),
}
IMAGE_CONFIGS = ("ours-fp32", "ours-fp16", "torch-fp16")


class Setup:
    def __init__(self, workdir: Path, tiny: bool):
        self.workdir, self.tiny = workdir, tiny
        self.checkpoint = workdir / ("tiny-sd1.ckpt" if tiny else "sd15-random.safetensors")
        self.folders = {"fp32": workdir / "sd15", "plain": workdir / "sd15-plain", "fp16": workdir / "sd15-fp16",
                        "ort-fp16": workdir / "ort-fp16"}
        self.size = 64 if tiny else 512
        self.steps = 20
        self.device = "cpu" if tiny else "cuda"
        self.provider = "CPUExecutionProvider" if tiny else "CUDAExecutionProvider"

    def args(self) -> list[str]:
        return ["--workdir", str(self.workdir)] + (["--tiny"] if self.tiny else [])


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(setup: Setup) -> None:
    """Make what is missing in the work folder; each step leaves a complete result or nothing."""
    setup.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SD_ONNX_HOME=str(setup.workdir / "prep-home"))
    if not setup.checkpoint.is_file():
        t0 = time.perf_counter()
        from sd_onnx.export.synthetic import write_checkpoint

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the tiny architecture has no bundled config: its YAML goes beside it; full size finds the bundled one
            write_checkpoint(setup.checkpoint, "sd1", size="tiny" if setup.tiny else "full", seed=0,
                             with_yaml=setup.tiny)
        say(f"checkpoint: {time.perf_counter() - t0:.0f} s")
    exports = []
    for name, extra in (("fp32", []), ("plain", ["--no-optimize"])):  # both at once: they use separate cores
        if not (setup.folders[name] / "model_index.json").is_file():
            cmd = [sys.executable, "-m", "sd_onnx", "export", str(setup.checkpoint), "-o", str(setup.folders[name]),
                   "--force", "-q", *extra]
            exports.append((name, subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)))
    t0 = time.perf_counter()
    for name, proc in exports:
        _, err = proc.communicate()
        if proc.returncode:
            sys.exit(f"export of the {name} folder failed:\n{err[-2000:]}")
    if exports:
        say(f"exports ({', '.join(n for n, _ in exports)}): {time.perf_counter() - t0:.0f} s")
    if not (setup.folders["fp16"] / "model_index.json").is_file():
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "sd_onnx", "quantize", str(setup.folders["fp32"]), "--fp16", "-o",
               str(setup.folders["fp16"]), "--force", "-q", "--calibration-steps", "2", "--calibration-size", "64",
               "--fidelity-steps", "2"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"quantize --fp16 failed:\n{proc.stderr[-2000:]}")
        say(f"fp16 variant: {time.perf_counter() - t0:.0f} s")
    if not (setup.folders["ort-fp16"] / "unet" / "model.onnx").is_file():
        t0 = time.perf_counter()
        ort_own_fp16(setup.folders["plain"] / "unet" / "model.onnx", setup.folders["ort-fp16"] / "unet", setup.tiny)
        say(f"ONNX Runtime's own fp16 UNet: {time.perf_counter() - t0:.0f} s")


def ort_own_fp16(src: Path, out: Path, tiny: bool) -> None:
    """What ONNX Runtime's optimize_pipeline.py --float16 does to an SD 1.x UNet, by its own library calls: its fusion
    options for fp16 (packed QKV/KV, BiasAdd), GPU fusions, then the whole graph to fp16 (fp16 inputs and outputs,
    no op kept fp32). --tiny: the CPU's fusions only, so the graph runs on the CPU provider."""
    import onnxruntime.transformers.optimizer as ort_optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("unet")
    options.enable_packed_kv = options.enable_packed_qkv = options.enable_bias_add = not tiny
    if tiny:
        for name in ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu"):
            setattr(options, name, False)
    from sd_onnx.export.optimize import _numpy2_num_heads

    # the one change to ORT's pass: its head count read fails on NumPy 2 (int() of a 1-element array); same value
    with _numpy2_num_heads():
        model = ort_optimizer.optimize_model(str(src), model_type="unet", num_heads=0, hidden_size=0, opt_level=0,
                                             optimization_options=options, use_gpu=not tiny)
    say(f"  ONNX Runtime's fusions: {dict((k, v) for k, v in model.get_fused_operator_statistics().items() if v)}")
    model.convert_float_to_float16(keep_io_types=False, op_block_list=[])
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=True)
    tmp.rename(out)


def unet_inputs(setup: Setup, folder: Path | None, half: bool):
    config = json.loads((setup.folders["fp32"] / "unet" / "config.json").read_text())
    rng = np.random.default_rng(0)
    side = setup.size // 8
    dtype = np.float16 if half else np.float32
    return {"sample": rng.standard_normal((2, 4, side, side)).astype(dtype),
            "timestep": np.array([500.0, 500.0], dtype),
            "encoder_hidden_states": rng.standard_normal((2, 77, int(config["cross_attention_dim"]))).astype(dtype)}


def step_runner(name: str, setup: Setup):
    """Build one configuration's UNet step; the callable runs one step to a host array."""
    if name == "torch-fp16":
        import torch

        from sd_onnx.export.checkpoint import load_checkpoint
        from sd_onnx.export.convert import build_reference_model

        device, dtype = ("cpu", torch.float32) if setup.tiny else ("cuda", torch.float16)
        unet = build_reference_model(load_checkpoint(setup.checkpoint)).unet.to(device, dtype).eval()
        feeds = [torch.from_numpy(a).to(device, dtype) for a in unet_inputs(setup, None, False).values()]

        def run():
            with torch.inference_mode():
                return unet(*feeds, return_dict=False)[0].float().cpu().numpy()

        return run
    import onnxruntime as ort

    folder = setup.folders[CONFIGS[name][2]]
    if name.startswith("ort-"):
        getattr(ort, "preload_dlls", lambda: None)()  # CUDA/cuDNN from the installed torch / nvidia wheels
        session = ort.InferenceSession(str(folder / "unet" / "model.onnx"), providers=[setup.provider])
        check_provider(session.get_providers(), setup)
        feeds = unet_inputs(setup, folder, half=name == "ort-fp16")
        return lambda: session.run(None, feeds)[0]
    from sd_onnx.runtime.providers import resolve_device
    from sd_onnx.runtime.sessions import open_session

    getattr(ort, "preload_dlls", lambda: None)()
    session = open_session(folder, "unet", resolve_device(setup.device))
    check_provider(session._session.get_providers(), setup)
    feeds = unet_inputs(setup, folder, half=False)  # our folders keep fp32 inputs and outputs
    return lambda: session.run(feeds)[0]


def check_provider(used: list[str], setup: Setup) -> None:
    if used[0] != setup.provider:
        raise SystemExit(f"the session runs on {used[0]}, not {setup.provider}")


def image_runner(name: str, setup: Setup):
    """Build one configuration's 20-step image; the callable makes it and gives its stage timings."""
    if name == "torch-fp16":
        import torch
        from timing import torch_pipeline

        device, dtype = ("cpu", torch.float32) if setup.tiny else ("cuda", torch.float16)
        pipe = torch_pipeline("StableDiffusionPipeline", setup.checkpoint, setup.workdir / "torch").to(device, dtype)

        def run():
            with torch.inference_mode():
                pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=setup.steps, guidance_scale=CFG,
                     height=setup.size, width=setup.size, generator=torch.Generator().manual_seed(SEED),
                     output_type="np")
            return {}

        return run
    import onnxruntime as ort

    from sd_onnx.runtime.pipeline import GenerateRequest, generate

    getattr(ort, "preload_dlls", lambda: None)()
    folder = setup.folders[CONFIGS[name][2]]
    request = GenerateRequest(PROMPT, NEGATIVE, steps=setup.steps, cfg_scale=CFG, sampler="Euler", seed=SEED,
                              width=setup.size, height=setup.size)

    def run():
        result = generate(folder, request, device=setup.device)
        check_provider([result.device.providers[0]], setup)
        return result.timings

    return run


def child(kind: str, name: str, setup: Setup, warmup: int, repeats: int) -> dict:
    warnings.simplefilter("ignore")
    if kind == "step":
        return {"name": name, **measure(lambda: step_runner(name, setup), warmup, repeats)}
    run = image_runner(name, setup)
    run()  # a first image: fills the caches, warms cuDNN's algorithm search
    times, stages = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        stages.append(run())
        times.append(time.perf_counter() - t0)
    return {"name": name, "times": times, "stages": stages[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="checkpoint, exports and variants (kept)")
    parser.add_argument("--tiny", action="store_true", help="dry run: tiny model, CPU provider")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed UNet steps per configuration")
    parser.add_argument("--no-images", action="store_true", help="UNet steps only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup = Setup(args.workdir.resolve(), args.tiny)
    if args.child:
        kind, name = args.child.split(":", 1)
        print(json.dumps(child(kind, name, setup, args.warmup, args.repeats)))
        return
    unknown = [n for n in args.configs.split(",") if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configuration {unknown[0]!r}; valid: {', '.join(CONFIGS)}")
    start = time.perf_counter()
    prepare(setup)
    names = args.configs.split(",")
    # ours start from an empty cache: their first load includes the GPU fusion pass, as a user's first start does
    os.environ["SD_ONNX_HOME"] = str(setup.workdir / f"home-{int(time.time())}")
    steps, images = {}, {}
    for name in names:
        cmd = [sys.executable, __file__, *setup.args(), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
               "--child", f"step:{name}"]
        steps[name] = run_child(cmd, name)
        if steps[name]:
            say(f"  step {name}: median {statistics.median(steps[name]['times']) * 1000:.1f} ms, "
                f"load {steps[name]['load_s']:.1f} s")
    for name in [] if args.no_images else [n for n in names if n in IMAGE_CONFIGS]:
        images[name] = run_child([sys.executable, __file__, *setup.args(), "--child", f"image:{name}"], name)
        if images[name]:
            say(f"  image {name}: {images[name]['times']}")
    report(setup, steps, images, time.perf_counter() - start)


def report(setup: Setup, steps: dict, images: dict, seconds: float) -> None:
    from sd_onnx.quantize.fidelity import component_sizes

    where = ("CPU provider, tiny model, PyTorch in fp32 on the CPU: a dry run, not GPU figures" if setup.tiny
             else f"{setup.provider}, SD 1.5")
    print(f"UNet step with guidance (batch 2, {setup.size // 8}x{setup.size // 8} latent), {where}")
    print("| configuration | median ms | min ms | load s | peak RSS GB |")
    print("|---|---|---|---|---|")
    med = {}
    for name, r in steps.items():
        if r:
            med[name] = statistics.median(r["times"])
            print(f"| {CONFIGS[name][1]} | {med[name] * 1000:.1f} | {min(r['times']) * 1000:.1f} | "
                  f"{r['load_s']:.1f} | {r['peak_rss_gb']:.2f} |")
        else:
            print(f"| {CONFIGS[name][1]} | failed | | | |")
    if images:
        print(f"\n{setup.steps}-step {setup.size}x{setup.size} image, Euler, CFG {CFG} (second and third image of "
              "one process)")
        print("| configuration | median s | sampling s |")
        print("|---|---|---|")
        for name, r in images.items():
            sampling = r["stages"].get("sampling_s", "") if r else ""
            print(f"| {CONFIGS[name][1]} | {statistics.median(r['times']):.2f} | {sampling} |" if r
                  else f"| {CONFIGS[name][1]} | failed | |")
    sizes = {p: round(component_sizes(setup.folders[p], ["unet"])["unet"], 1) for p in ("fp32", "fp16")
             if (setup.folders[p] / "unet").is_dir()}
    print(f"\nUNet folder MB: fp32 {sizes.get('fp32')}, fp16 {sizes.get('fp16')}"
          + (f" ({sizes['fp16'] / sizes['fp32']:.3f})" if len(sizes) == 2 else ""))
    for label, num, den, target in (("our fp16 step / our fp32 step", "ours-fp16", "ours-fp32", 0.5),
                                    ("our fp16 step / ONNX Runtime's own fp16 step", "ours-fp16", "ort-fp16", 1.0),
                                    ("our fp32 step / ONNX Runtime plain export", "ours-fp32", "ort-plain", None),
                                    ("our fp16 step / PyTorch fp16", "ours-fp16", "torch-fp16", None)):
        if num in med and den in med:
            aim = f" (target <= {target})" if target else ""
            print(f"{label}: {med[num] / med[den]:.2f}{aim}")
    print(f"whole run: {seconds:.0f} s")


if __name__ == "__main__":
    main()
