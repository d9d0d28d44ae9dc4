"""Where the HTTP gateway listens and who may use it, checked before anything binds.

The gateway turns plain HTTP into swarm work, so anyone who reaches it spends
this node's (and its peers') compute. It therefore binds to loopback unless it
is told otherwise, and refuses a wider address unless a bearer token guards it
or the operator said ``--http-insecure`` on purpose.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from protocols.errors import ConfigError

DEFAULT_MAX_BODY = 8 * 1024 * 1024
LOOPBACK_NAMES = frozenset({"localhost"})


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (tests); the bound one is on ``Gateway.url``
    token: str | None = None  # bearer token every route but health requires
    insecure: bool = False  # serve beyond loopback without a token
    max_body: int = DEFAULT_MAX_BODY  # request bodies over this get 413

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("--http: give a host, e.g. 127.0.0.1:8080")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--http: port {self.port} is not 0 to 65535")
        if self.token is not None and not self.token.strip():
            raise ConfigError("the HTTP bearer token is empty")
        if self.max_body < 1024:
            raise ConfigError("the HTTP body limit must be at least 1024 bytes")
        if not is_loopback(self.host) and self.token is None and not self.insecure:
            raise ConfigError(
                f"--http {self.host}: binding beyond loopback needs a bearer token "
                "(--http-token-env VAR) or --http-insecure"
            )

    @classmethod
    def parse(
        cls, text: str, *, token_env: str | None = None, insecure: bool = False
    ) -> GatewayConfig:
        """``HOST:PORT`` (``[::1]:PORT`` for IPv6) and the token named by ``token_env``."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
        host = host.removeprefix("[").removesuffix("]")
        token = None
        if token_env is not None:
            token = os.environ.get(token_env)
            if not token:
                raise ConfigError(f"--http-token-env {token_env}: that variable is unset or empty")
        return cls(host=host, port=int(port), token=token, insecure=insecure)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere
