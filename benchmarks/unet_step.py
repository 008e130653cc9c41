"""One UNet step at 512x512 with guidance (batch 2, 64x64 latent, 77 tokens): ours against the peers, one run.

Each configuration runs in its own process (clean peak RSS, no shared caches), one after another, with the
same inputs; the table gives median and min seconds, the ratio to the fastest peer and GFLOP/s.
    python benchmarks/unet_step.py --checkpoint /tmp/bench/sd15-random.safetensors --model /tmp/bench/sd15
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STEP_TFLOP = 1.354  # SD 1.5 UNet, batch 2, 64x64 latent, 77 tokens (shared/MEASUREMENTS.md)
CONFIGS = {
    # name: (is ours, description)
    "torch-fp32": (False, "PyTorch eager fp32 (diffusers UNet2DConditionModel)"),
    "torch-bf16": (False, "PyTorch eager bf16 autocast"),
    "openvino-bf16-hint": (False, "OpenVINO on our ONNX, bf16 inference precision hint"),
    "ours-ort-cpu": (True, "sd-onnx: ONNX Runtime CPU, fp32 (what --device cpu runs)"),
    "ours-openvino": (True, "sd-onnx: OpenVINO CPU, fp32 (what --device openvino runs)"),
}


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 4, 64, 64), dtype=np.float32), np.array([500.0, 500.0], dtype=np.float32),
            rng.standard_normal((2, 77, 768), dtype=np.float32))


def make_runner(name: str, checkpoint: Path, model: Path):
    sample, t, ctx = inputs()
    if name.startswith("torch"):
        import torch

        from sd_onnx.export.checkpoint import load_checkpoint
        from sd_onnx.export.convert import build_reference_model

        unet = build_reference_model(load_checkpoint(checkpoint)).unet
        args = (torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(ctx))

        def run():
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=name == "torch-bf16"):
                return unet(*args, return_dict=False)[0]

        return run
    from sd_onnx.runtime.providers import resolve_device
    from sd_onnx.runtime.sessions import OpenVinoSession, open_session

    feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": ctx}
    if name == "openvino-bf16-hint":
        import openvino as ov

        compiled = ov.Core().compile_model(str(model / "unet" / "model.onnx"), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "bf16"})
        request = compiled.create_infer_request()
        return lambda: request.infer(feeds)
    device = resolve_device("openvino" if name == "ours-openvino" else "cpu")
    session = open_session(model, "unet", device)
    assert name != "ours-openvino" or isinstance(session, OpenVinoSession)
    return lambda: session.run(feeds)


def child(name: str, checkpoint: Path, model: Path, warmup: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    run = make_runner(name, checkpoint, model)
    load = time.perf_counter() - t0
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"name": name, "load_s": load, "times": times,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="full-size LDM checkpoint (make_checkpoint.py)")
    parser.add_argument("--model", type=Path, required=True, help="its exported model folder (sd-onnx export)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.checkpoint, args.model, args.warmup, args.repeats)))
        return
    results = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--model", str(args.model),
               "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--child", name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  {name}: median {statistics.median(r['times']):.2f} s", file=sys.stderr)
    peers = [statistics.median(r["times"]) for r in results if not CONFIGS[r["name"]][0]]
    best_peer = min(peers) if peers else float("nan")
    print("| configuration | median s | min s | vs fastest peer | GFLOP/s | load s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        med = statistics.median(r["times"])
        print(f"| {CONFIGS[r['name']][1]} | {med:.2f} | {min(r['times']):.2f} | {med / best_peer:.2f}x | "
              f"{STEP_TFLOP * 1000 / med:.0f} | {r['load_s']:.1f} | {r['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
