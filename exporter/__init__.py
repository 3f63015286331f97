"""Exporter: checkpoints -> ONNX (normalization folded in) behind a parity gate, published into a
versioned, Triton-compatible model repository. ``cnn-export --help``.

Importing the package is cheap and torch-free; the repository it publishes into and the report it
writes are defined by ``cnnstack.contract``.
"""
