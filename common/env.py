"""Every environment variable Weft reads, read here and nowhere else (the README's table is
`ENV_VARS`). Values are read when asked for, not at import, so a test or a process that sets
one before the first use is obeyed."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class EnvVar:
    name: str
    default: str
    help: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("WEFT_API_KEY", "", "the API key `weft serve`, `weft shim` and `weft client` use when --api-key is not given"),
    EnvVar("WEFT_CACHE_DIR", "~/.cache/weft", "converted models (models/) and compiled CPU kernels (kernels/)"),
    EnvVar("WEFT_HOME", "~/.weft", "the model store: manifests/ (named models) and blobs/ (imported GGUF files)"),
    EnvVar("WEFT_HOST", "", "host:port of the server `weft run` talks to (unset: it runs the model in-process)"),
    EnvVar("WEFT_NATIVE", "1", "0: no native CPU path (the decoder layers in C); torch ops only"),
    EnvVar("WEFT_PACKED", "1", "0: no GGUF-block matmuls for few-row steps; float32 weights only"),
    EnvVar("WEFT_BF16_GEMM", "1", "0: bfloat16 on CPU multiplies steps of many rows by sgemm on float32 weights, "
           "and --dtype auto stays float32"),
    EnvVar("WEFT_KEEP_HEAP", "1", "0: freed memory goes back to the OS as glibc likes (see common/heap.py)"),
    EnvVar("WEFT_FORCE_TRITON", "0", "1: the Triton kernels on CPU tensors too (with TRITON_INTERPRET=1, for tests)"),
    EnvVar("TRITON_INTERPRET", "0", "Triton's own: 1 runs Triton kernels in its interpreter (no GPU needed)"),
    EnvVar("CC", "cc or gcc on PATH", "the C compiler for the native CPU kernels"),
    EnvVar("GOMP_SPINCOUNT", "10000", "set by Weft unless given: how long idle OpenMP workers spin (see service/__init__.py)"),
    EnvVar("HF_HUB_OFFLINE", "1", "set by Weft unless given: transformers never reaches the Hugging Face hub"),
    EnvVar("RANK", "", "tensor parallelism across hosts (torchrun's names): this process's rank; unset: `weft serve "
           "--tensor-parallel-size N` starts ranks 1..N-1 itself on this machine"),
    EnvVar("WORLD_SIZE", "--tensor-parallel-size", "... the number of ranks"),
    EnvVar("MASTER_ADDR", "127.0.0.1", "... the address of rank 0 (the server) for the rendezvous"),
    EnvVar("MASTER_PORT", "29500", "... its port"),
    EnvVar("LOCAL_RANK", "RANK", "... on CUDA: which GPU of this host the rank uses"),
)


def _get(name: str) -> str | None:
    return os.environ.get(name)


def _on(name: str, default: bool) -> bool:
    value = _get(name)
    return default if value is None or value == "" else value != "0"


def api_key() -> str | None:
    return _get("WEFT_API_KEY") or None


def cache_dir() -> Path:
    """`$WEFT_CACHE_DIR`, default ~/.cache/weft, with ~ expanded."""
    return Path(_get("WEFT_CACHE_DIR") or Path.home() / ".cache" / "weft").expanduser()


def weft_home() -> Path:
    """`$WEFT_HOME`, default ~/.weft, with ~ expanded: the model store."""
    return Path(_get("WEFT_HOME") or Path.home() / ".weft").expanduser()


def weft_host() -> str | None:
    return _get("WEFT_HOST") or None


def native_enabled() -> bool:
    return _on("WEFT_NATIVE", True)


def packed_enabled() -> bool:
    return _on("WEFT_PACKED", True)


def bf16_gemm_enabled() -> bool:
    return _on("WEFT_BF16_GEMM", True)


def keep_heap() -> bool:
    return _on("WEFT_KEEP_HEAP", True)


def force_triton() -> bool:
    return _get("WEFT_FORCE_TRITON") == "1"


def triton_interpret() -> bool:
    return _get("TRITON_INTERPRET") == "1"


def c_compiler() -> str | None:
    return _get("CC") or None


def rendezvous() -> dict[str, str] | None:
    """RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK as torchrun sets them; None
    when RANK is unset (a single process, or the driver that starts its local ranks)."""
    if _get("RANK") is None:
        return None
    return {name: value for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
            if (value := _get(name)) is not None}


def child_environment(**overrides: str) -> dict[str, str]:
    """This process's environment with `overrides`: for the processes Weft starts itself."""
    return {**os.environ, **overrides}


def set_process_defaults() -> None:
    """The defaults Weft gives its process unless the user set them (before torch/OpenMP start,
    before transformers is imported)."""
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
