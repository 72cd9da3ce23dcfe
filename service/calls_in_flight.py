"""The calls a servicer is running, so that a drain can wait for them to finish."""
from __future__ import annotations

import asyncio


class CallsInFlight:
    """A counter with an event set while it is zero (one per servicer; the event loop's own)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if not self.count:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no call is running."""
        await self._idle.wait()
