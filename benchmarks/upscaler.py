"""512 -> 2048 with a full-size RRDBNet (ESRGAN / R-ESRGAN 4x+: 23 blocks, 64 features, random weights): ours on
ONNX Runtime CPU and OpenVINO CPU (tiled, 192 px tiles, 8 px overlap, A1111's defaults) against the torch model
through spandrel (tiled by A1111's upscale_with_model arithmetic is not reproduced: torch runs the whole image, its
fastest way, and we report its peak memory too). Each configuration runs in its own process, rounds interleaved.

    python benchmarks/upscaler.py [--size 512] [--rounds 2] [--configs torch,ours-ort,ours-openvino]
    python benchmarks/upscaler.py --also-int8      # adds an int8 (dynamic, ORT) copy and its PSNR against fp32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import bench_home, measure, run_child  # noqa: E402

CONFIGS = {
    "torch": "torch 2.13 via spandrel, whole image, fp32",
    "ours-ort": "sd-onnx, ONNX Runtime CPU, 192 px tiles",
    "ours-openvino": "sd-onnx, OpenVINO CPU f32, 192 px tiles",
    "ours-int8": "sd-onnx int8 copy (ORT dynamic quantization), ONNX Runtime CPU, 192 px tiles",
}


def write_model(path: Path) -> Path:
    import torch

    from sd_onnx.export.upscaler import import_spandrel

    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4)
    # Real-ESRGAN's residual scaling keeps activations bounded; small random weights do the same here
    state = {k: torch.randn_like(v) * (0.02 if v.ndim > 1 else 0.0) for k, v in model.state_dict().items()}
    torch.save({"params_ema": state}, path)
    return path


def prepare(work: Path, int8: bool) -> None:
    from sd_onnx.export.upscaler import export_upscaler

    export_upscaler(write_model(work / "rrdb.pth"), "rrdb")
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        folder = work / "home" / "upscalers" / "rrdb"
        target = folder.with_name("rrdb-int8")
        target.mkdir()
        (target / "upscaler.json").write_text((folder / "upscaler.json").read_text())
        quantize_dynamic(str(folder / "model.onnx"), str(target / "model.onnx"), weight_type=QuantType.QInt8)
    print(json.dumps({}))


def picture(size: int):
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size] / 23.0
    base = 0.5 + 0.3 * np.sin(xx) * np.cos(yy * 1.7)
    return np.clip(base[None] + np.random.default_rng(0).random((3, size, size)) * 0.2, 0, 1).astype(np.float32)


def child(config: str, pth: Path, folder: Path, size: int, out: Path | None) -> dict:
    import numpy as np

    x = picture(size)
    if config == "torch":
        def build():
            import torch

            from sd_onnx.export.upscaler import describe, read_state_dict

            model = describe(pth, read_state_dict(pth)).model.eval()

            def run():
                with torch.inference_mode():
                    return model(torch.from_numpy(x)[None]).numpy()[0]
            return run
    else:
        def build():
            from sd_onnx.runtime.upscaler_models import UpscalerModel

            device = "openvino" if config == "ours-openvino" else "cpu"
            model = UpscalerModel(folder if config != "ours-int8" else folder.with_name(folder.name + "-int8"),
                                  device)
            return lambda: model.upscale_array(x)
    result = {}

    def keep():
        run = build()

        def timed():
            result["y"] = run()
        return timed
    stats = measure(keep, warmup=0, repeats=0)  # one run, as the CLI does it: the first, allocations included
    stats["times"] = [stats["first_s"]]
    if out is not None:
        np.save(out, result["y"])
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", default="torch,ours-ort,ours-openvino")
    parser.add_argument("--also-int8", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work = Path(args.work)
        out = work / f"{args.child}.npy"
        print(json.dumps(child(args.child, work / "rrdb.pth", work / "home" / "upscalers" / "rrdb", args.size, out)))
        return 0

    if args.prepare:
        prepare(Path(args.work), args.also_int8)
        return 0
    # This process imports neither torch nor onnxruntime: a child's peak RSS counts its parent's pages at fork.
    work = Path(tempfile.mkdtemp(prefix="sd-onnx-upscaler-bench-"))
    bench_home(work / "home")
    t0 = time.perf_counter()
    prep = [sys.executable, __file__, "--prepare", "--work", str(work)] + (["--also-int8"] if args.also_int8 else [])
    if run_child(prep, "prepare") is None:
        return 1
    print(f"model written and exported in {time.perf_counter() - t0:.1f} s", flush=True)
    configs = args.configs.split(",") + (["ours-int8"] if args.also_int8 else [])
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        line = []
        for c in configs:
            res = run_child([sys.executable, __file__, "--child", c, "--work", str(work), "--size", str(args.size)], c)
            if res:
                results[c].append(res)
                line.append(f"{c} {res['times'][0]:.1f} s {res['peak_rss_gb']:.2f} GB")
        print(f"round {r + 1}: " + "  ".join(line), flush=True)
    import numpy as np

    ref = np.load(work / "torch.npy") if (work / "torch.npy").exists() else None
    torch_s = statistics.median(x["times"][0] for x in results["torch"]) if results.get("torch") else None
    print(f"\n| configuration ({args.size} -> {args.size * 4}) | s (median) | vs torch | load s | peak RSS GB | "
          "PSNR vs torch dB |\n|---|---|---|---|---|---|")
    for c in configs:
        if not results[c]:
            continue
        s = statistics.median(x["times"][0] for x in results[c])
        psnr = ""
        if ref is not None and c != "torch":
            y = np.load(work / f"{c}.npy")
            mse = float(np.mean((np.clip(y, 0, 1) - np.clip(ref, 0, 1)) ** 2))
            psnr = f"{10 * np.log10(1 / mse):.1f}" if mse > 0 else "inf"
        ratio = f"{s / torch_s:.2f}x" if torch_s else ""
        print(f"| {CONFIGS[c]} | {s:.1f} | {ratio} | {statistics.median(x['load_s'] for x in results[c]):.1f} | "
              f"{max(x['peak_rss_gb'] for x in results[c]):.2f} | {psnr} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
