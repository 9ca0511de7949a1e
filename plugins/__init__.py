"""Export plugins: ONNX translation of the ``dsa`` ops and TensorRT plugins."""
