"""Exports of a model to other runtimes: ONNX (``onnx_export``, torch.onnx) and GGUF (``gguf_writer``,
llama.cpp's format), each checked in its runtime against the PyTorch model (``verify``); ``job``
runs the ``export`` kind. Nothing imported here loads torch."""
