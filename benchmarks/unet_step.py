"""One UNet step at 512x512 with guidance (batch 2, 64x64 latent, 77 tokens): ours and our variants against the
peers, measured in one run.

Each configuration runs in its own process (clean peak RSS, no shared caches). Rounds interleave them (round 1
runs every configuration, then round 2 ...), so a slow minute on a shared machine touches all of them; the table
gives the median and min over all timed steps, the ratio to the fastest peer, GFLOP/s and the fraction of this
CPU's matmul peak (fp32 for float paths, u8s8 for int8), probed in a separate process right after each
configuration's steps, since the machine's speed drifts within a run. The step's FLOPs are counted by PyTorch's
FlopCounterMode on the model's own diffusers config (1.607 TFLOP for SD 1.5), and also without the attention
products (1.354, the count issue #6 and shared/MEASUREMENTS.md used).
    python benchmarks/unet_step.py --checkpoint /tmp/bench/sd15-random.safetensors --model /tmp/bench/sd15 \\
        --plain-model /tmp/bench/sd15-plain
Variants are looked up beside --model as <model>-int8 and <model>-bf16 (sd-onnx quantize writes them there).
Our configurations run with a fresh $SD_ONNX_HOME (or --home), so round 1 is a first start that fills the runtimes'
caches (ONNX Runtime's optimized graph, OpenVINO's compiled model) and later rounds start from them: the table
gives both start times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from timing import HOME_HELP, auto_choice, bench_home, measure, run_child  # benchmarks/timing.py (scripts run from their folder)

CONFIGS = {
    # name: (is ours, description, precision of its arithmetic for the peak comparison)
    "torch-fp32": (False, "PyTorch eager fp32 (diffusers UNet2DConditionModel)", "fp32"),
    "torch-bf16": (False, "PyTorch eager bf16 autocast", "bf16"),
    "ort-plain": (False, "ONNX Runtime CPU, plain torch.onnx export (no fusions), defaults", "fp32"),
    "openvino-fp32": (False, "OpenVINO CPU on the plain export, f32 hint", "fp32"),
    "openvino-bf16-hint": (False, "OpenVINO CPU on the plain export, bf16 inference precision hint", "bf16"),
    "openvino-bf16-static": (False, "OpenVINO CPU on the plain export, bf16 hint, reshaped to the request's static "
                                    "shapes (as optimum-intel and FastSD CPU run it)", "bf16"),
    "ours-ort-cpu": (True, "sd-onnx fp32: ONNX Runtime CPU (what --device cpu runs)", "fp32"),
    "ours-ort-extended": (True, "sd-onnx fp32 as before the graph cache: ORT_ENABLE_EXTENDED, no NCHWc", "fp32"),
    "ours-openvino": (True, "sd-onnx fp32: OpenVINO CPU (what --device openvino runs)", "fp32"),
    "ours-openvino-bf16-hint": (True, "sd-onnx fp32 folder: OpenVINO CPU, bf16 hint (auto's pick on BF16 CPUs without "
                                      "an int8 variant, #22)", "bf16"),
    "ours-int8-ort": (True, "sd-onnx int8 variant: ONNX Runtime CPU (--device cpu; auto before #22)", "int8"),
    "ours-int8-openvino": (True, "sd-onnx int8 variant: OpenVINO CPU", "int8"),
    "ours-int8-openvino-bf16-hint": (True, "sd-onnx int8 variant: OpenVINO CPU, bf16 hint for its float ops", "int8"),
    "ours-bf16-openvino": (True, "sd-onnx bf16 variant: OpenVINO CPU, bf16 hint", "bf16"),
    "ours-auto": (True, "sd-onnx --device auto --precision auto: the variant and path generate picks here", "int8"),
}


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 4, 64, 64), dtype=np.float32), np.array([500.0, 500.0], dtype=np.float32),
            rng.standard_normal((2, 77, 768), dtype=np.float32))


def step_flops(folder: Path) -> dict[str, float]:
    """FLOPs of one step (inputs() above) of the UNet whose diffusers config the export wrote, counted by PyTorch's
    FlopCounterMode on the meta device (no weights, no compute): all of them, and without the attention products
    (QK^T and PV, the bmm), which is how shared/MEASUREMENTS.md and issue #6 counted their 1.354 TFLOP."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        sample, t, ctx = (torch.from_numpy(a).to("meta") for a in inputs())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(sample, t, ctx)
    counts = counter.get_flop_counts()["Global"]
    total = counter.get_total_flops()
    return {"all": total, "no_attention": total - counts.get(torch.ops.aten.bmm, 0)}


