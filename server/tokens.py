"""Who may call: the bearer tokens, and which calls need which (one decision, ``Tokens.check``,
that both protocols ask: server/api/auth.py).

* ``--auth-token-file``: the tokens that may call the inference and metadata APIs. Without it
  those APIs are open.
* ``--admin-token-file``: the tokens that may also call the administrative APIs (model load and
  unload); an admin token is accepted everywhere. Without it the administrative APIs follow the
  rule of the others.
* Liveness and readiness (grpc.health.v1, KServe ServerLive/ServerReady/ModelReady,
  ``/v2/health/*``, ``/v2/models/M/ready``) stay open, so that probes need no secret, unless
  ``--auth-health``; ``/metrics`` is on its own port and never asks.

A token file holds one token per line (blank lines and ``#`` comments ignored), is read at start
(a missing or empty file stops the start) and again on SIGHUP (a file that became unreadable keeps
the tokens already loaded, with an error in the log). Clients send ``authorization: Bearer
<token>`` (gRPC metadata) or ``Authorization: Bearer <token>`` (HTTP). Every token is compared in
constant time, and the answer to a refused call never says why beyond 401/UNAUTHENTICATED (no
token, or an unknown one) and 403/PERMISSION_DENIED (a valid token on an administrative API);
the metric ``cnn_auth_failures_total`` counts the reasons.
"""

from __future__ import annotations

import hmac
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

UNAUTHENTICATED = "a valid bearer token is required (Authorization: Bearer <token>)"
FORBIDDEN = "this API needs an administrative token"
OPEN, USER, ADMIN = "open", "user", "admin"  # what a call needs

# gRPC methods by what they need (everything else: USER).
GRPC_HEALTH = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/inference.GRPCInferenceService/ModelReady",
    }
)
GRPC_ADMIN = frozenset(
    {
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
    }
)
HTTP_HEALTH = re.compile(r"/v2/health/(live|ready)|/v2/models/[^/]+(/versions/[^/]+)?/ready")
HTTP_ADMIN = re.compile(r"/v2/repository/models/[^/]+/(load|unload)")


class TokenFileError(OSError):
    """A token file cannot be read, or holds no token."""


def read_tokens(path: Path) -> list[bytes]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenFileError(f"token file {path}: cannot be read ({e})") from e
    tokens = [line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise TokenFileError(f"token file {path} holds no token (one per line)")
    return tokens


@dataclass
class Tokens:
    """The accepted tokens; ``check`` is the one decision both protocols ask for."""

    token_file: Path | None = None
    admin_file: Path | None = None
    protect_health: bool = False

    def __post_init__(self) -> None:
        self._users: list[bytes] = []
        self._admins: list[bytes] = []
        self.load()

    @property
    def enabled(self) -> bool:
        return self.token_file is not None or self.admin_file is not None

    def load(self) -> None:
        """Read the files; raises TokenFileError (start-up refuses to serve without them)."""
        self._users = read_tokens(self.token_file) if self.token_file is not None else []
        self._admins = read_tokens(self.admin_file) if self.admin_file is not None else []

    def reload(self) -> None:
        """SIGHUP: read the files again; keep the tokens in force if that fails."""
        try:
            self.load()
        except TokenFileError as e:
            log.error("keeping the tokens already loaded: %s", e)
            return
        log.info("token files reloaded")

    def check(self, authorization: str | None, need: str) -> str | None:
        """None when a call that needs ``need`` may go on with this Authorization value; else the
        reason: "missing", "invalid" or "forbidden"."""
        if need == OPEN or (need == USER and self.token_file is None) or not self.enabled:
            return None
        admin_only = need == ADMIN and self.admin_file is not None
        if not authorization:
            return "missing"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "invalid"
        presented = token.strip().encode()
        is_admin = _known(presented, self._admins)
        if is_admin:
            return None
        is_user = _known(presented, self._users)
        if admin_only:
            return "forbidden" if is_user else "invalid"
        return None if is_user else "invalid"

    def grpc_need(self, method: str) -> str:
        if method in GRPC_ADMIN:
            return ADMIN
        return OPEN if method in GRPC_HEALTH and not self.protect_health else USER

    def http_need(self, path: str) -> str:
        if HTTP_ADMIN.fullmatch(path):
            return ADMIN
        return OPEN if HTTP_HEALTH.fullmatch(path) and not self.protect_health else USER


def _known(presented: bytes, tokens: list[bytes]) -> bool:
    """Constant time in the token's content: every token is compared, whatever matched first."""
    found = False
    for token in tokens:
        found |= hmac.compare_digest(presented, token)
    return found
