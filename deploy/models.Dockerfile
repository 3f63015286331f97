# A model repository as an image, for deploy/kubernetes/models-from-image (its init container
# copies /models into the pod). The build context is the repository itself:
#   docker build -f deploy/models.Dockerfile -t cnnstack-models:0.1.0 artifacts/repository
FROM busybox:1.37.0
COPY --chown=65534:65534 . /models/
USER 65534
