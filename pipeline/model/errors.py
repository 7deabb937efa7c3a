"""Typed errors with stable error codes, for every layer of the product.

This module lives at the bottom of the import graph (``pipeline.model``) and depends on
nothing but the standard library, so the model core, the offline job and the online
endpoint all raise the same classes without importing upward.

Every error carries an :class:`ErrorCode`. Codes are part of the public contract: they are
written into the ``error_code`` column of offline outputs and returned by the HTTP API, so
they never change meaning once released. Only ``deployments/`` maps codes to HTTP statuses.
"""

from __future__ import annotations

import re
from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable, machine-readable error codes."""

    # Image decoding (the decode guard).
    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    TOO_LARGE = "too_large"
    TOO_SMALL = "too_small"
    # Reading inputs.
    READ_FAILED = "read_failed"
    # Configuration and checkpoints.
    INVALID_CONFIG = "invalid_config"
    CHECKPOINT_NOT_FOUND = "checkpoint_not_found"
    UNKNOWN_CHECKPOINT_FORMAT = "unknown_checkpoint_format"
    MISSING_WEIGHT = "missing_weight"
    SHAPE_MISMATCH = "shape_mismatch"
    # Requests to the online endpoint.
    BAD_REQUEST = "bad_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    BODY_TIMEOUT = "body_timeout"
    """The request's body did not arrive in time (a stalled or trickled upload)."""
    # Offline job outputs.
    OUTPUT_EXISTS = "output_exists"
    OUTPUT_IN_USE = "output_in_use"
    UNSUPPORTED_OUTPUT = "unsupported_output"
    SCHEMA_MISMATCH = "schema_mismatch"
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"
    ERROR_BUDGET_EXCEEDED = "error_budget_exceeded"
    OUTPUT_WRITE_FAILED = "output_write_failed"
    """The table's files or log could not be written (disk full, read-only, a store refusing writes)."""
    # Running the offline job.
    INSUFFICIENT_RESOURCES = "insufficient_resources"
    """The cluster cannot hold the job's minimum encoder actors and a decode task at once."""
    STALLED = "stalled"
    """No file was written and no unit committed for longer than the job's watchdog allows."""
    INTERRUPTED = "interrupted"
    """The job was stopped by SIGINT or SIGTERM."""
    # Anything not anticipated (a bug): still reported per item, never fatal to a job.
    INTERNAL = "internal"


DECODE_ERROR_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.EMPTY,
        ErrorCode.NOT_AN_IMAGE,
        ErrorCode.UNSUPPORTED_FORMAT,
        ErrorCode.TRUNCATED,
        ErrorCode.CORRUPT,
        ErrorCode.TOO_LARGE,
        ErrorCode.TOO_SMALL,
    }
)


class LlavaFeaturesError(Exception):
    """Base class: every error of the product has a stable ``code`` and a readable message."""

    default_code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = ErrorCode(code) if code is not None else self.default_code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def to_dict(self) -> dict[str, str]:
        """The JSON-able form used by error rows and HTTP error bodies."""
        return {"error_code": str(self.code), "error_message": self.message}


class ConfigError(LlavaFeaturesError, ValueError):
    """A configuration value is invalid (unknown projector type, select mode, dtype, ...)."""

    default_code = ErrorCode.INVALID_CONFIG


class CheckpointError(LlavaFeaturesError, ValueError):
    """A checkpoint cannot be found, recognised or loaded."""

    default_code = ErrorCode.UNKNOWN_CHECKPOINT_FORMAT


class MissingWeightError(CheckpointError):
    """A weight the model needs is absent from the checkpoint."""

    default_code = ErrorCode.MISSING_WEIGHT


class ShapeMismatchError(CheckpointError):
    """A weight in the checkpoint has a different shape than the model expects."""

    default_code = ErrorCode.SHAPE_MISMATCH


class ModelStateError(LlavaFeaturesError, RuntimeError):
    """The model is used in a state that does not allow it (not loaded yet, an unexpected module structure)."""

    default_code = ErrorCode.INTERNAL


class DecodeError(LlavaFeaturesError):
    """An input could not be turned into an RGB image. ``code`` is one of DECODE_ERROR_CODES."""

    default_code = ErrorCode.CORRUPT

    def __init__(self, message: str, *, code: ErrorCode, name: str | None = None) -> None:
        super().__init__(f"{name}: {message}" if name else message, code=code)
        self.name = name


class InputReadError(LlavaFeaturesError):
    """An input URI could not be listed or read."""

    default_code = ErrorCode.READ_FAILED


class RequestError(LlavaFeaturesError):
    """A request to the online endpoint is malformed, too large, unauthorised or not served."""

    default_code = ErrorCode.BAD_REQUEST


class OutputError(LlavaFeaturesError):
    """The output location cannot be used as asked (not empty, other fingerprint)."""

    default_code = ErrorCode.OUTPUT_EXISTS


class JobStoppedError(LlavaFeaturesError):
    """The offline job stopped before its table was complete (stalled, a storage fault, the shared pool
    gone, interrupted). What it committed is kept, and ``--resume`` continues; ``summary`` is what the
    run did until then (a ``pipeline.offline.JobSummary``)."""

    default_code = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None, summary: object = None) -> None:
        super().__init__(message, code=code)
        self.summary = summary


class IncompleteTableWarning(UserWarning):
    """A feature table was read while it is not complete (in progress, interrupted, or over its budget)."""


class ErrorBudgetExceededError(LlavaFeaturesError):
    """More inputs failed than ``max_error_fraction`` allows (the output is still written)."""

    default_code = ErrorCode.ERROR_BUDGET_EXCEEDED


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(exc: BaseException) -> str:
    """``exc`` as one line for a message of ours: its type and text, without the line breaks, tree
    arrows and colours some libraries put in theirs (delta-rs: ``Generic LocalFileSystem error /
    ↳ Read-only file system (os error 30)``)."""
    text = _ANSI.sub("", str(exc))
    parts = [part.strip(" ↳\t") for part in text.splitlines()]
    return f"{type(exc).__name__}: " + ": ".join(part for part in parts if part)
