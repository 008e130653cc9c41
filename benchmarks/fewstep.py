"""Few-step end to end: a 512x512 image at 4 LCM steps + TAESD, cold process from prompt to PNG, ours against an
optimum-style OpenVINO pipeline on the same model, interleaved rounds in one run.

    python benchmarks/make_checkpoint.py /tmp/fsbench/lcm-random.safetensors --cond-proj-dim 256
    sd-onnx export /tmp/fsbench/lcm-random.safetensors -o /tmp/fsbench/lcm
    python benchmarks/fewstep.py --model /tmp/fsbench/lcm --home /tmp/fsbench/home   # makes a random TAESD there
Configurations (each one image in a fresh process; wall time of the whole process and its peak RSS, from wait4):
  ours-ort        `sd-onnx generate --sampler LCM --steps 4 --cfg 8 --vae taesd --device cpu` (ONNX Runtime)
  ours-openvino   the same with --device openvino (f32)
  ours-auto       the same with --device auto: on a BF16 CPU with OpenVINO, bf16 arithmetic on the fp32 folder (#22)
  peer-openvino   what optimum-intel's OVLatentConsistencyModelPipeline does, written out (optimum-intel would pull
                  another torch into this venv): our folder's text encoder and UNet and the TAESD decoder compiled
                  by OpenVINO with its default precision (bf16 on CPUs with AVX512-BF16) and static 512x512 shapes,
                  diffusers' LCMScheduler and guidance embedding, PIL to write the PNG
  ours-ort-full   ours with the full VAE decoder instead of TAESD, for scale
FastSD CPU (`fastsdcpu-pip`) is not run: it installs its own torch/diffusers stack, which this venv must not take.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT, SEED, STEPS, GUIDANCE = "a black house cat typing on a computer", 1, 4, 8.0
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("ours-ort", "ours-openvino", "ours-auto", "peer-openvino", "ours-ort-full")


def make_taesd(home: Path) -> Path:
    """Random-weight TAESD files (speed does not depend on the values) exported as a user would."""
    import torch
    from diffusers import AutoencoderTiny

    from sd_onnx.export.taesd import TAESD_CONFIG, export_vae_approx

    folder = home / "vae-approx" / "taesd"
    if (folder / "vae_decoder" / "model.onnx").is_file():
        return folder
    vae = AutoencoderTiny(**TAESD_CONFIG)
    src = home / "taesd-src"
    src.mkdir(parents=True, exist_ok=True)
    torch.save(dict(vae.encoder.layers.state_dict()), src / "taesd_encoder.pth")
    torch.save({f"{int(k.split('.', 1)[0]) + 1}.{k.split('.', 1)[1]}": v
                for k, v in vae.decoder.layers.state_dict().items()}, src / "taesd_decoder.pth")
    return export_vae_approx([src / "taesd_decoder.pth", src / "taesd_encoder.pth"], folder).folder


def peer(model: Path, taesd: Path, out: Path) -> None:
    """optimum-intel's OpenVINO LCM pipeline, written out (see the module docstring)."""
    import numpy as np
    import openvino as ov
    import torch
    from diffusers import LCMScheduler, LatentConsistencyModelPipeline
    from PIL import Image
    from transformers import CLIPTokenizer

    core = ov.Core()

    def compile_(path: Path, shapes: dict):
        m = core.read_model(str(path))
        m.reshape(shapes)
        return core.compile_model(m, "CPU")

    config = json.loads((model / "unet" / "config.json").read_text())
    text = compile_(model / "text_encoder" / "model.onnx", {"input_ids": [1, 77]})
    unet = compile_(model / "unet" / "model.onnx", {"sample": [1, 4, 64, 64], "timestep": [1],
                                                     "encoder_hidden_states": [1, 77, config["cross_attention_dim"]],
                                                     "timestep_cond": [1, config["time_cond_proj_dim"]]})
    decoder = compile_(taesd / "vae_decoder" / "model.onnx", {"latent_sample": [1, 4, 64, 64]})
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    scheduler = LCMScheduler.from_config(json.loads((model / "scheduler" / "scheduler_config.json").read_text()))
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    context = text({"input_ids": ids.astype(np.int32)})[0]
    w = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor([GUIDANCE - 1]), embedding_dim=config["time_cond_proj_dim"]).numpy()
    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn((1, 4, 64, 64), generator=generator)
    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        out_sample = unet({"sample": latents.numpy(), "timestep": np.array([t], np.float32),
                           "encoder_hidden_states": context, "timestep_cond": w})[0]
        latents, denoised = scheduler.step(torch.from_numpy(out_sample), t, latents, generator=generator,
                                           return_dict=False)
    image = decoder({"latent_sample": denoised.numpy()})[0]
    Image.fromarray((np.clip(image[0] / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(out)


def command(config: str, model: Path, out: Path, home: Path) -> list[str]:
    if config == "peer-openvino":
        return [sys.executable, __file__, "--peer", "--model", str(model), "--home", str(home), "--out", str(out)]
    cmd = [sys.executable, "-m", "sd_onnx", "generate", PROMPT, "--model", str(model), "--sampler", "LCM",
           "--steps", str(STEPS), "--cfg", str(GUIDANCE), "--seed", str(SEED), "-o", str(out.parent), "-q",
           "--device", {"ours-openvino": "openvino", "ours-auto": "auto"}.get(config, "cpu")]
    return cmd + ([] if config == "ours-ort-full" else ["--vae", "taesd"])


def timed(cmd: list[str], env: dict) -> dict:
    """Wall time and peak RSS of one process (wait4's rusage: that child alone)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}): {stderr.strip()[-500:]}")
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),
            "detail": stderr.strip().splitlines()[-1] if stderr.strip() else stdout.strip()[-200:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported LCM model folder (timestep_cond)")
    parser.add_argument("--home", type=Path, required=True, help="$SD_ONNX_HOME: its TAESD, and our caches")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--make-taesd", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fsbench/out/peer.png"))
    args = parser.parse_args()
    args.home = args.home.resolve()
    if args.peer:
        peer(args.model, args.home / "vae-approx" / "taesd", args.out)
        return
    env = dict(os.environ, SD_ONNX_HOME=str(args.home), PYTHONPATH=str(ROOT))
    if args.make_taesd:
        make_taesd(args.home)
        return
    # in a child: Linux keeps ru_maxrss across fork and exec, so a parent that imported torch would set every
    # child's peak RSS floor at its own
    subprocess.run([sys.executable, __file__, "--make-taesd", "--model", str(args.model), "--home", str(args.home)],
                   check=True, env=env)
    names = args.configs.split(",")
    out = args.home.parent / "out"
    out.mkdir(parents=True, exist_ok=True)
    for name in names:  # a user's first start on a machine fills the caches once: not part of the figures
        if name.startswith("ours"):
            timed(command(name, args.model, out / f"{name}.png", args.home), env)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for round_no in range(args.rounds):
        for name in names:
            result = timed(command(name, args.model, out / f"{name}.png", args.home), env)
            runs[name].append(result)
            print(f"  round {round_no + 1} {name}: {result}", file=sys.stderr, flush=True)
    medians = {n: statistics.median(r["wall_s"] for r in rs) for n, rs in runs.items()}
    peers = [medians[n] for n in names if n.startswith("peer")]
    print(json.dumps({"medians_s": medians, "peak_rss_gb": {n: max(r["peak_rss_gb"] for r in rs)
                                                             for n, rs in runs.items()},
                      "ratio_to_fastest_peer": {n: round(m / min(peers), 3) for n, m in medians.items()}
                      if peers else {}}, indent=2))


if __name__ == "__main__":
    main()
