"""fusion-serve, online half: serves a bundle with onnxruntime behind BentoML. Never imports torch."""
