"""End to end, prompt to 512x512 image in 20 Euler steps with guidance: ours and our variants against the peers'
pipelines, interleaved, one run.

    python benchmarks/end_to_end.py --checkpoint /tmp/bench/sd15-random.safetensors --model /tmp/bench/sd15m \\
        --plain-model /tmp/bench/sd15
Each configuration makes one image in a fresh process, so every figure is a cold start as a user sees it: the
time from "load the pipeline" to the image, the time to the first finished denoising step within that, and the
process's peak RSS. Rounds interleave the configurations (round 1 runs each once, then round 2 ...).
Peers, as a user would run them without sd-onnx:
  torch-fp32      diffusers StableDiffusionPipeline (PyTorch eager fp32) on modules built from the checkpoint
  ort-plain       diffusers OnnxStableDiffusionPipeline on the plain export (ONNX Runtime CPU, default options)
  openvino-plain  the same diffusers ONNX pipeline with its three models compiled by OpenVINO (f32 hint): what
                  optimum-intel's OVStableDiffusionPipeline does; optimum-intel itself would pull a CUDA torch
                  and another transformers into this venv, so its runtime is called directly
Ours: `sd_onnx.runtime.pipeline.generate` on the fused export (ONNX Runtime CPU or OpenVINO) and on the int8
variant (<model>-int8). They run with a fresh $SD_ONNX_HOME (or --home) whose caches (ONNX Runtime's optimized
graphs, OpenVINO's compiled models) are filled once before round 1, as a user's first generate on a machine does;
that one-time cost is reported on its own ("first start s": opening the three models with empty caches).
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
from types import SimpleNamespace

import numpy as np
from timing import HOME_HELP, auto_choice, bench_home, run_child, torch_pipeline  # benchmarks/timing.py (scripts run from their folder)

PROMPT, NEGATIVE, STEPS, SEED, CFG = "a black house cat typing on a computer", "blurry", 20, 1, 7.0
CONFIGS = {
    # name: (is ours, description, which folder)
    "torch-fp32": (False, "PyTorch eager fp32, diffusers StableDiffusionPipeline", None),
    "ort-plain": (False, "ONNX Runtime CPU, diffusers OnnxStableDiffusionPipeline on the plain export", "plain"),
    "openvino-plain": (False, "OpenVINO CPU f32, diffusers ONNX pipeline on the plain export", "plain"),
    "ours-ort-cpu": (True, "sd-onnx fp32, ONNX Runtime CPU (--device cpu)", "fp32"),
    "ours-openvino": (True, "sd-onnx fp32, OpenVINO CPU (--device openvino)", "fp32"),
    "openvino-plain-bf16-static": (False, "OpenVINO CPU bf16 hint, UNet compiled for the request's static shapes "
                                          "(as optimum-intel's reshape and FastSD CPU run it), diffusers ONNX pipeline "
                                          "on the plain export", "plain"),
    "openvino-ir-bf16-static": (False, "the same peer reading OpenVINO IR (.xml/.bin, converted once before the "
                                       "rounds, as optimum-intel exports and FastSD CPU loads models)", "plain"),
    "ours-int8-ort": (True, "sd-onnx int8 variant, ONNX Runtime CPU (--device cpu)", "int8"),
    "ours-auto": (True, "sd-onnx --device auto --precision auto: the variant and path generate picks here", "fp32"),
}


class _OpenVINOModel:
    """Stands in for diffusers' OnnxRuntimeModel: called with keyword arrays, returns the outputs in order.
    `static`: compiled at the first call for its input shapes (optimum-intel's reshape before compile)."""

    def __init__(self, core, path: Path, hint: str = "f32", static: bool = False):
        self.core, self.config = core, {"INFERENCE_PRECISION_HINT": hint}
        self.pending = core.read_model(str(path)) if static else None
        if not static:
            self._compile(str(path))
        ports = self.pending.inputs if static else self.compiled.inputs
        inputs = [SimpleNamespace(name=i.get_any_name(), type="tensor(float)") for i in ports]
        self.model = SimpleNamespace(get_inputs=lambda: inputs)

    def _compile(self, model) -> None:
        self.compiled = self.core.compile_model(model, "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        self.outputs = self.compiled.outputs

    def __call__(self, **feeds):
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        if self.pending is not None:
            self.pending.reshape({port: list(feeds[(port.get_names() & feeds.keys()).pop()].shape)
                                  for port in self.pending.inputs})
            self._compile(self.pending)
            self.pending = None
        result = self.request.infer(feeds)
        return [result[o] for o in self.outputs]


def _numpy_euler():
    import diffusers

    class NumpyEuler(diffusers.EulerDiscreteScheduler):
        """diffusers' ONNX pipeline multiplies a NumPy latent by init_noise_sigma, which this scheduler keeps as a
        torch scalar; a float makes the same product."""

        @property
        def init_noise_sigma(self):
            return float(super().init_noise_sigma)

    return NumpyEuler


def ir_path(workdir: Path, name: str) -> Path:
    return workdir / "ir" / name / "model.xml"


def convert_to_ir(folder: Path, workdir: Path) -> None:
    """The plain export's three models as OpenVINO IR (fp32 weights, as optimum-intel's export keeps them)."""
    import openvino as ov

    for name in ("text_encoder", "unet", "vae_decoder"):
        target = ir_path(workdir, name)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            ov.save_model(ov.Core().read_model(str(folder / name / "model.onnx")), str(target), compress_to_fp16=False)


def _diffusers_onnx(folder: Path, openvino: bool, hint: str = "f32", static_unet: bool = False,
                    ir: Path | None = None):
    import diffusers

    if not openvino:
        pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(str(folder), provider="CPUExecutionProvider")
    else:  # the pipeline put together from OpenVINO models directly, as optimum-intel's opens no ONNX Runtime session
        import os

        import openvino as ov
        from transformers import CLIPTokenizer

        core = ov.Core()
        # optimum-intel keeps compiled models in a cache folder beside the model: the peer gets one too
        core.set_property({"CACHE_DIR": str(Path(os.environ["SD_ONNX_HOME"]) / "peer-openvino-cache")})
        models = {name: _OpenVINOModel(core, ir_path(ir, name) if ir is not None else folder / name / "model.onnx",
                                       hint, static=static_unet and name == "unet")
                  for name in ("text_encoder", "unet", "vae_decoder")}
        pipe = diffusers.OnnxStableDiffusionPipeline(
            vae_encoder=None, tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
            scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(str(folder / "scheduler")),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **models)
    pipe.scheduler = _numpy_euler().from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    return lambda on_step: pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                                height=512, width=512, generator=np.random.RandomState(SEED), output_type="np",
                                callback=lambda *a: on_step(), callback_steps=1).images[0]


def _diffusers_torch(checkpoint: Path, workdir: Path):
    import torch

    pipe = torch_pipeline("StableDiffusionPipeline", checkpoint, workdir)

    def run(on_step):
        def step_end(pipeline, i, t, kwargs):
            on_step()
            return kwargs

        with torch.inference_mode():
            return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, height=512,
                        width=512, generator=torch.Generator().manual_seed(SEED), output_type="np",
                        callback_on_step_end=step_end).images[0]

    return run


