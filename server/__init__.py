"""The model server: a Triton-layout repository served over gRPC and HTTP/REST (KServe v2 and
cnnstack.classifier.v1), dynamic batching on onnxruntime, Prometheus metrics.

``cnn-serve --help``. Packages by the steps of a request: ``api`` (the protocols over one data
plane), ``runtime`` (versions, batching, sessions, devices), ``scaleout`` (``--workers``); the
assembly (``app``, ``config``) and the small shared modules sit at the top. Never imports torch
(tests/server/test_layers.py and tests/server/test_process.py hold it).
"""
