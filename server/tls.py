"""TLS for both listeners from one set of PEM files: ``--tls-cert``/``--tls-key``, and with
``--tls-client-ca`` mutual TLS (a client must present a certificate that CA signed).

The files are read once at start. The ``ssl.SSLContext`` is built first because it checks the
certificate against the key (a mismatch is a clear ``ssl.SSLError`` before anything binds); gRPC
gets the same bytes as ``grpc.ssl_server_credentials``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """The HTTP listener's context: TLS 1.2+, the client's certificate required for mutual TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    if files.client_ca is not None:
        ctx.load_verify_locations(cafile=files.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def grpc_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    ca = files.client_ca.read_bytes() if files.client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def grpc_channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """A client's credentials (the health check): trusts ``ca`` (else the system store), presents
    ``cert``/``key`` for mutual TLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca is not None else None,
        private_key=key.read_bytes() if key is not None else None,
        certificate_chain=cert.read_bytes() if cert is not None else None,
    )
