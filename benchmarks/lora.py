"""LoRA cost at generate time: time to the first UNet step with and without a LoRA (cold, then the same set again),
and peak RSS, on a full-size model folder. One configuration per process (its ru_maxrss is its own):

    python benchmarks/lora.py FOLDER --mode none|lora [--rank 32] [--size 512]

`--link-from CHECKPOINT OUT`: make OUT, a folder of links to FOLDER's files plus the weights.json maps written from
CHECKPOINT (for a folder exported before the maps existed, without exporting it again).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def link_with_maps(folder: Path, checkpoint: Path, out: Path) -> None:
    from sd_onnx.export.checkpoint import load_checkpoint
    from sd_onnx.export.convert import build_reference_model
    from sd_onnx.export.weight_map import ldm_fingerprints, module_fingerprints, write_weight_map

    for path in folder.rglob("*"):
        target = out / path.relative_to(folder)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    ckpt = load_checkpoint(checkpoint)
    ldm = ldm_fingerprints(ckpt.state_dict)
    model = build_reference_model(ckpt)
    for name, module in (("text_encoder", model.text_encoder), ("unet", model.unet)):
        write_weight_map(out / name / "model.onnx", module_fingerprints(module), ldm)


def write_lora(folder: Path, path: Path, rank: int) -> None:
    """Rank-`rank` kohya LoRA over every attention and MLP layer of the UNet and the text encoder."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        layers = json.loads((folder / component / "weights.json").read_text())["layers"]
        for name, entry in layers.items():
            last = name.rsplit(".", 1)[-1]
            if not (("attn" in name and last in ("to_q", "to_k", "to_v", "0", "q_proj", "k_proj", "v_proj", "out_proj"))
                    or ("ff.net" in name) or last in ("fc1", "fc2")):
                continue
            shape = entry["shape"][::-1] if entry["transposed"] else entry["shape"]
            key = prefix + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = (rng.standard_normal((rank, shape[1])) * 0.01).astype(np.float16)
            tensors[f"{key}.lora_up.weight"] = (rng.standard_normal((shape[0], rank)) * 0.01).astype(np.float16)
            tensors[f"{key}.alpha"] = np.array(rank / 2, dtype=np.float16)
    save_file(tensors, str(path))


def first_step(model, prompt: str, size: int) -> float:
    from sd_onnx.runtime.encode import encode_prompts
    from sd_onnx.runtime.networks import activate_extra_networks

    t0 = time.perf_counter()
    networks = activate_extra_networks(model, prompt, "")
    cond = encode_prompts(model, networks.prompt, networks.negative_prompt, networks.embeddings)
    latent = np.zeros((2, 4, size // 8, size // 8), np.float32)
    model.session("unet").run({"sample": latent, "timestep": np.array([999.0, 999.0], np.float32),
                               "encoder_hidden_states": np.concatenate([cond.cond, cond.uncond])})
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--mode", choices=["none", "lora"], default="lora")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--link-from", nargs=2, metavar=("CHECKPOINT", "OUT"))
    args = parser.parse_args()
    if args.link_from:
        link_with_maps(args.folder, Path(args.link_from[0]), Path(args.link_from[1]))
        return
    from sd_onnx.runtime.model import LoadedModel

    loras = Path(tempfile.mkdtemp())
    try:
        t0 = time.perf_counter()
        write_lora(args.folder, loras / "bench.safetensors", args.rank)
        size_mb = (loras / "bench.safetensors").stat().st_size / 1e6
        print(f"LoRA rank {args.rank}: {size_mb:.0f} MB written in {time.perf_counter() - t0:.1f} s")
        model = LoadedModel(args.folder, "cpu", keep_loaded=True)
        model.lora_dir, model.embeddings_dir = loras, loras / "none"
        prompt = "a cat" + (" <lora:bench:0.8>" if args.mode == "lora" else "")
        cold = first_step(model, prompt, args.size)
        again = first_step(model, prompt, args.size)  # same set: session kept, nothing patched again
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(json.dumps({"mode": args.mode, "rank": args.rank, "size": args.size, "first_step_cold_s": round(cold, 1),
                          "first_step_same_set_s": round(again, 1), "peak_rss_gb": round(peak, 2)}))
    finally:
        shutil.rmtree(loras)


if __name__ == "__main__":
    main()
