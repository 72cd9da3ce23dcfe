"""Native CPU kernels: C sources in kernels/csrc, built at first use with the system C compiler
and called through ctypes (no Python headers, no ninja, ~12 s to build on 2 cores; cached by source hash).

Why not torch ops: on a CPU a decode step is dominated by many tiny ops (dispatch costs more than
the arithmetic) and by copies the reference makes (gathering paged KV). Why not a torch C++
extension: building one needs ninja and ~1 minute of compiling torch headers.

When no compiler is found, or the build fails, `lib()` returns None and callers use the torch
reference. `WEFT_NATIVE=0` turns the native path off (A/B measurements, debugging).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from common import env

log = logging.getLogger("weft.kernels")

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("cpu_attention.c", "cpu_rope_store.c", "cpu_norm.c", "cpu_act.c", "cpu_llama.c", "cpu_qmatmul.c", "cpu_lora.c",
           "cpu_argmax.c", "cpu_mask.c")
# -march=native: the build is cached per machine (the CPU flags are part of the key). Wide
# vectors: gcc otherwise caps AVX-512 machines at 256-bit vectors.
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
_FALLBACK_FLAGS = ["-O3", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def enabled() -> bool:
    return env.native_enabled()


def _cache_dir() -> Path:
    return env.cache_dir() / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return ""


def _build(compiler: str) -> Path | None:
    sources = [CSRC / s for s in SOURCES]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for part in [*(s.read_bytes() for s in sources), (CSRC / "weft_cpu.h").read_bytes(), version.encode(), _cpu_flags().encode(),
                 " ".join(_FLAGS).encode()]:
        key.update(part)
    out = _cache_dir() / f"weft_cpu_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    for flags in (_FLAGS, _FALLBACK_FLAGS):
        # Build under a temporary name and rename: concurrent processes never load half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        proc = subprocess.run([compiler, *flags, "-o", tmp, *map(str, sources), "-lm"],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, out)
            return out
        os.unlink(tmp)
        log.debug("native kernels: %s %s failed: %s", compiler, " ".join(flags), proc.stderr[-2000:])
    return None


def lib() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they cannot be built here."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            compiler = env.c_compiler() or shutil.which("cc") or shutil.which("gcc")
            path = _build(compiler) if compiler else None
            if path is not None:
                # torch is imported (and its libgomp loaded) before this: same soname, one runtime.
                _lib = _bind(ctypes.CDLL(str(path)))
            else:
                log.warning("no C compiler could build kernels/csrc: using the slower torch reference on CPU")
        except OSError as exc:
            log.warning("native CPU kernels unavailable (%s): using the torch reference", exc)
            _lib = None
        _tried = True
        return _lib


def _bind(dll: ctypes.CDLL) -> ctypes.CDLL:
    f = dll.weft_paged_attention_f32
    f.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64,
                  _i64, _i64, _i64, _i64, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    f.restype = ctypes.c_int
    f = dll.weft_rope_store_f32
    f.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, ctypes.c_int,
                  ctypes.c_int]
    f.restype = None
    f = dll.weft_add_rms_norm_f32
    f.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float, ctypes.c_int]
    f.restype = None
    f = dll.weft_silu_mul_f32
    f.argtypes = [_ptr, _ptr, _i64, _i64, ctypes.c_int]
    f.restype = None
    f = dll.weft_argmax_rows_f32
    f.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr, ctypes.c_int]
    f.restype = None
    f = dll.weft_apply_bitmask_f32
    f.argtypes = [_ptr, _i64, _ptr, _i64, _ptr, _i64, _i64]
    f.restype = None
    f = dll.weft_llama_layers_f32
    f.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, ctypes.c_float, _i64, _i64, _i64,
                  _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float, ctypes.c_int,
                  _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, ctypes.c_int]
    f.restype = ctypes.c_int
    f = dll.weft_bf16_linear_f32
    f.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, ctypes.c_int]
    f.restype = ctypes.c_int
    f = dll.weft_lora_add_f32
    f.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _i64, ctypes.c_int]
    f.restype = None
    f = dll.weft_qmatmul_f32
    f.argtypes = [_ptr, _i64, _i64, _ptr, ctypes.c_int, _i64, _ptr, _i64, ctypes.c_int]
    f.restype = ctypes.c_int
    f = dll.weft_qmatmul_amx
    f.argtypes = [_ptr, _i64, _i64, _ptr, ctypes.c_int, _i64, _ptr, _i64, ctypes.c_int]
    f.restype = ctypes.c_int
    dll.weft_qmatmul_amx_available.argtypes = []
    dll.weft_qmatmul_amx_available.restype = ctypes.c_int
    f = dll.weft_qcheck_f32
    f.argtypes = [_ptr, ctypes.c_int, _i64, _i64, _ptr, ctypes.c_int]
    f.restype = _i64
    global _has_sgemm, _has_bf16_gemm, _has_amx
    found = {}
    for setter, name in (("weft_set_sgemm", "sgemm_"), ("weft_set_bf16_gemm", "gemm_bf16bf16f32_")):
        getattr(dll, setter).argtypes = [_ptr]
        getattr(dll, setter).restype = None
        found[name] = _torch_blas(name)
        if found[name] is not None:
            getattr(dll, setter)(found[name])
    _has_sgemm = found["sgemm_"] is not None
    _has_bf16_gemm = found["gemm_bf16bf16f32_"] is not None
    _has_amx = bool(dll.weft_qmatmul_amx_available())   # asked once: callers ask every step
    return dll


_has_sgemm = False
_has_bf16_gemm = False
_has_amx = False


def _torch_blas(name: str) -> int | None:
    """Address of a BLAS routine torch's own library exports (MKL in the x86 wheels): sgemm_,
    which torch calls for float32 matmuls, so native code multiplies exactly as torch does; MKL's
    gemm_bf16bf16f32_ (bf16 inputs, float32 sums and output). None when this torch has none."""
    path = Path(torch.__file__).resolve().parent / "lib" / "libtorch_cpu.so"
    try:
        fn = getattr(ctypes.CDLL(str(path)), name)
    except (OSError, AttributeError):
        return None
    return ctypes.cast(fn, ctypes.c_void_p).value


def has_sgemm() -> bool:
    """Whole-layer native steps need torch's sgemm (see kernels/csrc/cpu_llama.c)."""
    return lib() is not None and _has_sgemm


