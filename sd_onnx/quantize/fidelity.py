"""How far a variant's images move from fp32, and what it saves: measured on fixed prompts and seeds, in one run.

Random-weight test models make these figures a regression guard, not a statement about image quality."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from sd_onnx.home import folder_bytes
from sd_onnx.quantize.calibration import CFG_RECIPE, Recipe
from sd_onnx.quantize.metrics import cosine, psnr, ssim


def component_sizes(folder: Path, components) -> dict[str, float]:
    """MB on disk per component folder."""
    return {c: round(folder_bytes(folder / c) / 1e6, 2) for c in components}


def compare(base: Path, variant: Path, precision: str, prompts: list[str], steps: int, size: int,
            seed: int = 2000, device: str = "auto", threads: int | None = None,
            log=lambda msg: None, recipe: Recipe = CFG_RECIPE) -> dict:
    """Generate each prompt with both folders (alternating, same seed and noise, the model's own sampling recipe:
    LCM for an LCM UNet) and compare the results."""
    from sd_onnx.home import check_folder
    from sd_onnx.runtime.pipeline import GenerateRequest, generate

    rows, steps_s = [], {"fp32": [], precision: []}
    device_used = {}
    for i, prompt in enumerate(prompts):
        request = GenerateRequest(prompt, steps=steps, sampler=recipe.sampler, cfg_scale=recipe.cfg_scale,
                                  seed=seed + i, width=size, height=size)
        runs = {}
        for name, folder in (("fp32", base), (precision, variant)):
            result = generate(folder, request, device, threads)
            runs[name] = result.images[0]
            steps_s[name].append(result.timings["sampling_s"] / steps)
            device_used[name] = result.device.name
        a, b = np.asarray(runs["fp32"].image), np.asarray(runs[precision].image)
        rows.append({"prompt": prompt, "seed": seed + i, "psnr_db": round(psnr(a, b), 2), "ssim": round(ssim(a, b), 4),
                     "latent_cosine": round(cosine(runs["fp32"].latent, runs[precision].latent), 6)})
        log(f"  fidelity {i + 1}/{len(prompts)}: PSNR {rows[-1]['psnr_db']} dB, SSIM {rows[-1]['ssim']}, "
            f"latent cosine {rows[-1]['latent_cosine']}")
    components = list(check_folder(base).get("components", {}))
    base_size, variant_size = component_sizes(base, components), component_sizes(variant, components)
    step = {k: round(statistics.median(v), 4) for k, v in steps_s.items()}
    return {
        "note": "fixed prompts and seeds; with random-weight test models a regression guard, not a quality claim",
        "settings": {"steps": steps, "size": size, "sampler": recipe.sampler, "cfg_scale": recipe.cfg_scale,
                     "guidance": recipe.guidance, "prompts": len(prompts)},
        "images": rows,
        "psnr_db_mean": round(float(np.mean([r["psnr_db"] for r in rows])), 2),
        "psnr_db_min": min(r["psnr_db"] for r in rows),
        "ssim_mean": round(float(np.mean([r["ssim"] for r in rows])), 4),
        "ssim_min": min(r["ssim"] for r in rows),
        "latent_cosine_min": min(r["latent_cosine"] for r in rows),
        "unet_step_s": step,
        "unet_speedup": round(step["fp32"] / step[precision], 3) if step[precision] else None,
        "devices": device_used,
        "size_mb": {c: {"fp32": base_size[c], precision: variant_size[c]} for c in components},
        "total_mb": {"fp32": round(sum(base_size.values()), 1), precision: round(sum(variant_size.values()), 1)},
    }


def format_report(report: dict, precision: str) -> str:
    lines = [f"fidelity against fp32 ({report['settings']['prompts']} prompts, {report['settings']['steps']} steps, "
             f"{report['settings']['size']}px, {report['settings']['sampler']}, CFG {report['settings'].get('cfg_scale', 7.0):g}"
             f"{', guidance embedded' if 'embedded' in report['settings'].get('guidance', '') else ''}):",
             f"  PSNR mean {report['psnr_db_mean']} dB (min {report['psnr_db_min']}), SSIM mean {report['ssim_mean']} "
             f"(min {report['ssim_min']}), final-latent cosine min {report['latent_cosine_min']}",
             f"  UNet step {report['unet_step_s']['fp32']} s fp32 vs {report['unet_step_s'][precision]} s {precision} "
             f"({report['unet_speedup']}x) on {report['devices'].get(precision)}"]
    for component, sizes in report["size_mb"].items():
        if sizes["fp32"] != sizes[precision]:
            lines.append(f"  {component}: {sizes['fp32']} MB -> {sizes[precision]} MB "
                         f"({sizes[precision] / sizes['fp32']:.0%})")
    return "\n".join(lines)
