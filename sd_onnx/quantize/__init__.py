"""`sd-onnx quantize`: int8, bf16 and fp16 variants of an exported model folder, with a fidelity report."""
