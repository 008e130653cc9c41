"""`sd-onnx` command line: parse, call the library, report; a user mistake is one line and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from sd_onnx import __version__
from sd_onnx.errors import SdOnnxError

EXIT_USER_ERROR = 2


def _say(msg: str) -> None:
    try:
        print(msg, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError):  # nobody reads stderr any more: the work still finishes
        pass


def _out(text: str) -> None:
    """A result line on stdout. When the reader has gone (`| head -1`), the rest goes to /dev/null: printing
    never stops the work, and the images are saved all the same."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _fill_mode(text: str) -> int:
    from sd_onnx.runtime.masks import FILL_MODES

    if text not in FILL_MODES:
        raise argparse.ArgumentTypeError(f"one of {', '.join(FILL_MODES)}, got {text!r}")
    return FILL_MODES[text]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from sd_onnx.export.exporter import export_model
    except ImportError as e:
        raise SdOnnxError(f"export needs the export extra ({e.name} is missing): pip install 'sd-onnx[export]'") from None
    result = export_model(Path(args.model), Path(args.output) if args.output else None, args.family,
                          Path(args.config) if args.config else None, args.opset, args.force, not args.no_optimize,
                          log=(lambda m: None) if args.quiet else _say, merge_lora=args.merge_lora)
    _out(f"exported {result.family} ({result.prediction_type}) to {result.folder} in {result.seconds:.1f} s")
    return 0


def cmd_export_vae_approx(args: argparse.Namespace) -> int:
    try:
        from sd_onnx.export.taesd import export_vae_approx
    except ImportError as e:
        raise SdOnnxError(f"export needs the export extra ({e.name} is missing): pip install 'sd-onnx[export]'") from None
    result = export_vae_approx([Path(f) for f in args.files], Path(args.output) if args.output else None, args.name,
                               args.force, log=(lambda m: None) if args.quiet else _say)
    _out(f"exported TAESD ({', '.join(c[4:] for c in result.components)}) to {result.folder} in {result.seconds:.1f} s")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sd_onnx.runtime.requests import GenerateRequest

    return _run_generation(args, GenerateRequest)


def cmd_img2img(args: argparse.Namespace) -> int:
    from sd_onnx.runtime.requests import Img2ImgRequest

    return _run_generation(args, Img2ImgRequest)


# request field -> CLI option (dest); options left at None fall back to the PNG's values, then the defaults
_REQUEST_OPTIONS = ("negative_prompt", "steps", "cfg_scale", "sampler", "seed", "width", "height", "batch_size",
                    "batch_count", "randn_source", "denoising_strength", "enable_hr", "hr_scale", "hr_resize_x",
                    "hr_resize_y", "hr_upscaler", "hr_second_pass_steps", "init_image", "resize_mode", "mask",
                    "mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
                    "inpainting_mask_invert", "inpainting_mask_weight")


