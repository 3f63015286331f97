"""gRPC inference server: dynamic batching on onnxruntime over a Triton-layout model repository.

``cnn-serve --help``. Never imports torch (tests/server/test_process.py proves it).
"""
