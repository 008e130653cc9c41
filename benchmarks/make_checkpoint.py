"""Write a full-size random-weight checkpoint in the original LDM layout (SD 1.5 or SD 2.x architecture).

Speed does not depend on weight values, so this stands in for a real checkpoint in performance work.
    python benchmarks/make_checkpoint.py /tmp/bench/sd15-random.safetensors --family sd1
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from sd_onnx.export.synthetic import write_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help=".safetensors or .ckpt to write")
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sd2-v"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cond-proj-dim", type=int, default=0,
                        help="an LCM-distilled UNet: its guidance projection width (LCM_Dreamshaper_v7: 256)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # with_yaml=False: the exporter must find the bundled full-size config by itself, as for a real download
        path = write_checkpoint(args.path, args.family, size="full", seed=args.seed, with_yaml=False,
                                cond_proj_dim=args.cond_proj_dim)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
