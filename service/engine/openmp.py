"""One OpenMP thread pool per process, the engine thread's.

libgomp keeps a pool of worker threads per thread that has run a parallel region, and never
frees it while that thread lives. When the workers of all pools outnumber the cores, libgomp
stops spinning at barriers (its "throttled" spin count, 100 iterations), so every small op of a
forward pass pays a futex sleep and wake-up. On 2 cores, a model loaded on the asyncio thread
(whose pool then stays) made the engine thread's decode steps 1.6x slower (measured: 57 vs
35 ms/token on SmolLM2-135M; a 30-layer GEMV chain 22 vs 16 ms).
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("weft.engine")

_OMP_PAUSE_HARD = 2


def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded (found by path: a second copy would be a second runtime)."""
    try:
        with open("/proc/self/maps") as f:
            path = next((ln.split()[-1] for ln in f if "libgomp" in ln and ln.rstrip().endswith(".so.1")), None)
        return ctypes.CDLL(path) if path else None
    except OSError:
        return None


def release_thread_pool() -> bool:
    """Free the calling thread's idle OpenMP workers (they come back if it runs a parallel op
    again). Returns whether a libgomp was found and agreed."""
    gomp = _libgomp()
    if gomp is None or not hasattr(gomp, "omp_pause_resource_all"):
        return False
    ok = gomp.omp_pause_resource_all(_OMP_PAUSE_HARD) == 0
    log.debug("released the OpenMP pool of the calling thread: %s", ok)
    return ok
