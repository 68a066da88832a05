"""export: lower a (compressed) checkpoint to ONNX and ExecuTorch with KV cache."""
