"""Text encoder ([2,77] tokens, cond+uncond) and VAE decode (512x512) against the peers, interleaved, one run.

    python benchmarks/components.py --checkpoint /tmp/bench/sd15-random.safetensors --model /tmp/bench/sd15m \\
        --plain-model /tmp/bench/sd15
Each (component, configuration) runs in its own process; rounds interleave them. Ours: the sessions that
`sd-onnx generate` opens (ONNX Runtime CPU, OpenVINO). Peers: PyTorch eager (diffusers/transformers modules
built from the same checkpoint), ONNX Runtime with default options on the plain export, OpenVINO f32 on the
plain export.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from timing import measure, run_child  # benchmarks/timing.py (scripts run from their folder)

CONFIGS = {"torch": (False, "PyTorch eager fp32"), "ort-plain": (False, "ONNX Runtime defaults, plain export"),
           "openvino-plain": (False, "OpenVINO f32, plain export"), "ours-ort-cpu": (True, "sd-onnx, ONNX Runtime CPU"),
           "ours-openvino": (True, "sd-onnx, OpenVINO CPU")}
COMPONENTS = ("text_encoder", "vae_decoder")


def feeds(component: str) -> dict:
    rng = np.random.default_rng(0)
    if component == "text_encoder":
        ids = rng.integers(1, 49000, (2, 77)).astype(np.int32)
        ids[:, 0], ids[:, -1] = 49406, 49407
        return {"input_ids": ids}
    return {"latent_sample": rng.standard_normal((1, 4, 64, 64), dtype=np.float32)}


def make_runner(config: str, component: str, checkpoint: Path, folder: Path):
    inputs = feeds(component)
    if config == "torch":
        import torch

        from sd_onnx.export.checkpoint import load_checkpoint
        from sd_onnx.export.convert import build_reference_model

        model = build_reference_model(load_checkpoint(checkpoint))
        if component == "text_encoder":
            module, arg = model.text_encoder, torch.from_numpy(inputs["input_ids"].astype(np.int64))
            call = lambda: module(arg)[0]  # noqa: E731
        else:
            module, arg = model.vae, torch.from_numpy(inputs["latent_sample"])
            call = lambda: module.decode(arg).sample  # noqa: E731

        def run():
            with torch.inference_mode():
                return call()

        return run
    path = folder / component / "model.onnx"
    if config == "ort-plain":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda: session.run(None, inputs)
    if config == "openvino-plain":
        import openvino as ov

        request = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
        return lambda: request.infer(inputs)
    from sd_onnx.runtime.providers import resolve_device
    from sd_onnx.runtime.sessions import open_session

    session = open_session(folder, component, resolve_device("openvino" if config == "ours-openvino" else "cpu"))
    return lambda: session.run(inputs)


def child(config: str, component: str, checkpoint: Path, folder: Path, repeats: int) -> dict:
    return measure(lambda: make_runner(config, component, checkpoint, folder), 1, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--plain-model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder_of = lambda config: args.plain_model if config.endswith("plain") else args.model  # noqa: E731
    if args.child:
        config, component = args.child
        print(json.dumps(child(config, component, args.checkpoint, folder_of(config), args.repeats)))
        return
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for component in COMPONENTS:
            for config in CONFIGS:
                cmd = [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--model", str(args.model),
                       "--plain-model", str(args.plain_model), "--repeats", str(args.repeats),
                       "--child", config, component]
                result = run_child(cmd, f"{component} {config}")
                if result is None:
                    continue
                results.setdefault((component, config), []).append(result)
                print(f"  {component} {config}: {results[(component, config)][-1]['times']}", file=sys.stderr)
    for component in COMPONENTS:
        medians = {c: statistics.median(t for r in results[(component, c)] for t in r["times"])
                   for c in CONFIGS if (component, c) in results}
        best_peer = min(m for c, m in medians.items() if not CONFIGS[c][0])
        print(f"\n{component}\n\n| configuration | median s | min s | vs fastest peer | load s | peak RSS GB |")
        print("|---|---|---|---|---|---|")
        for config, med in medians.items():
            rs = results[(component, config)]
            print(f"| {CONFIGS[config][1]} | {med:.3f} | {min(t for r in rs for t in r['times']):.3f} | "
                  f"{med / best_peer:.2f}x | {statistics.median(r['load_s'] for r in rs):.1f} | "
                  f"{max(r['peak_rss_gb'] for r in rs):.2f} |")


if __name__ == "__main__":
    main()