def folders(args) -> dict[str, Path | None]:
    model = args.model
    return {"fp32": model, "plain": args.plain_model, "int8": model.with_name(model.name + "-int8"),
            "bf16": model.with_name(model.name + "-bf16")}


def needs(name: str) -> str:
    if name.startswith(("ort-plain", "openvino-")):
        return "plain"
    for precision in ("int8", "bf16"):
        if name.startswith(f"ours-{precision}"):
            return precision
    return "fp32"


def make_runner(name: str, checkpoint: Path, folder: Path):
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
    feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": ctx}
    path = folder / "unet" / "model.onnx"
    if name == "ort-plain":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda: session.run(None, feeds)
    if name.startswith("openvino-"):
        import openvino as ov

        hint = "bf16" if "bf16" in name else "f32"
        core = ov.Core()
        model = core.read_model(str(path))
        if name.endswith("static"):
            # a port's any_name may be a tensor it feeds (the timestep's Cast output): match on all its names
            model.reshape({port: list(feeds[(port.get_names() & feeds.keys()).pop()].shape) for port in model.inputs})
        request = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint}).create_infer_request()
        return lambda: request.infer(feeds)
    from sd_onnx.runtime.providers import resolve_device
    from sd_onnx.runtime.sessions import OrtSession, open_session

    if name == "ours-ort-extended":
        session = OrtSession(path, resolve_device("cpu"), full_optimization=False)
        return lambda: session.run(feeds)
    if name in ("ours-openvino-bf16-hint", "ours-int8-openvino-bf16-hint"):
        from dataclasses import replace

        session = open_session(folder, "unet", replace(resolve_device("openvino"), inference_precision="bf16"))
        return lambda: session.run(feeds)
    if name == "ours-auto":  # as `generate` does it: the variant, then the device for its precision
        variant, device, _ = auto_choice(folder)
        session = open_session(variant, "unet", device)
        return lambda: session.run(feeds)
    session = open_session(folder, "unet", resolve_device("openvino" if "openvino" in name else "cpu"))
    return lambda: session.run(feeds)


def child(name: str, checkpoint: Path, folder: Path, warmup: int, repeats: int) -> dict:
    return {"name": name, **measure(lambda: make_runner(name, checkpoint, folder), warmup, repeats)}


