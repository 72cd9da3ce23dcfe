"""What the gRPC server and the REST shim agree on: metadata keys, limits, the API-key check and
the version, defined once."""
from __future__ import annotations

import hmac
from importlib import metadata

INVALID_FIELD_KEY = "weft-invalid-field"     # trailing metadata: the offending field's path
REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_CHARS = 256
# The largest request body (HTTP) or message (gRPC) a server reads: beyond it, 413 /
# RESOURCE_EXHAUSTED naming the limit. 16 MiB holds a 128k-token context as JSON several times
# over; gRPC's own default (4 MiB) is too small for long chats with tools.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


def weft_version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written)."""
    try:
        return metadata.version("weft")
    except metadata.PackageNotFoundError:   # running from a source tree that was never installed
        return "0+unknown"


def bearer_matches(header: str | bytes | None, api_key: str) -> bool:
    """Whether an `authorization` header carries `Bearer <api_key>` (constant-time compare)."""
    if header is None:
        return False
    got = header if isinstance(header, bytes) else header.encode()
    return hmac.compare_digest(got, f"Bearer {api_key}".encode())
