"""`sd-onnx batch` throughput (issue #21): images per hour with local worker processes and on a local Ray instance,
measured in one run on one full-size model.

Each configuration is the command a user runs, in a process of its own, into a fresh output folder:
    sd-onnx batch prompts.txt --seeds 1-N -o OUT --model MODEL --workers W [--ray]
`--ray` without an address starts a local Ray instance on this machine (head, raylet, GCS) and stops it at the end,
so its wall time holds Ray's start and stop as well as the actors' model loads.

For every configuration the table gives:
- whole job: images per hour over the command's wall time (process start to exit: model loads, compiles, Ray);
- steady: images per hour while every worker is generating (what a long job approaches): per worker, the time
  between its first and last finished image (the manifest's `finished`, 1 s resolution) over the images after its
  first, whose time holds the model load; summed over workers. --images should give each worker 3 or more;
- Ray's overhead per image against local mode with the same worker count: (Ray wall - local wall) / images,
  and the difference of the steady per-image times.
The runs are interleaved over --rounds (round 1 runs every configuration, then round 2), and a fresh $SD_ONNX_HOME is
shared by all of them, so round 1 fills OpenVINO's compiled-model cache for later rounds (both are shown).
    python benchmarks/batch.py --model /tmp/bench/sd15m --images 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from timing import HOME_HELP, bench_home  # benchmarks/timing.py (scripts run from their folder)

CONFIGS = {
    "local-1": ("--workers 1: one worker process with both threads", ["--workers", "1"]),
    "local-2": ("--workers 2: two worker processes, one thread each", ["--workers", "2"]),
    "ray-1": ("--ray --workers 1: one Ray actor on a local Ray instance", ["--ray", "--workers", "1"]),
    "ray-2": ("--ray --workers 2: two Ray actors, one CPU each", ["--ray", "--workers", "2"]),
}
PROMPTS = ["a lighthouse on a cliff at dusk, oil painting", "a red fox in fresh snow, photograph",
           "an old library with tall windows, morning light", "a bowl of ramen, studio lighting"]


def run_config(name: str, model: Path, images: int, params: dict, device: str, workdir: Path) -> dict:
    out = workdir / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    prompts = workdir / "prompts.txt"
    # one prompt per image: N lines x one seed, so every image is its own unit of work
    prompts.write_text("\n".join(PROMPTS[i % len(PROMPTS)] + f", variation {i}" for i in range(images)) + "\n")
    cmd = [sys.executable, "-m", "sd_onnx", "batch", str(prompts), "--seeds", "7", "-o", str(out),
           "--model", str(model), "--device", device, "--params", json.dumps(params), *CONFIGS[name][1]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {}
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    if len(records) != images:
        print(f"{name}: manifest has {len(records)} lines, expected {images}", file=sys.stderr)
        return {}
    finished: dict[str, list[float]] = {}
    for record in records:
        when = datetime.strptime(record["finished"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
        finished.setdefault(record["worker"].split(":")[0], []).append(when)
    # a worker's steady rate: images after its first over the time since its first (the first holds the model load)
    gaps = [(max(t) - min(t)) / (len(t) - 1) for t in finished.values() if len(t) > 1 and max(t) > min(t)]
    shutil.rmtree(out, ignore_errors=True)
    if len(gaps) < len(finished):
        print(f"{name}: a worker made fewer than 2 images; raise --images for a steady rate", file=sys.stderr)
    return {"wall": wall, "workers": len(finished), "image_s": statistics.median(gaps) if gaps else float("nan"),
            "steady_per_hour": sum(3600 / g for g in gaps) if len(gaps) == len(finished) else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="full-size model folder (sd-onnx export)")
    parser.add_argument("--images", type=int, default=4, help="images per configuration and round")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--sampler", default="Euler")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--home", type=Path, help=HOME_HELP)
    args = parser.parse_args()
    bench_home(args.home)
    params = {"steps": args.steps, "width": args.size, "height": args.size, "sampler_name": args.sampler,
              "cfg_scale": 7}
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="sd-onnx-batch-bench-") as tmp:
        for round_no in range(args.rounds):
            for name in names:
                result = run_config(name, args.model, args.images, params, args.device, Path(tmp))
                if result:
                    runs[name].append(result)
                    print(f"  round {round_no + 1} {name}: wall {result['wall']:.1f} s, image "
                          f"{result['image_s']:.1f} s, {result['workers']} worker(s)", file=sys.stderr)
    print(f"{args.images} images per run, {args.size}x{args.size}, {args.steps} steps {args.sampler}, CFG 7, "
          f"--device {args.device}; {args.rounds} round(s)")
    print("| configuration | wall s, round 1 | wall s, later rounds | whole job images/hour | steady s per image "
          "in a worker | steady images/hour | Ray overhead per image, wall | Ray overhead per image, steady |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        if not rs:
            continue
        later = [r["wall"] for r in rs[1:]]
        wall = statistics.median(later) if later else rs[0]["wall"]
        image_s = statistics.median(r["image_s"] for r in rs)
        steady = statistics.median(r["steady_per_hour"] for r in rs)
        overhead_wall = overhead_steady = "-"
        local = runs.get(name.replace("ray", "local"))
        if name.startswith("ray") and local:
            local_later = [r["wall"] for r in local[1:]] or [local[0]["wall"]]
            overhead_wall = f"{(wall - statistics.median(local_later)) / args.images:+.1f} s"
            overhead_steady = f"{image_s - statistics.median(r['image_s'] for r in local):+.1f} s"
        later_s = f"{statistics.median(later):.0f}" if later else "-"
        print(f"| {CONFIGS[name][0]} | {rs[0]['wall']:.0f} | {later_s} "
              f"| {3600 * args.images / wall:.0f} | {image_s:.1f} | {steady:.0f} | {overhead_wall} "
              f"| {overhead_steady} |")


if __name__ == "__main__":
    main()
