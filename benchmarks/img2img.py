"""img2img beside txt2img at 512x512 (20 Euler steps, img2img strength 0.6): ours against diffusers' torch
img2img pipeline, interleaved, each image from a cold process.

    python benchmarks/img2img.py --checkpoint /tmp/bench/sd15-random.safetensors --model /tmp/bench/sd15m
Configurations:
  ours-txt2img      sd-onnx txt2img, ONNX Runtime CPU (the reference point of the table)
  ours-img2img      sd-onnx img2img: VAE encode, then A1111's int(0.6 * 20) + 1 = 13 steps, VAE decode
  torch-img2img     diffusers StableDiffusionImg2ImgPipeline, PyTorch eager fp32, strength 13/20 (the same 13
                    steps of the same 20-step schedule)
Each child reports the whole time (load to image), the sampling steps it saw and its peak RSS. Our configurations run
with a fresh $SD_ONNX_HOME whose caches are filled once before round 1, as end_to_end.py does.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from timing import HOME_HELP, bench_home, run_child, torch_pipeline  # benchmarks/timing.py (scripts run from their folder)

PROMPT, NEGATIVE, STEPS, SEED, CFG, STRENGTH, SIZE = "a black house cat typing on a computer", "blurry", 20, 1, 7.0, 0.6, 512
RUN_STEPS = {"ours-txt2img": STEPS, "ours-img2img": int(STRENGTH * STEPS) + 1, "torch-img2img": int(STRENGTH * STEPS) + 1}
CONFIGS = {
    "ours-txt2img": (True, f"sd-onnx txt2img fp32, ORT CPU, {STEPS} steps"),
    "ours-img2img": (True, f"sd-onnx img2img fp32, ORT CPU, strength {STRENGTH} ({RUN_STEPS['ours-img2img']} steps)"),
    "torch-img2img": (False, "diffusers StableDiffusionImg2ImgPipeline, PyTorch fp32, the same 13 steps"),
}


def init_picture():
    from PIL import Image

    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x / SIZE, y / SIZE, ((x - SIZE / 2) ** 2 + (y - SIZE / 2) ** 2 < (SIZE / 3) ** 2) * 0.8], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def _ours(folder: Path, img2img: bool):
    from sd_onnx.runtime.pipeline import generate
    from sd_onnx.runtime.requests import GenerateRequest, Img2ImgRequest

    common = dict(steps=STEPS, cfg_scale=CFG, sampler="Euler", seed=SEED, width=SIZE, height=SIZE)
    request = (Img2ImgRequest(PROMPT, NEGATIVE, init_image=init_picture(), denoising_strength=STRENGTH, **common)
               if img2img else GenerateRequest(PROMPT, NEGATIVE, **common))
    return lambda on_step: generate(folder, request, device="cpu",
                                    progress=lambda label: lambda i, n: on_step()).images[0].image


def _torch(checkpoint: Path, workdir: Path):
    import torch

    pipe = torch_pipeline("StableDiffusionImg2ImgPipeline", checkpoint, workdir)

    def run(on_step):
        def step_end(pipeline, i, t, kwargs):
            on_step()
            return kwargs

        with torch.inference_mode():
            # strength' = 13.5 / 20: int(20 * strength') = 13 steps, A1111's count for 0.6 (see tests/test_img2img.py)
            return pipe(PROMPT, negative_prompt=NEGATIVE, image=init_picture(), strength=(RUN_STEPS["torch-img2img"]
                        + 0.5) / STEPS, num_inference_steps=STEPS, guidance_scale=CFG,
                        generator=torch.Generator().manual_seed(SEED), output_type="np",
                        callback_on_step_end=step_end).images[0]

    return run


def fill_caches(folder: Path) -> dict:
    from sd_onnx.runtime.providers import resolve_device
    from sd_onnx.runtime.sessions import open_session

    t0 = time.perf_counter()
    for component in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        open_session(folder, component, resolve_device("cpu"))
    return {"first_start_s": time.perf_counter() - t0}


def child(config: str, checkpoint: Path, folder: Path, workdir: Path) -> dict:
    warnings.simplefilter("ignore")
    steps: list[float] = []
    t0 = time.perf_counter()
    run = _torch(checkpoint, workdir) if config == "torch-img2img" else _ours(folder, config == "ours-img2img")
    built = time.perf_counter() - t0
    image = np.asarray(run(lambda: steps.append(time.perf_counter() - t0)))
    total = time.perf_counter() - t0
    if len(steps) != RUN_STEPS[config] or image.shape != (SIZE, SIZE, 3):
        raise RuntimeError(f"{config}: {len(steps)} steps, image {image.shape}; expected {RUN_STEPS[config]} steps")
    return {"total_s": total, "build_s": built, "first_step_s": steps[0],
            "step_median_s": statistics.median(np.diff(steps)) if len(steps) > 1 else float("nan"),
            "decode_s": total - steps[-1], "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="full-size LDM checkpoint (make_checkpoint.py)")
    parser.add_argument("--model", type=Path, required=True, help="its exported model folder (sd-onnx export)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sd-onnx-img2img"))
    parser.add_argument("--home", type=Path, help=HOME_HELP)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "fill":
        print(json.dumps(fill_caches(args.model)))
        return
    if args.child:
        args.workdir.mkdir(parents=True, exist_ok=True)
        print(json.dumps(child(args.child, args.checkpoint, args.model, args.workdir)))
        return
    names = args.configs.split(",")
    bench_home(args.home)
    command = lambda child: [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--model",  # noqa: E731
                             str(args.model), "--workdir", str(args.workdir), "--child", child]
    filled = run_child(command("fill"), "fill")
    print(f"  first start, filling the caches: {filled['first_start_s'] if filled else float('nan'):.1f} s",
          file=sys.stderr, flush=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for round_no in range(args.rounds):
        for name in names:
            result = run_child(command(name), name)
            if result is not None:
                runs[name].append(result)
                print(f"  round {round_no + 1} {name}: {result}", file=sys.stderr, flush=True)
    medians = {n: statistics.median(r["total_s"] for r in rs) for n, rs in runs.items() if rs}
    base = medians.get("ours-txt2img", float("nan"))
    peer = medians.get("torch-img2img", float("nan"))
    print(f"| configuration (512x512, CFG {CFG:g}) | image s (median) | vs our txt2img | vs torch img2img | "
          "s/step | decode s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for name, med in medians.items():
        rs = runs[name]
        mid = lambda key, rs=rs: statistics.median(r[key] for r in rs)
        print(f"| {CONFIGS[name][1]} | {med:.1f} | {med / base:.2f}x | {med / peer:.2f}x | "
              f"{mid('step_median_s'):.2f} | {mid('decode_s'):.1f} | {max(r['peak_rss_gb'] for r in rs):.2f} |")


if __name__ == "__main__":
    main()
