"""The core the tools share: ``cnnstack.contract`` (what one tool hands the next: model metadata,
the model repository, the export report) and the end-to-end driver ``cnnstack.pipeline`` with
``cnnstack.serverproc`` (cnn-serve as a child process). Importing the package does no work.
"""

__version__ = "0.1.0"
