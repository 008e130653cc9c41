"""`sd-onnx` command line: parse, call the library, report; a user mistake is one line and a non-zero exit."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from sd_onnx import __version__
from sd_onnx.errors import SdOnnxError

EXIT_USER_ERROR = 2


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from sd_onnx.export.exporter import export_model
    except ImportError as e:
        raise SdOnnxError(f"export needs the export extra ({e.name} is missing): pip install 'sd-onnx[export]'") from None
    result = export_model(Path(args.model), Path(args.output) if args.output else None, args.family,
                          Path(args.config) if args.config else None, args.opset, args.force, not args.no_optimize,
                          log=(lambda m: None) if args.quiet else _say)
    print(f"exported {result.family} ({result.prediction_type}) to {result.folder} in {result.seconds:.1f} s")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sd_onnx.home import find_model
    from sd_onnx.runtime.images import next_index, prepare_outdir, save_png
    from sd_onnx.runtime.pipeline import GenerateRequest, generate
    from sd_onnx.runtime.progress import Progress
    from sd_onnx.runtime.providers import cpu_info
    from sd_onnx.runtime.variants import choose_variant

    request = GenerateRequest(args.prompt, args.negative_prompt, args.steps, args.cfg, args.sampler, args.seed,
                              args.width, args.height, args.batch_size, args.batch_count, args.randn_source)
    request.validate()
    folder, why = choose_variant(find_model(args.model), args.precision, args.device, cpu_info()["flags"])
    if not args.quiet or args.precision != "auto":
        _say(f"model: {folder.name}, precision {why}")
    outdir = prepare_outdir(Path(args.output))
    start = time.perf_counter()
    progress = None if args.quiet else (lambda label: Progress(label))
    result = generate(folder, request, args.device, args.threads, progress=progress, low_memory=args.low_memory)
    index = next_index(outdir)
    for i, img in enumerate(result.images):
        path = save_png(img.image, outdir, index + i, img.seed, img.parameters)
        print(path)
    elapsed = time.perf_counter() - start
    n = len(result.images)
    if request.seed == -1:
        _say(f"seed: {result.images[0].seed}")
    t = result.timings
    _say(f"{n} image(s) in {elapsed:.1f} s ({elapsed / n:.1f} s/image) on {result.device.name}: text encoder "
         f"{t['text_encoder_s']:.1f} s, UNet load {t['unet_load_s']:.1f} s, sampling {t['sampling_s']:.1f} s, "
         f"VAE decode {t['vae_decode_s']:.1f} s")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    # numpy only: quantize_model itself checks for the quantize extra before any work
    from sd_onnx.quantize.fidelity import format_report
    from sd_onnx.quantize.variant import QuantizeOptions, quantize_model

    components = tuple(c.strip() for c in args.components.split(",") if c.strip()) if args.components else None
    options = QuantizeOptions(args.precision, components, Path(args.calibration_prompts) if args.calibration_prompts
                              else None, calibration_steps=args.calibration_steps,
                              calibration_size=args.calibration_size, fidelity_steps=args.fidelity_steps,
                              force=args.force, any_cpu=args.any_cpu, threads=args.threads)
    result = quantize_model(args.model, options, Path(args.output) if args.output else None,
                            log=(lambda m: None) if args.quiet else _say)
    print(format_report(result.fidelity, result.precision))
    print(f"wrote the {result.precision} variant ({', '.join(result.components)}) to {result.folder} "
          f"in {result.seconds:.0f} s")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from sd_onnx.info import format_report, machine_report

    report = machine_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from sd_onnx.selftest import run_selftest

    return 0 if run_selftest(log=print) else 1


def build_parser() -> argparse.ArgumentParser:
    from sd_onnx.runtime.samplers import SAMPLER_NAMES

    parser = argparse.ArgumentParser(prog="sd-onnx", description="Stable Diffusion on ONNX Runtime / OpenVINO, no torch needed to generate.")
    parser.add_argument("--version", action="version", version=f"sd-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="convert a .ckpt/.safetensors/diffusers folder into an ONNX model folder")
    p.add_argument("model", help="checkpoint file (.ckpt, .safetensors) or diffusers folder")
    p.add_argument("-o", "--output", help="output folder (default: $SD_ONNX_HOME/models/<name>)")
    p.add_argument("--config", help="original LDM inference YAML (default: <name>.yaml beside the file, else bundled)")
    p.add_argument("--family", default="auto", choices=["auto", "sd1", "sd2", "sd2-v"])
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-optimize", action="store_true",
                   help="keep the plain UNet graph (default: fuse attention/LayerNorm with ONNX Runtime's optimizer)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="txt2img from an exported model folder")
    p.add_argument("prompt")
    p.add_argument("-n", "--negative-prompt", default="")
    p.add_argument("--model", help="model folder or name under $SD_ONNX_HOME/models (default: the only one)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0, help="CFG scale")
    p.add_argument("--sampler", default="Euler a", metavar="NAME", help=f"one of: {', '.join(SAMPLER_NAMES)}")
    p.add_argument("--seed", type=int, default=-1, help="-1 draws a random seed")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--batch-count", type=int, default=1)
    p.add_argument("--randn-source", choices=["cpu", "gpu"], default="cpu",
                   help="noise: torch CPU generator (diffusers, A1111 --randn-source cpu) or A1111's GPU-compatible Philox")
    p.add_argument("-o", "--output", default="outputs", help="output folder (default: ./outputs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, rocm, migraphx, dml, openvino, openvino:GPU")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8", "bf16", "fp16"],
                   help="which variant to run (made by `sd-onnx quantize`); auto: the best one found for this "
                        "hardware, else fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the usable cores)")
    p.add_argument("--low-memory", action="store_true",
                   help="least RAM: no ONNX Runtime memory arenas, VAE decoded in 512px tiles (for large images)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("quantize", help="make an int8, bf16 or fp16 variant of a model folder, with a fidelity report")
    p.add_argument("model", nargs="?", help="fp32 model folder or name (default: the only installed model)")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--int8", dest="precision", action="store_const", const="int8",
                      help="int8 UNet for CPUs (static QDQ, calibrated on real denoising steps)")
    kind.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                      help="bf16 weights, run by OpenVINO in bf16 (CPUs with AVX512-BF16 or AMX)")
    kind.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                      help="fp16 for GPU providers (overflowing ops kept fp32)")
    p.add_argument("-o", "--output", help="output folder (default: <model>-<precision> beside the model)")
    p.add_argument("--components", help="comma-separated: text_encoder,unet,vae_encoder,vae_decoder "
                                        "(default: unet for int8, all for bf16/fp16)")
    p.add_argument("--calibration-prompts", metavar="FILE", help="prompts, one per line (default: built-in)")
    p.add_argument("--calibration-steps", type=int, default=8, help="denoising steps recorded per prompt")
    p.add_argument("--calibration-size", type=int, default=None, help="image size for calibration and the "
                                                                       "fidelity check (default: half the model's)")
    p.add_argument("--fidelity-steps", type=int, default=10)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--any-cpu", action="store_true", help="build a bf16 variant even on a CPU without BF16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("info", help="this machine's CPU, runtimes, providers and models, and what --device auto picks")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("selftest", help="build a tiny random checkpoint, export it, generate on each provider, report")
    p.set_defaults(func=cmd_selftest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # SIGTERM (kill, systemd) unwinds like Ctrl-C
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return args.func(args)
    except SdOnnxError as e:
        print(f"sd-onnx: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sd-onnx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
