"""Exporter: checkpoints -> ONNX (normalization folded in) behind a parity gate, published into a
versioned, Triton-compatible model repository. ``cnn-export --help``.

Importing the package is cheap and torch-free (``exporter.repository`` is what a server may read).
"""

__version__ = "0.1.0"
