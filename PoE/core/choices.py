"""Values that flags offer, importable without torch (``--help`` must not wait seconds for it to load)."""

PRECISIONS = ("auto", "fp32", "bf16")  # --precision: auto picks bf16 where it is fast, else fp32 (core.precision)
ENGINES = ("auto", "torch", "onnx")  # the server's --engine; auto: onnx for fp32 on a CPU with onnxruntime