def _ours(folder: Path, device):
    from sd_onnx.runtime.pipeline import GenerateRequest, generate

    if device == "auto":
        folder, device, _ = auto_choice(folder)
    request = GenerateRequest(PROMPT, NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler", seed=SEED)
    return lambda on_step: generate(folder, request, device=device,
                                    progress=lambda label: lambda i, n: on_step()).images[0].image


def fill_caches(config: str, folder: Path) -> dict:
    """Open the three models as generate does, with the caches still empty: the one-time cost of a first start."""
    from sd_onnx.runtime.providers import resolve_device
    from sd_onnx.runtime.sessions import open_session

    device = resolve_device("openvino" if config == "ours-openvino" else "cpu")
    if config == "ours-auto":
        folder, device, _ = auto_choice(folder)
    t0 = time.perf_counter()
    for component in ("text_encoder", "unet", "vae_decoder"):
        session = open_session(folder, component, device)
        if component == "unet" and getattr(session, "_static", None) == {}:  # OpenVINO compiles it at the first step
            config = json.loads((folder / "unet" / "config.json").read_text())
            session.run({"sample": np.zeros((2, 4, 64, 64), np.float32), "timestep": np.zeros(2, np.float32),
                         "encoder_hidden_states": np.zeros((2, 77, config["cross_attention_dim"]), np.float32)})
    return {"first_start_s": time.perf_counter() - t0}


def child(config: str, checkpoint: Path, folder: Path | None, workdir: Path) -> dict:
    """Build the configuration's pipeline and make one image; times are from before the build."""
    warnings.simplefilter("ignore")
    steps: list[float] = []
    t0 = time.perf_counter()
    if config == "torch-fp32":
        run = _diffusers_torch(checkpoint, workdir)
    elif config in ("ort-plain", "openvino-plain"):
        run = _diffusers_onnx(folder, openvino=config == "openvino-plain")
    elif config in ("openvino-plain-bf16-static", "openvino-ir-bf16-static"):
        run = _diffusers_onnx(folder, openvino=True, hint="bf16", static_unet=True,
                              ir=workdir if config.startswith("openvino-ir") else None)
    else:
        run = _ours(folder, {"ours-openvino": "openvino", "ours-auto": "auto"}.get(config, "cpu"))
    built = time.perf_counter() - t0
    image = run(lambda: steps.append(time.perf_counter() - t0))
    total = time.perf_counter() - t0
    if len(steps) != STEPS:
        raise RuntimeError(f"{config}: saw {len(steps)} step callbacks, expected {STEPS}")
    image = np.asarray(image)
    return {"total_s": total, "build_s": built, "first_step_s": steps[0],
            "step_median_s": statistics.median(np.diff(steps)), "decode_s": total - steps[-1],
            "image_shape": list(image.shape),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="full-size LDM checkpoint (make_checkpoint.py)")
    parser.add_argument("--model", type=Path, required=True, help="its exported model folder (sd-onnx export)")
    parser.add_argument("--plain-model", type=Path, required=True, help="the same checkpoint exported --no-optimize")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sd-onnx-e2e"))
    parser.add_argument("--home", type=Path, help=HOME_HELP)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folders = {None: None, "plain": args.plain_model, "fp32": args.model,
               "int8": args.model.with_name(args.model.name + "-int8")}
    if args.child and args.child.startswith("fill:"):
        config = args.child.split(":", 1)[1]
        print(json.dumps(fill_caches(config, folders[CONFIGS[config][2]])))
        return
    if args.child:
        args.workdir.mkdir(parents=True, exist_ok=True)
        print(json.dumps(child(args.child, args.checkpoint, folders[CONFIGS[args.child][2]], args.workdir)))
        return
    names = [n for n in args.configs.split(",") if folders[CONFIGS[n][2]] is None or folders[CONFIGS[n][2]].is_dir()]
    bench_home(args.home)
    command = lambda child: [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--model",  # noqa: E731
                             str(args.model), "--plain-model", str(args.plain_model), "--workdir", str(args.workdir),
                             "--child", child]
    if "openvino-ir-bf16-static" in names:
        convert_to_ir(args.plain_model, args.workdir)
    first_start = {}
    for name in names:
        if CONFIGS[name][0]:
            result = run_child(command(f"fill:{name}"), name)
            first_start[name] = result["first_start_s"] if result else float("nan")
            print(f"  {name}: first start, filling the caches: {first_start[name]:.1f} s", file=sys.stderr, flush=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for round_no in range(args.rounds):
        for name in names:
            result = run_child(command(name), name)
            if result is None:
                continue
            runs[name].append(result)
            print(f"  round {round_no + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    if "ours-auto" in names:
        print(f"ours-auto: {auto_choice(args.model)[2]}")
    medians = {n: statistics.median(r["total_s"] for r in rs) for n, rs in runs.items() if rs}
    best_peer = min((m for n, m in medians.items() if not CONFIGS[n][0]), default=float("nan"))
    print(f"| configuration ({STEPS} steps, 512x512) | image s (median) | vs fastest peer | build s | first step "
          "done s | s/step | decode s | peak RSS GB | first start s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, med in medians.items():
        rs = runs[name]
        mid = lambda key, rs=rs: statistics.median(r[key] for r in rs)
        print(f"| {CONFIGS[name][1]} | {med:.1f} | {med / best_peer:.2f}x | {mid('build_s'):.1f} | "
              f"{mid('first_step_s'):.1f} | {mid('step_median_s'):.2f} | {mid('decode_s'):.1f} | "
              f"{max(r['peak_rss_gb'] for r in rs):.2f} | {first_start.get(name, float('nan')):.1f} |")


if __name__ == "__main__":
    main()
