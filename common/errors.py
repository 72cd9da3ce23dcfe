"""Errors that cross layers (decoding raises them, the service maps them). The gRPC and HTTP layers map each to a status code."""
from __future__ import annotations


class WeftError(Exception):
    """Base class for errors Weft reports to a caller."""


class InvalidArgumentError(WeftError, ValueError):
    """A request field is invalid (gRPC INVALID_ARGUMENT, HTTP 400). `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelLoadError(WeftError, ValueError):
    """A model path is missing, of an unknown architecture, or its weights are corrupt."""


class ResourceExhaustedError(WeftError):
    """The waiting queue is full (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""


class NotFoundError(WeftError):
    """A named thing (a model in the store) does not exist (gRPC NOT_FOUND, HTTP 404). `field`
    names the request field that named it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
