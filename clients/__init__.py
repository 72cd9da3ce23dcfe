"""Weft's Python clients: generated stubs (clients.weft.v1, from protos/) and WeftClient /
AsyncWeftClient (clients.client). Importing this package stays cheap: the clients load on use."""
from __future__ import annotations

from typing import Any

__all__ = ["AsyncWeftClient", "RetryPolicy", "WeftClient"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from clients import client

        return getattr(client, name)
    raise AttributeError(f"module 'clients' has no attribute {name!r}")
