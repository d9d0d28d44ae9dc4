"""Typed reads from a config table (a TOML table or a ``--model`` flag parsed to a dict).

Every runner family turns its table into a frozen config with these readers, so
a bad declaration fails at start with one message naming the field, in the
form ``models[2].device: expected a string, got 3``, never deep in a runner.
It sits in the bottom layer because the node's own tables ([router], [node])
are read the same way.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")
_MISSING: Any = object()


class Table:
    """Read fields of ``data`` (found at ``where``) by type; remember which were read."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
        self.data = data
        self.where = where
        self._read: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self._read.add(key)
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise ConfigError(f"{self.where}.{key}: required")
        return default

    def _bad(self, key: str, want: str, got: Any) -> ConfigError:
        return ConfigError(f"{self.where}.{key}: expected {want}, got {got!r}")

    def text(self, key: str, default: Any = _MISSING, *, choices: Collection[str] = ()) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str) or not value:
            raise self._bad(key, "a non-empty string", value)
        if choices and value not in choices:
            raise self._bad(key, f"one of {sorted(choices)}", value)
        return value

    def integer(self, key: str, default: Any = _MISSING, *, low: int = 0, high: int = 2**31) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._bad(key, f"an integer from {low} to {high}", value)
        return value

    def number(
        self, key: str, default: Any = _MISSING, *, low: float = 0.0, high: float = 1e9
    ) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise self._bad(key, f"a number from {low:g} to {high:g}", value)
        return float(value)

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def texts(self, key: str, default: Any = _MISSING) -> Any:
        """A list of non-empty strings (a single string is taken as a list of one)."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise self._bad(key, "a list of non-empty strings", value)
        return tuple(items)

    def table(self, key: str) -> Table | None:
        """A sub-table (``[models.container]``, ``env = {...}``), or None when absent."""
        value = self._get(key, None)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self._bad(key, "a table", value)
        return Table(value, f"{self.where}.{key}")

    def done(self) -> None:
        """Refuse keys nobody read: a typo must not be ignored silently."""
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise ConfigError(f"{self.where}: unknown field(s) {', '.join(unknown)}")
