"""Dataset readers behind ``trainer.data`` (one module per on-disk format).

Import ``trainer.data`` for the public API; these modules only decode files into uint8 tensors.
"""
