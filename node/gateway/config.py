"""Where the HTTP gateway and the KServe v2 gRPC port listen and who may use them,
checked before anything binds.

Both turn a client's request into swarm work, so anyone who reaches them spends
this node's (and its peers') compute. Each therefore binds to loopback unless it
is told otherwise, and refuses a wider address unless a bearer token guards it
or the operator said ``--http-insecure`` (``--grpc-insecure``) on purpose.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from protocols.errors import ConfigError

DEFAULT_MAX_BODY = 8 * 1024 * 1024
DEFAULT_GRPC_WORKERS = 64
MAX_QUEUED_SHARE = 4
EXAMPLES = {"http": "127.0.0.1:8080", "grpc": "127.0.0.1:8471"}
LOOPBACK_NAMES = frozenset({"localhost"})


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (tests); the bound one is on ``Gateway.url``
    token: str | None = None  # bearer token every route but health requires
    insecure: bool = False  # serve beyond loopback without a token
    max_body: int = DEFAULT_MAX_BODY  # request bodies over this get 413

    def __post_init__(self) -> None:
        _check_listener("http", self.host, self.port, self.token, self.insecure)
        if self.max_body < 1024:
            raise ConfigError("the HTTP body limit must be at least 1024 bytes")

    @classmethod
    def parse(
        cls, text: str, *, token_env: str | None = None, insecure: bool = False
    ) -> GatewayConfig:
        """``HOST:PORT`` (``[::1]:PORT`` for IPv6) and the token named by ``token_env``."""
        host, port = _host_port(text, "http")
        token = _token(token_env, "http")
        return cls(host=host, port=port, token=token, insecure=insecure)


@dataclass(frozen=True, slots=True)
class GrpcConfig:
    """The KServe v2 gRPC port (``node.gateway.grpc_server``)."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (tests); the bound one is on ``GrpcGateway.address``
    token: str | None = None  # bearer token every call but the health ones requires
    insecure: bool = False  # serve beyond loopback without a token
    # Bytes of one request message; grpcio refuses a larger one (RESOURCE_EXHAUSTED)
    # before reading it. The daemon caps it at its limits' max_message.
    max_message: int = DEFAULT_MAX_BODY
    # Calls served at once, each waiting on one of grpcio's threads for the trio loop;
    # up to MAX_QUEUED_SHARE times as many more wait for a thread, past that grpcio
    # answers RESOURCE_EXHAUSTED.
    workers: int = DEFAULT_GRPC_WORKERS

    def __post_init__(self) -> None:
        _check_listener("grpc", self.host, self.port, self.token, self.insecure)
        if self.max_message < 1024:
            raise ConfigError("the gRPC message limit must be at least 1024 bytes")
        if not 1 <= self.workers <= 1024:
            raise ConfigError(f"gRPC workers: {self.workers} is not 1 to 1024")

    @classmethod
    def parse(
        cls, text: str, *, token_env: str | None = None, insecure: bool = False
    ) -> GrpcConfig:
        """``HOST:PORT`` (``[::1]:PORT`` for IPv6) and the token named by ``token_env``."""
        host, port = _host_port(text, "grpc")
        return cls(host=host, port=port, token=_token(token_env, "grpc"), insecure=insecure)


def _check_listener(flag: str, host: str, port: int, token: str | None, insecure: bool) -> None:
    if not host:
        raise ConfigError(f"--{flag}: give a host, e.g. {EXAMPLES[flag]}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--{flag}: port {port} is not 0 to 65535")
    if token is not None and not token.strip():
        raise ConfigError(f"the {flag.upper()} bearer token is empty")
    if not is_loopback(host) and token is None and not insecure:
        raise ConfigError(
            f"--{flag} {host}: binding beyond loopback needs a bearer token "
            f"(--{flag}-token-env VAR) or --{flag}-insecure"
        )


def _host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--{flag} {text!r}: expected HOST:PORT, e.g. {EXAMPLES[flag]}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _token(token_env: str | None, flag: str) -> str | None:
    if token_env is None:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise ConfigError(f"--{flag}-token-env {token_env}: that variable is unset or empty")
    return token


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere
