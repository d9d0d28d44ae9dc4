"""Errors of the runner layer; each carries the wire code a caller is told.

SwarmError (protocols.errors)
└── RunnerError            the runner failed while running: INTERNAL
    ├── BadInput           inputs or params the model cannot take: BAD_REQUEST
    ├── ModelNotFound      no runner serves this model here: MODEL_NOT_FOUND
    └── ModelLoadError     the model could not be loaded or converted: INTERNAL
A model or backend declaration that does not validate is ``protocols.ConfigError``.
"""

from __future__ import annotations

from protocols import ErrorCode, SwarmError


class RunnerError(SwarmError):
    code = ErrorCode.INTERNAL


class BadInput(RunnerError):
    code = ErrorCode.BAD_REQUEST


class ModelNotFound(RunnerError):
    code = ErrorCode.MODEL_NOT_FOUND


class ModelLoadError(RunnerError):
    code = ErrorCode.INTERNAL
