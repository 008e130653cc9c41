"""`python -m sd_onnx` runs the CLI."""

import sys

from sd_onnx.cli import main

sys.exit(main())
