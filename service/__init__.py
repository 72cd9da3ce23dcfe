"""Weft's process: engine, models, loader, gRPC server, REST shim, CLI."""
from common import env as _env
from common import heap as _heap

# Must precede torch's OpenMP start-up. libgomp's idle workers spin ~300k iterations before
# sleeping; when any other thread wants the core (the asyncio loop, gRPC, a second process)
# that spinning makes steps ~5x slower. A short spin keeps the quiet-machine speed (measured
# on 2 cores, SmolLM2 fp32: 32.2 vs 33.1 ms/token alone; 600 vs 122 ms/token with two engines
# side by side); OMP_WAIT_POLICY=PASSIVE would cost 58 ms/token even alone.
_env.set_process_defaults()   # GOMP_SPINCOUNT=10000, HF_HUB_OFFLINE=1 unless set
_heap.keep_freed_memory()      # prefill's large activations reuse pages instead of faulting them in
