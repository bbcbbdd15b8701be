"""Releasing a trained model: int8 quantization, Hugging Face / ONNX / GGUF exports, llama.cpp as a
decode engine, the model card and datasheet, and the MLflow registry with its promotion gate and pyfunc."""