def _run_generation(args: argparse.Namespace, request_type) -> int:
    from sd_onnx.home import find_model
    from sd_onnx.runtime.images import prepare_outdir, save_png
    from sd_onnx.runtime.model import LoadedModel
    from sd_onnx.runtime.pipeline import run
    from sd_onnx.runtime.progress import Progress
    from sd_onnx.runtime.providers import cpu_info
    from sd_onnx.runtime.variants import choose_variant

    fields, model_name = _from_png(args) if args.from_png else ({}, None)
    if args.prompt is not None:
        fields["prompt"] = args.prompt
    if "prompt" not in fields:
        raise SdOnnxError("a prompt is needed (or --from-png FILE)")
    fields.update({k: getattr(args, k) for k in _REQUEST_OPTIONS if getattr(args, k, None) is not None})
    known = set(request_type.__dataclass_fields__)
    request = request_type(**{k: v for k, v in fields.items() if k in known})
    request.validate()
    precision = args.precision
    if precision == "auto" and "<lora:" in request.prompt:  # LoRAs patch fp32 weights only (runtime/networks.py)
        precision = "fp32"
    folder, why = choose_variant(find_model(args.model or model_name), precision, args.device,
                                 cpu_info()["flags"])
    model = LoadedModel(folder, args.device, args.threads, args.low_memory, vae=args.vae,
                        arithmetic="auto" if precision == "auto" else "fp32")
    if model.device.inference_precision == "bf16" and why == "fp32":  # auto chose bf16 arithmetic on fp32 weights
        why = model.device.reason
    if not args.quiet or args.precision != "auto":
        _say(f"model: {folder.name}, precision {why}")
    outdir = prepare_outdir(Path(args.output))
    start = time.perf_counter()
    progress = None if args.quiet else (lambda label: Progress(label))
    model.lora_dir, model.embeddings_dir = args.lora_dir, args.embeddings_dir
    timings: dict[str, float] = {}
    n, first_seed = 0, None
    control = None
    if args.preview:
        control, progress = _previews(model, Path(args.preview), progress)
    for image in run(model, request, progress, timings, control):  # each image is on disk before the next batch starts
        path = save_png(image.image, outdir, 0, image.seed, image.parameters)
        first_seed = image.seed if first_seed is None else first_seed
        n += 1
        _out(str(path))
    elapsed = time.perf_counter() - start
    if request.seed == -1:
        _say(f"seed: {first_seed}")
    parts = [f"{label} {timings[key]:.1f} s" for key, label in (
        ("text_encoder_s", "text encoder"), ("vae_encode_s", "VAE encode"), ("unet_load_s", "UNet load"),
        ("sampling_s", "sampling"), ("upscale_s", "upscale"), ("vae_decode_s", "VAE decode")) if key in timings]
    _say(f"{n} image(s) in {elapsed:.1f} s ({elapsed / n:.1f} s/image) on {model.device.name}: {', '.join(parts)}")
    return 0


def _previews(model, path: Path, progress):
    """A RunControl and a progress factory that write the latest clean-latent prediction to `path` after each step
    (TAESD when installed, else A1111's cheap approximation), replaced atomically so a viewer never reads half a PNG."""
    from sd_onnx.runtime.control import RunControl
    from sd_onnx.runtime.decode import preview

    control = RunControl()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def factory(label: str):
        inner = progress(label) if progress else None

        def step(i: int, total: int) -> None:
            latent = control.preview()
            if latent is not None:
                preview(model, latent[0]).save(tmp, format="PNG")
                os.replace(tmp, path)
            if inner is not None:
                inner(i, total)
        return step

    return control, factory


def _from_png(args: argparse.Namespace) -> tuple[dict, str | None]:
    """Request fields from a PNG's A1111 parameters (PNG Info -> Send to txt2img/img2img), and its model's name if
    that model is installed."""
    from sd_onnx.home import models_dir
    from sd_onnx.runtime.images import read_parameters
    from sd_onnx.runtime.infotext import parse_infotext, request_fields

    prompt, negative, settings = parse_infotext(read_parameters(Path(args.from_png)))
    fields = request_fields(settings)
    fields.update(prompt=prompt, negative_prompt=negative, batch_size=1)  # the image's own seed makes it alone
    name = fields.get("model")
    return fields, (name if name and (models_dir() / name).is_dir() else None)


def cmd_quantize(args: argparse.Namespace) -> int:
    # numpy only: quantize_model itself checks for the quantize extra before any work
    from sd_onnx.quantize.fidelity import format_report
    from sd_onnx.quantize.variant import QuantizeOptions, quantize_model

    components = tuple(c.strip() for c in args.components.split(",") if c.strip()) if args.components else None
    options = QuantizeOptions(args.precision, components, Path(args.calibration_prompts) if args.calibration_prompts
                              else None, calibration_steps=args.calibration_steps,
                              calibration_size=args.calibration_size, fidelity_steps=args.fidelity_steps,
                              force=args.force, any_cpu=args.any_cpu, threads=args.threads, sampler=args.sampler)
    result = quantize_model(args.model, options, Path(args.output) if args.output else None,
                            log=(lambda m: None) if args.quiet else _say)
    _out(format_report(result.fidelity, result.precision))
    _out(f"wrote the {result.precision} variant ({', '.join(result.components)}) to {result.folder} "
          f"in {result.seconds:.0f} s")
    return 0


