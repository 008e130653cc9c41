"""Torch-free runtime: tokenizer, NumPy samplers, ONNX sessions, images."""
