"""Weft's process: engine, models, loader, gRPC server, REST shim, CLI."""
import os as _os

# Must precede torch's OpenMP start-up. Spinning OpenMP workers starve the engine's other
# threads (asyncio loop, gRPC) on small CPUs; measured 10x slower steps under contention.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
