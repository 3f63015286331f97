"""Training side of the stack: model zoo, dataset readers, training loop, checkpoints.

Importing the package is cheap and torch-free; ``trainer.meta`` in particular is shared with the
server, which must never import torch.
"""
