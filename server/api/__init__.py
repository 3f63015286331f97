"""The protocols: thin adapters from each wire format to the one data plane.

``dataplane`` (``Inference``: admission, the version-swap retry, status mapping, metrics and
statistics of every inference call) is shared by ``kserve`` (KServe v2 / Open Inference Protocol
over gRPC and REST), ``classifier`` (cnnstack.classifier.v1 over gRPC and REST) and ``health``
(grpc.health.v1 and reflection); ``rpc`` holds what both gRPC services share (deadlines, the
stream engine) and ``http`` the aiohttp application both REST APIs are routes of.
"""