def has_bf16_gemm() -> bool:
    """Whether `bf16_linear` runs here: the kernels are built and torch exports MKL's bf16 GEMM."""
    return lib() is not None and _has_bf16_gemm


def has_amx() -> bool:
    """Whether the packed-block kernel on AMX tiles runs here (built with AMX, the CPU has it, and
    Linux granted the tile state)."""
    return lib() is not None and _has_amx


def bf16_linear(x: torch.Tensor, w16: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [t, k] float32, rounded to bf16, @ w16 [n, k] bf16 ^T (+ bias) -> float32 [t, n]: bf16
    products, float32 sums and output (kernels/csrc/cpu_llama.c, MKL's gemm_bf16bf16f32). The
    native loop's bf16 steps call the same function. Callers check `has_bf16_gemm` first."""
    x = x.contiguous()
    t, k = x.shape
    n = w16.shape[0]
    y = torch.empty(t, n, dtype=torch.float32)
    xb = torch.empty(t * k, dtype=torch.bfloat16)
    rc = lib().weft_bf16_linear_f32(x.data_ptr(), w16.data_ptr(), 0 if bias is None else bias.contiguous().data_ptr(),
                                    y.data_ptr(), t, n, k, xb.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"weft_bf16_linear_f32 failed (code {rc})")
    return y


def silu_mul(gate_up: torch.Tensor, inter: int) -> torch.Tensor:
    """silu(gate) * up of a fused float32 [T, 2 * inter] gate/up product -> [T, inter] in one pass
    (kernels/csrc/cpu_act.c; bit-identical to torch's F.silu(gate) * up, which reads and writes
    the rows three times). Callers check `usable` first."""
    gate_up = gate_up.contiguous()
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=torch.float32)
    lib().weft_silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inter), inter,
                            torch.get_num_threads())
    return out


def argmax_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of each row's maximum of float32 x [B, V] (rows contiguous), as
    x.max(dim=-1) gives them (ties: the lowest index), except that a row holding a NaN has the
    value NaN and index 0 (kernels/csrc/cpu_argmax.c). Callers check `usable` first."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    values = torch.empty(x.shape[0], dtype=torch.float32)
    indices = torch.empty(x.shape[0], dtype=torch.long)
    lib().weft_argmax_rows_f32(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), indices.data_ptr(),
                               values.data_ptr(), torch.get_num_threads())
    return values, indices


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """kernels/mask.py's apply_token_bitmask_ on float32 CPU logits [B, V] (rows contiguous),
    bitmask int32 [B, >= ceil(V / 32)], rows int64 or None (kernels/csrc/cpu_mask.c). Callers
    check `usable` and the shapes first."""
    bitmask = bitmask if bitmask.stride(-1) == 1 else bitmask.contiguous()
    if rows is not None:
        rows = rows.to(torch.long).contiguous()
    lib().weft_apply_bitmask_f32(logits.data_ptr(), logits.stride(0), bitmask.data_ptr(), bitmask.stride(0),
                                 0 if rows is None else rows.data_ptr(),
                                 logits.shape[0] if rows is None else rows.numel(), logits.shape[1])


def lora_add(out: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, rank: int,
             part_cols: torch.Tensor, token_slots: torch.Tensor, num_slots: int, num_threads: int | None = None) -> None:
    """out[t] += x[t] @ a_stack[s] @ b_stack[s] for each token t whose slot s = token_slots[t] is
    >= 0, in place (kernels/csrc/cpu_lora.c): out [T, n_out], x [T, n_in], a_stack [S, n_in,
    parts * rank], b_stack [S, parts * rank, n_out] block-diagonal over the parts, whose output
    columns start at part_cols (int64, parts + 1 entries); token_slots int64 [T]. All contiguous."""
    lib().weft_lora_add_f32(out.data_ptr(), x.data_ptr(), x.shape[0], x.shape[1], out.shape[1], a_stack.data_ptr(),
                            b_stack.data_ptr(), rank, part_cols.numel() - 1, part_cols.data_ptr(),
                            token_slots.data_ptr(), num_slots, num_threads or torch.get_num_threads())


def usable(*tensors: torch.Tensor) -> bool:
    """Float32 CPU tensors, native kernels enabled and built."""
    return (enabled() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and lib() is not None)


# KV cache dtypes the native kernels read and write (the kv_bf16 flag of their entry points).
KV_DTYPES = (torch.float32, torch.bfloat16)


def kv_usable(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """A pair of CPU caches, both float32 or both bfloat16, the native kernels enabled and built."""
    return (enabled() and k_cache.device.type == "cpu" and k_cache.dtype in KV_DTYPES
            and v_cache.dtype == k_cache.dtype and lib() is not None)


def kv_bf16(cache: torch.Tensor) -> int:
    """The kernels' kv_bf16 flag for a cache."""
    return int(cache.dtype == torch.bfloat16)
