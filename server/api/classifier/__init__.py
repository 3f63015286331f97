"""cnnstack.classifier.v1: ``grpc`` (Classify, ClassifyStream, ListModels) and ``rest``
(``POST /v1/models/{m}:classify``)."""
