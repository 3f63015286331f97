# A stand-in for prom/prometheus where no registry can be reached: Debian's prometheus binary (the
# host's /usr/bin/prometheus, copied into the build context by tests/deploy/test_compose.py) on the
# local Debian base, laid out as the official image is: /bin/prometheus, /prometheus owned by
# nobody, run as nobody. The compose file's command and mounts apply unchanged.
ARG BASE
FROM ${BASE}
COPY prometheus /bin/prometheus
RUN mkdir -p /prometheus /etc/prometheus && chown 65534:65534 /prometheus
USER 65534:65534
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
