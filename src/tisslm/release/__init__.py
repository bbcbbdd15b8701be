"""Releasing a trained model: int8 quantization, Hugging Face / ONNX / GGUF exports, the model card
and datasheet, and the MLflow registry with its promotion gate and pyfunc."""
