"""The declaration of one HTTP backend: where it is, its keys, and how hard to try it.

A frozen, validated config read once from a config table (``from_table``), so
a bad field fails at start naming the field. API keys are secrets: given
inline (``api_keys``) or by environment variable name (``key_env``, read when
the endpoint starts), and hidden from the repr, so printing or logging a
config never shows one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from protocols.config import Table
from protocols.errors import ConfigError

from .keys import STRATEGIES

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True, repr=False)
class EndpointConfig:
    """Where a backend is and how hard to try it. ``api_keys`` are secrets (see the repr)."""

    name: str  # shown in status and logs
    base_url: str  # http(s)://host:port[/prefix], without credentials
    api_keys: tuple[str, ...] = ()
    key_env: tuple[str, ...] = ()  # names of environment variables holding keys
    key_strategy: str = "round-robin"  # "round-robin" | "least-loaded" | "priority"
    max_concurrency: int = 8
    connect_timeout_s: float = 5.0
    timeout_s: float = 120.0  # a whole call, retries included, unless the call gives its own
    retries: int = 2  # extra attempts, only where safe
    backoff_base_s: float = 0.2
    backoff_max_s: float = 5.0
    breaker_failures: int = 5  # consecutive failures that open the circuit
    breaker_cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("name: must not be empty")
        _check_base_url(self.base_url)
        if not all(isinstance(k, str) and k.strip() == k and k for k in self.api_keys):
            raise ConfigError("api_keys: each key must be a non-empty string without spaces")
        for var in self.key_env:
            if not _ENV_NAME.fullmatch(var):
                raise ConfigError(f"key_env: {var!r} is not an environment variable name")
        if self.key_strategy not in STRATEGIES:
            raise ConfigError(f"key_strategy: expected one of {list(STRATEGIES)}")
        if self.max_concurrency < 1:
            raise ConfigError("max_concurrency: must be at least 1")
        if self.retries < 0 or self.breaker_failures < 1:
            raise ConfigError("retries must be >= 0 and breaker_failures >= 1")
        if not (self.connect_timeout_s > 0 and self.timeout_s > 0):
            raise ConfigError("connect_timeout_s and timeout_s must be positive")
        if not (0 <= self.backoff_base_s <= self.backoff_max_s and self.breaker_cooldown_s >= 0):
            raise ConfigError("need 0 <= backoff_base_s <= backoff_max_s, breaker_cooldown_s >= 0")

    def __repr__(self) -> str:
        return (
            f"EndpointConfig(name={self.name!r}, base_url={self.base_url!r}, "
            f"api_keys=<{len(self.api_keys)} hidden>, key_env={self.key_env!r}, "
            f"key_strategy={self.key_strategy!r}, max_concurrency={self.max_concurrency}, "
            f"timeout_s={self.timeout_s}, retries={self.retries})"
        )

    __str__ = __repr__

    @classmethod
    def from_table(cls, table: Table) -> EndpointConfig:
        """Read the endpoint's fields from ``table``; the caller calls ``table.done()``.

        Fields: ``name``, ``base_url`` (required); ``api_keys`` (a string or a list),
        ``key_env`` (variable names), ``key_strategy``, ``max_concurrency``,
        ``connect_timeout_s``, ``timeout_s``, ``retries``, ``backoff_base_s``,
        ``backoff_max_s``, ``breaker_failures``, ``breaker_cooldown_s``.
        """
        d = cls.__dataclass_fields__
        values: dict[str, Any] = {
            "name": table.text("name"),
            "base_url": table.text("base_url"),
            "api_keys": table.texts("api_keys", ()),
            "key_env": table.texts("key_env", ()),
            "key_strategy": table.text(
                "key_strategy", d["key_strategy"].default, choices=STRATEGIES
            ),
            "max_concurrency": table.integer("max_concurrency", 8, low=1, high=4096),
            "connect_timeout_s": table.number("connect_timeout_s", 5.0, low=0.001, high=600),
            "timeout_s": table.number("timeout_s", 120.0, low=0.001, high=86400),
            "retries": table.integer("retries", 2, low=0, high=20),
            "backoff_base_s": table.number("backoff_base_s", 0.2, low=0, high=600),
            "backoff_max_s": table.number("backoff_max_s", 5.0, low=0, high=3600),
            "breaker_failures": table.integer("breaker_failures", 5, low=1, high=10_000),
            "breaker_cooldown_s": table.number("breaker_cooldown_s", 30.0, low=0, high=86400),
        }
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{table.where}.{exc}") from None

    def resolve_keys(self, environ: Mapping[str, str]) -> tuple[str, ...]:
        """The inline keys, then those named by ``key_env``; a missing variable is refused."""
        keys = list(self.api_keys)
        for var in self.key_env:
            value = environ.get(var, "").strip()
            if not value:
                raise ConfigError(f"{self.name}: environment variable {var} (key_env) is not set")
            keys.append(value)
        return tuple(keys)


def _check_base_url(text: str) -> None:
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"base_url: not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError("base_url: expected http(s)://host[:port][/prefix]")
    if url.userinfo:
        raise ConfigError("base_url: must not hold credentials; use api_keys or key_env")
    if url.query or url.fragment:
        raise ConfigError("base_url: must not have a query or fragment")
