"""KServe v2 / Open Inference Protocol: ``protocol`` (the semantics both wires share: input and
output checks, classification, metadata, statistics, the repository index), ``grpc``
(``inference.GRPCInferenceService``) and ``rest`` (the HTTP/REST wire format and routes)."""
