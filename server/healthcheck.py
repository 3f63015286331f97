"""``python -m server.healthcheck --port 8001 [--service NAME] [--tls-ca CA [--tls-cert C --tls-key K]]
[--auth-token-file F]``: exit 0 if grpc.health.v1 says SERVING (docker-compose healthcheck), 1
otherwise. With ``--tls-ca`` (or ``--tls``: the system's CAs) it connects over TLS, presenting
``--tls-cert`` for mutual TLS; with ``--auth-token-file`` it sends the file's first token (needed
only when the server runs with ``--auth-health``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.tls import grpc_channel_credentials
from server.tokens import TokenFileError, read_tokens


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    target = f"{args.host}:{args.port}"
    if not (args.tls or args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, grpc_channel_credentials(args.tls_ca, args.tls_cert, args.tls_key))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.healthcheck")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--service", default="", help='"" = the whole server; or a model name')
    p.add_argument("--timeout-s", type=float, default=3.0)
    p.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs")
    p.add_argument(
        "--tls-ca", type=Path, default=None, help="PEM CA bundle the server's certificate must chain to"
    )
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    p.add_argument(
        "--auth-token-file", type=Path, default=None, help="send its first token (server with --auth-health)"
    )
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    metadata = None
    if args.auth_token_file is not None:
        try:
            metadata = [("authorization", f"Bearer {read_tokens(args.auth_token_file)[0].decode()}")]
        except TokenFileError as e:
            p.error(str(e))
    with open_channel(args) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s, metadata=metadata
            )
        except grpc.RpcError as e:
            print(f"unhealthy: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
