"""Training side of the stack: model zoo, dataset readers, training loop, checkpoints.

Importing the package is cheap and torch-free. What a trained model hands on (``ModelMeta``)
is defined by ``cnnstack.contract``.
"""
