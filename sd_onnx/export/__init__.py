"""Checkpoint -> ONNX model folder (needs the `export` extra: torch, diffusers, transformers)."""