def matmul_peaks(repeats: int = 5) -> dict[str, float]:
    """This CPU's attainable rate on large matmuls, 2 threads: fp32 (MLAS SGEMM) the best of three shapes (one
    shape alone reads up to 10% low: 8192x1280x1280 gave 128-142 GFLOP/s beside 2048^3's 153-159), u8s8 (MLAS
    QGEMM) on 8192x1280x1280."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)

    def best(op, x_type, x, w, extra=()):
        m, k, n = x.shape[0], x.shape[1], w.shape[1]
        graph = helper.make_graph([helper.make_node(op, ["x", "w", *[e.name for e in extra]], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", x_type, [m, k])],
                                  [helper.make_tensor_value_info("y", T.INT32 if op == "MatMulInteger" else T.FLOAT,
                                                                 [m, n])],
                                  [numpy_helper.from_array(w, "w"), *extra])
        session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                       .SerializeToString(), providers=["CPUExecutionProvider"])
        session.run(None, {"x": x})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - t0)
        return 2 * m * k * n / min(times) / 1e9

    fp32 = max(best("MatMul", T.FLOAT, rng.standard_normal((m, k), dtype=np.float32),
                    rng.standard_normal((k, n), dtype=np.float32))
               for m, k, n in ((8192, 1280, 1280), (2048, 2048, 2048), (4096, 4096, 4096)))
    int8 = best("MatMulInteger", T.UINT8, rng.integers(0, 255, (8192, 1280), dtype=np.uint8),
                rng.integers(-64, 64, (1280, 1280), dtype=np.int8),
                [numpy_helper.from_array(np.array(128, np.uint8), "z")])
    return {"fp32": fp32, "int8": int8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="full-size LDM checkpoint (make_checkpoint.py)")
    parser.add_argument("--model", type=Path, required=True, help="its exported model folder (sd-onnx export)")
    parser.add_argument("--plain-model", type=Path, help="the same checkpoint exported with --no-optimize (peers)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all configurations")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per configuration and round")
    parser.add_argument("--home", type=Path, help=HOME_HELP)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "matmul-peak":
        print(json.dumps(matmul_peaks()))
        return
    if args.child == "step-flops":
        print(json.dumps(step_flops(args.model)))
        return
    if args.child:
        print(json.dumps(child(args.child, args.checkpoint, args.folder, args.warmup, args.repeats)))
        return
    paths = folders(args)
    names = []
    for name in args.configs.split(","):
        path = paths[needs(name)]
        if path is None or not (path / "unet" / "model.onnx").is_file():
            print(f"  {name}: skipped (no {needs(name)} model folder; see --help)", file=sys.stderr)
            continue
        names.append(name)
    from sd_onnx.quantize.fidelity import component_sizes

    flops = own_process("step-flops", args.model)
    bench_home(args.home)
    peaks = {"before": own_process("matmul-peak", args.model)}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for round_no in range(args.rounds):
        for name in names:
            cmd = [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--model", str(args.model),
                   "--folder", str(paths[needs(name)]), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                   "--child", name]
            result = run_child(cmd, name)
            if result is None:
                continue
            runs[name].append(result)
            # this machine's speed drifts by up to 30% within a run: probe the peak right after each configuration,
            # in a process of its own, so nothing the configuration left behind shares the CPU with it
            runs[name][-1]["peak"] = own_process("matmul-peak", args.model)
            print(f"  round {round_no + 1} {name}: {runs[name][-1]['times']}", file=sys.stderr)
    peaks["after"] = own_process("matmul-peak", args.model)
    print(f"matmul peak, measured before/after: fp32 {peaks['before']['fp32']:.0f}/{peaks['after']['fp32']:.0f} "
          f"GFLOP/s, u8s8 {peaks['before']['int8']:.0f}/{peaks['after']['int8']:.0f} GOP/s; \"of matmul peak\" uses "
          "the best probe taken right after that configuration's own steps")
    print(f"one step: {flops['all'] / 1e12:.3f} TFLOP counted by PyTorch's FlopCounterMode, "
          f"{flops['no_attention'] / 1e12:.3f} without the attention products (issue #6's count); GFLOP/s and "
          "\"of matmul peak\" use the full count, the next column the issue's")
    sizes = {p: round(component_sizes(f, ["unet"])["unet"], 1) for p, f in paths.items()
             if f is not None and (f / "unet").is_dir()}
    if "ours-auto" in names:
        print(f"ours-auto: {auto_choice(args.model)[2]}")
    print("UNet size MB: " + ", ".join(f"{p} {s}" for p, s in sizes.items()))
    medians = {n: statistics.median(t for r in rs for t in r["times"]) for n, rs in runs.items() if rs}
    peers = [m for n, m in medians.items() if not CONFIGS[n][0]]
    best_peer = min(peers) if peers else float("nan")
    print("| configuration | median s | min s | vs fastest peer | GFLOP/s | matmul peak beside it | of matmul peak "
          "| of peak, without attention | load s, round 1 | load s, later rounds | first step s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, med in medians.items():
        rs = runs[name]
        gflops = flops["all"] / 1e9 / med
        kind = "int8" if CONFIGS[name][2] == "int8" else "fp32"  # no BF16 hardware here: bf16 is held to fp32's
        beside = max(r["peak"][kind] for r in rs)
        print(f"| {CONFIGS[name][1]} | {med:.2f} | {min(t for r in rs for t in r['times']):.2f} | "
              f"{med / best_peer:.2f}x | {gflops:.0f} | {beside:.0f} | {gflops / beside:.0%} "
              f"| {flops['no_attention'] / 1e9 / med / beside:.0%} "
              f"| {rs[0]['load_s']:.1f} | {later(r['load_s'] for r in rs[1:])} "
              f"| {statistics.median(r['first_s'] for r in rs):.1f} "
              f"| {max(r['peak_rss_gb'] for r in rs):.2f} |")


def own_process(what: str, model: Path) -> dict:
    """Run `--child what` (matmul-peak, step-flops) in a process of its own and read its JSON. This process stays
    small because a child's ru_maxrss starts at its parent's: torch and diffusers imported for the FLOP count
    (0.41 GB) would otherwise set the floor of every configuration's peak RSS."""
    proc = subprocess.run([sys.executable, __file__, "--checkpoint", "-", "--model", str(model), "--child", what],
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def later(values) -> str:
    values = list(values)
    return f"{statistics.median(values):.1f}" if values else "-"


if __name__ == "__main__":
    main()