def cmd_export_upscaler(args: argparse.Namespace) -> int:
    try:
        from sd_onnx.export.upscaler import export_upscaler
    except ImportError as e:
        raise SdOnnxError(f"export-upscaler needs the export extra ({e.name} is missing): pip install 'sd-onnx[export]'") from None
    result = export_upscaler(Path(args.model), args.name, Path(args.output) if args.output else None, args.force,
                             log=(lambda m: None) if args.quiet else _say)
    _out(f"exported {result.architecture} {result.scale}x to {result.folder} in {result.seconds:.1f} s "
         f"(ONNX vs torch: {result.check_error:.1e} relative)")
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    """A1111's Extras tab, "Scale by": each image upscaled and saved with its own parameters kept."""
    from sd_onnx.runtime.images import open_image, prepare_outdir, save_png
    from sd_onnx.runtime.upscale import open_upscaler, postprocess_upscale

    kw = dict(device=args.device, threads=args.threads, tile=args.tile, overlap=args.tile_overlap)
    first = open_upscaler(args.upscaler, **kw)
    second = open_upscaler(args.upscaler_2, **kw) if args.upscaler_2 and args.upscaler_2_visibility > 0 else None
    outdir = prepare_outdir(Path(args.output))
    for name in args.images:
        start = time.perf_counter()
        image = open_image(Path(name))
        result, info = postprocess_upscale(image, first, args.scale, second, args.upscaler_2_visibility)
        parameters, extra = _postprocess_text(Path(name), info)
        path = save_png(result, outdir, 0, Path(name).stem, parameters, extra)
        _out(str(path))
        if not args.quiet:
            _say(f"{image.width}x{image.height} -> {result.width}x{result.height} in {time.perf_counter() - start:.1f} s")
    return 0


