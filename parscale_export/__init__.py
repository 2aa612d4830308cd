"""parscale-export: ship ParScale checkpoints to ONNX runtimes."""

__version__ = "0.1.0"
