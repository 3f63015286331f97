"""The runtime: what turns a model repository into answers, independent of any wire protocol.

``manager`` (which versions serve, swapped while requests flow) -> ``loader`` (sessions, checks,
warm-up of one version) -> ``version`` (one served version: its queue, batchers, statistics) ->
``batcher`` (dynamic batching) -> ``sessions`` (onnxruntime sessions and their threads) on the
device ``cuda`` and ``devices`` chose; ``preprocess``/``postprocess`` turn request bytes into
batches and outputs into probabilities; ``cache`` is the response cache, looked up before a request
is queued; ``share`` is this process's part of the machine.

Imports no protocol (server.api) and nothing of the assembly (server.app, server.config).
Importing the package itself loads nothing (the supervisor imports ``share`` and ``devices``
without onnxruntime).
"""