def _postprocess_text(source: Path, info: dict) -> tuple[str | None, dict[str, str]]:
    """As A1111's Extras saves: the source's `parameters` unchanged, the Postprocess fields in `postprocessing`
    (what PNG Info shows) and `extras` text chunks."""
    from sd_onnx.runtime.images import read_parameters
    from sd_onnx.runtime.infotext import format_infotext

    try:
        parameters = read_parameters(source)
    except SdOnnxError:
        parameters = None
    fields = format_infotext("", "", info).lstrip("\n")
    return parameters, {"postprocessing": fields, "extras": fields}


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from sd_onnx.info import format_report, machine_report

    report = machine_report()
    _out(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from sd_onnx.selftest import run_selftest

    return 0 if run_selftest(log=print) else 1


def cmd_batch(args: argparse.Namespace) -> int:
    import json

    from sd_onnx.batch import run_batch
    from sd_onnx.batch_jobs import parse_seeds

    workers = args.workers
    if workers != "auto":
        workers = int(workers) if workers.isdigit() else 0
        if workers < 1:
            raise SdOnnxError(f"--workers expects a whole number of at least 1, or auto, got {args.workers!r}")
    params = None
    if args.params:
        try:
            params = json.loads(args.params)
        except json.JSONDecodeError as e:
            raise SdOnnxError(f"--params is not JSON ({e.msg})") from None
        if not isinstance(params, dict):
            raise SdOnnxError("--params expects a JSON object of A1111 payload fields")
    summary = run_batch(Path(args.job), Path(args.output), args.model, args.device, workers,
                        False if args.ray is None else (args.ray or None),
                        parse_seeds(args.seeds) if args.seeds else None, params, say=_say,
                        on_image=lambda record: _out(str(Path(args.output) / record["file"])))
    _say(f"{summary.generated} image(s) made, {summary.skipped} already done, {summary.adopted} adopted, "
         f"{summary.removed} removed, {summary.retried} batch(es) retried; {summary.images} in the job; "
         f"{summary.seconds:.1f} s; manifest: {Path(args.output) / 'manifest.jsonl'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sd_onnx.server import serve

    serve(args.model, args.host, args.port, args.api_auth, args.insecure, args.device, args.precision, args.threads,
          args.low_memory, args.max_steps, args.max_body_mb, say=_say)
    return 0


def _generation_options(p: argparse.ArgumentParser, samplers: str) -> None:
    """The options generate and img2img share. Request options default to None: a value not given comes from
    --from-png, else from the request's own default."""
    p.add_argument("prompt", nargs="?", help="the prompt (A1111 syntax); may come from --from-png")
    p.add_argument("-n", "--negative-prompt")
    p.add_argument("--from-png", metavar="FILE", help="take the settings from an A1111/sd-onnx PNG's parameters "
                                                      "(PNG Info); options given as well override them")
    p.add_argument("--model", help="model folder or name under $SD_ONNX_HOME/models (default: the only one)")
    p.add_argument("--steps", type=int, help="sampling steps (default 20)")
    p.add_argument("--cfg", dest="cfg_scale", type=float, help="CFG scale (default 7)")
    p.add_argument("--sampler", metavar="NAME", help=f"one of: {samplers} (default Euler a)")
    p.add_argument("--seed", type=int, help="-1 draws a random seed (default)")
    p.add_argument("--width", type=int, help="multiple of 8 (default 512; img2img: the init image's)")
    p.add_argument("--height", type=int, help="multiple of 8 (default 512; img2img: the init image's)")
    p.add_argument("--batch-size", type=int, help="images per batch (default 1, at most 8)")
    p.add_argument("--batch-count", type=int, help="batches (default 1, at most 100)")
    p.add_argument("--randn-source", choices=["cpu", "gpu"],
                   help="noise: torch CPU generator (default; diffusers, A1111 --randn-source cpu) or A1111's "
                        "GPU-compatible Philox")
    p.add_argument("-o", "--output", default="outputs", help="output folder (default: ./outputs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, rocm, migraphx, dml, openvino, openvino:GPU")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8", "bf16", "fp16"],
                   help="which variant to run (made by `sd-onnx quantize`); auto: the best one found for this "
                        "hardware, else fp32 weights (computed in bf16 by OpenVINO with --device auto on CPUs with "
                        "AVX512-BF16/AMX; fp32 keeps fp32 arithmetic)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: the usable cores)")
    p.add_argument("--low-memory", action="store_true",
                   help="least RAM: no ONNX Runtime memory arenas, VAE in 512px tiles (for large images); on a "
                        "GPU also cuDNN's heuristic convolution search (SD_ONNX_GPU_MEM_LIMIT=2G caps VRAM)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--lora-dir", type=Path, default=None,
                   help="LoRA files named in the prompt as <lora:NAME:WEIGHT> (default: $SD_ONNX_HOME/loras)")
    p.add_argument("--embeddings-dir", type=Path, default=None,
                   help="textual-inversion embeddings, used by typing their name (default: $SD_ONNX_HOME/embeddings)")
    p.add_argument("--vae", metavar="NAME", help="full (default: the model's own VAE) or an approximate VAE exported "
                                                 "with `sd-onnx export-vae-approx` (taesd): ~50x cheaper decode")
    p.add_argument("--preview", metavar="FILE", help="write a live preview PNG here after every step (TAESD when "
                                                     "installed, else the cheap approximation)")


def build_parser() -> argparse.ArgumentParser:
    from sd_onnx.components import NAMES as COMPONENT_NAMES
    from sd_onnx.families import FAMILIES
    from sd_onnx.runtime.samplers import SAMPLER_NAMES
    from sd_onnx.runtime.upscale import upscaler_names

    samplers, upscalers = ", ".join(SAMPLER_NAMES), ", ".join(upscaler_names())

    parser = argparse.ArgumentParser(prog="sd-onnx", description="Stable Diffusion on ONNX Runtime / OpenVINO, no torch needed to generate.")
    parser.add_argument("--version", action="version", version=f"sd-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="convert a .ckpt/.safetensors/diffusers folder into an ONNX model folder")
    p.add_argument("model", help="checkpoint file (.ckpt, .safetensors) or diffusers folder")
    p.add_argument("-o", "--output", help="output folder (default: $SD_ONNX_HOME/models/<name>)")
    p.add_argument("--config", help="original LDM inference YAML (default: <name>.yaml beside the file, else bundled)")
    p.add_argument("--family", default="auto", choices=["auto", *FAMILIES])
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-optimize", action="store_true",
                   help="keep the plain UNet graph (default: fuse attention/LayerNorm with ONNX Runtime's optimizer)")
    p.add_argument("--merge-lora", action="append", metavar="FILE:WEIGHT",
                   help="fold a LoRA (.safetensors, kohya or diffusers keys; e.g. LCM-LoRA) into the UNet and text "
                        "encoder at WEIGHT (default 1) before export; repeatable; recorded in sd_onnx.json")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("export-vae-approx", help="export TAESD (taesd_decoder.pth, taesd_encoder.pth) to ONNX, "
                                                 "into $SD_ONNX_HOME/vae-approx/<name>")
    p.add_argument("files", nargs="+", metavar="FILE", help="taesd_decoder.pth and/or taesd_encoder.pth (.pth or "
                                                            ".safetensors; or one diffusers AutoencoderTiny file)")
    p.add_argument("-o", "--output", help="output folder (default: $SD_ONNX_HOME/vae-approx/<name>)")
    p.add_argument("--name", help="folder name (default: the first file's name without _decoder/_encoder)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_export_vae_approx)

    p = sub.add_parser("generate", help="txt2img (with hires fix) from an exported model folder")
    _generation_options(p, samplers)
    h = p.add_argument_group("hires fix (A1111's \"Hires. fix\": a second img2img pass at a larger size)")
    h.add_argument("--enable-hr", action="store_const", const=True, default=None)
    h.add_argument("--hr-scale", type=float, help="upscale by (default 2)")
    h.add_argument("--hr-resize-x", type=int, help="resize width to (instead of --hr-scale)")
    h.add_argument("--hr-resize-y", type=int, help="resize height to (instead of --hr-scale)")
    h.add_argument("--hr-upscaler", metavar="NAME", help=f"one of: {upscalers} (default Latent)")
    h.add_argument("--hr-second-pass-steps", type=int, help="steps of the second pass (default: --steps)")
    h.add_argument("--denoising-strength", type=float, help="of the second pass (default 0.7)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("img2img", help="img2img from an init image (A1111 semantics)")
    _generation_options(p, samplers)
    p.add_argument("--init-image", metavar="FILE", help="the picture to start from")
    p.add_argument("--denoising-strength", type=float, help="0 keeps the picture, 1 replaces it (default 0.75)")
    p.add_argument("--resize-mode", type=int, choices=[0, 1, 2, 3],
                   help="0 just resize (default), 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale)")
    m = p.add_argument_group("inpainting (A1111's Inpaint tab; white in the mask is repainted)")
    m.add_argument("--mask", metavar="FILE", help="the mask: grey levels, or an RGBA picture's transparency")
    m.add_argument("--mask-blur", type=int, help="Gaussian blur of the mask edge, px (default 4)")
    m.add_argument("--inpainting-fill", type=_fill_mode, metavar="MODE",
                   help="masked content: fill, original (default), latent-noise, latent-nothing")
    m.add_argument("--inpaint-full-res", action="store_const", const=True,
                   help='"Only masked": work on the mask\'s box (plus padding) at the requested size, paste it back')
    m.add_argument("--inpaint-full-res-padding", type=int, help="px around the mask's box (default 32)")
    m.add_argument("--inpainting-mask-invert", action="store_const", const=True, help="repaint the black part")
    m.add_argument("--inpainting-mask-weight", type=float,
                   help="inpainting models: how much of the picture the masked area's conditioning keeps out "
                        "(A1111's conditioning mask strength, default 1)")
    p.set_defaults(func=cmd_img2img, width=None, height=None)

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
    p.add_argument("--components", help=f"comma-separated: {','.join(COMPONENT_NAMES)} "
                                        "(default: unet for int8, all for bf16/fp16)")
    p.add_argument("--calibration-prompts", metavar="FILE", help="prompts, one per line (default: built-in)")
    p.add_argument("--calibration-steps", type=int, default=None, help="denoising steps recorded per prompt "
                                                                        "(default 8; an LCM model: 4 LCM steps)")
    p.add_argument("--calibration-size", type=int, default=None, help="image size for calibration and the "
                                                                       "fidelity check (default: half the model's)")
    p.add_argument("--fidelity-steps", type=int, default=None, help="steps of the fidelity check (default 10; "
                                                                     "an LCM model: 4 LCM steps)")
    p.add_argument("--sampler", metavar="NAME", help="sampler of calibration and fidelity runs (default: LCM for an "
                                                     "LCM UNet or a merged lcm* LoRA, else DPM++ 2M Karras)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--any-cpu", action="store_true", help="build a bf16 variant even on a CPU without BF16")
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export-upscaler", help="convert an ESRGAN-family upscaler (.pth/.safetensors: ESRGAN, "
                                              "Real-ESRGAN, compact, SwinIR) to ONNX under $SD_ONNX_HOME/upscalers")
    p.add_argument("model", help="upscaler weights (.pth, .ckpt, .safetensors); nothing in the file is run")
    p.add_argument("--name", help="the name to use it by (default: the file's stem)")
    p.add_argument("-o", "--output", help="output folder (default: $SD_ONNX_HOME/upscalers/NAME)")
    p.add_argument("--force", action="store_true", help="replace an existing upscaler of that name")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_export_upscaler)

    p = sub.add_parser("upscale", help="upscale images as A1111's Extras tab does (model or Lanczos/Nearest)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--upscaler", default="Lanczos", metavar="NAME",
                   help="Lanczos, Nearest or an installed upscaler (see `sd-onnx info`; default Lanczos)")
    p.add_argument("--scale", type=float, default=4.0,
                   help="upscale by (default 4, as A1111); a model runs up to 3 times, then Lanczos fits the size")
    p.add_argument("--upscaler-2", metavar="NAME", help="a second upscaler blended in")
    p.add_argument("--upscaler-2-visibility", type=float, default=0.0, help="0..1, the second upscaler's share")
    p.add_argument("--tile", type=int, default=None, help="tile size in input pixels, 0 for none (default 192)")
    p.add_argument("--tile-overlap", type=int, default=None, help="overlap of neighbouring tiles (default 8)")
    p.add_argument("-o", "--output", default="outputs/extras", help="output folder (default: ./outputs/extras)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, rocm, migraphx, dml, openvino, openvino:GPU")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: the usable cores)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("info", help="this machine's CPU, runtimes, providers and models, and what --device auto picks")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="an A1111-compatible HTTP API (/sdapi/v1) and a web page, one model kept loaded")
    p.add_argument("--model", help="model folder or name under $SD_ONNX_HOME/models (default: the only one, "
                                   "else the first); others installed can be chosen through /sdapi/v1/options")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-auth", metavar="USER:PASS[,USER2:PASS2]", help="HTTP Basic credentials (as A1111's "
                                                                         "--api-auth); needed for a non-loopback --host")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --api-auth")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, rocm, migraphx, dml, openvino, openvino:GPU")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8", "bf16", "fp16"])
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: the usable cores)")
    p.add_argument("--low-memory", action="store_true", help="no memory arenas, VAE in tiles (GPU: see generate)")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="most sampling steps a request may ask "
                                                                         "(default 150, A1111's slider maximum)")
    p.add_argument("--max-body-mb", type=_positive_int, default=None, help="largest request body (default 50 MiB)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("batch", help="run a JSONL file of A1111 txt2img payloads (or prompts x --seeds) into a "
                                     "folder, resumably: a re-run makes only what is missing")
    p.add_argument("job", help="JOBS.jsonl: one A1111 /sdapi/v1/txt2img payload per line (or, with --seeds, "
                               "one prompt per line)")
    p.add_argument("-o", "--output", required=True, help="output folder: KEY.png images and manifest.jsonl")
    p.add_argument("--model", help="model folder or name under $SD_ONNX_HOME/models (default: the only one)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, rocm, migraphx, dml, openvino, openvino:GPU")
    p.add_argument("--workers", default="auto", help="worker processes (or Ray actors), each with its own model and "
                                                     "a share of the cores (default auto: one per 4 cores)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray actors: the cluster at ADDRESS, else a local one (pip install 'sd-onnx[ray]')")
    p.add_argument("--seeds", metavar="A-B", help="JOB is a prompt file: each prompt once per seed A..B")
    p.add_argument("--params", metavar="JSON", help='payload fields for every line, e.g. \'{"steps": 20}\'')
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("selftest", help="build a tiny random checkpoint, export it, generate on each provider, report")
    p.set_defaults(func=cmd_selftest)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: staging folders removed, finished images kept, one line."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sd_onnx.runtime.progress import end_line

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return args.func(args)
    except SdOnnxError as e:
        end_line()
        _say(f"sd-onnx: error: {e}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        end_line()
        _say("sd-onnx: terminated" if isinstance(e, _Terminated) else "sd-onnx: interrupted")
        return 143 if isinstance(e, _Terminated) else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
