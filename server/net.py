"""Listening sockets, made one way for every port the server opens.

``bind`` makes the sockets of the HTTP API, the ``/metrics`` endpoint and the supervisor's port
reservation; gRPC binds its own (grpc-core takes an address, not a socket), from
``grpc_address``. ``reuse_port`` (SO_REUSEPORT) lets the workers of one supervisor share a port;
without it a second server on a taken port fails to start instead of sharing it by accident.
"""

from __future__ import annotations

import socket

BACKLOG = 1024


def bind(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: any free port), listening unless ``listen=False``."""
    host = host.strip("[]")
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        if listen:
            sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def bound_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as grpc-core parses it (an IPv6 address in brackets)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
