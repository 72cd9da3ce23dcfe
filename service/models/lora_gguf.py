"""LoRA adapters as llama.cpp's convert_lora_to_gguf.py writes them (what Ollama's Modelfile
`ADAPTER ./file.gguf` names): metadata general.type = "adapter", adapter.type = "lora",
adapter.lora.alpha; tensors blk.{N}.{attn_q,...,ffn_down}.weight.lora_a / .lora_b.

GGUF lists dims in reverse, so lora_a holds torch [r, in] and lora_b torch [out, r], PEFT's
orientation. The scaling is llama.cpp's: alpha / r, or 1 when the file has no alpha (or 0); GGUF
has no rsLoRA. For architecture "llama" the converter interleaves each head's rotary halves in
attn_q / attn_k's output rows (as it does the base model's weights, which transformers undoes
when Weft loads a base GGUF), so lora_b of those two is put back in HF's order here."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.gguf_file import open_whole_gguf
from service.models.lora_adapter import AdapterLoadError, AdapterModule, BaseShapes

# llama.cpp's tensor name -> PEFT's module name (gguf.constants TENSOR_NAMES).
GGUF_MODULES = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
                "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight\.lora_([ab])")
# The base model's config.model_type -> the general.architecture llama.cpp files it under.
GGUF_ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# Architectures whose converter permutes q/k rows (llama.cpp's LlamaModel; Mistral goes through it).
PERMUTED_ARCHS = ("llama",)
_READABLE = ("F32", "F16", "BF16", "Q8_0")


def read_gguf(path: Path, shapes: BaseShapes) -> list[AdapterModule]:
    """A LoRA GGUF's modules, in PEFT's orientation and HF's row order."""
    reader = _open(path)
    general = _field(reader, "general.type")
    if general != "adapter":
        raise AdapterLoadError(f"{path}: general.type is {general!r}, not 'adapter': not a LoRA adapter GGUF "
                               "(a base model?)")
    kind = _field(reader, "adapter.type")
    if kind != "lora":
        raise AdapterLoadError(f"{path}: adapter.type {kind!r} is not supported (only 'lora')")
    arch = _field(reader, "general.architecture")
    expected = GGUF_ARCH_OF.get(shapes.family)
    if expected is not None and arch != expected:
        raise AdapterLoadError(f"{path}: an adapter for a {arch!r} model; the base model ({shapes.family}) is "
                               f"{expected!r}")
    # The converter writes the base model's parameters too; the q/k un-permutation needs the
    # same head counts as the base model's, which shapes alone would not show.
    for key, ours in (("attention.head_count", shapes.num_heads), ("attention.head_count_kv", shapes.num_kv_heads)):
        theirs = _field(reader, f"{arch}.{key}")
        if theirs is not None and ours and int(theirs) != ours:
            raise AdapterLoadError(f"{path}: {arch}.{key} is {theirs}, the base model's {ours}: an adapter for "
                                   "another model")
    alpha = float(_field(reader, "adapter.lora.alpha") or 0.0)
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        m = _NAME.fullmatch(t.name)
        if m is None or m.group(2) not in GGUF_MODULES:
            raise AdapterLoadError(f"{path}: tensor {t.name!r} is not supported: only the lora_a / lora_b of "
                                   f"{', '.join(GGUF_MODULES)} in blk.N can be adapted")
        found.setdefault((int(m.group(1)), GGUF_MODULES[m.group(2)]), {})[m.group(3)] = _tensor(path, t)
    modules = []
    for (layer, module), ab in sorted(found.items()):
        if set(ab) != {"a", "b"}:
            raise AdapterLoadError(f"{path}: blk.{layer}.{module}: needs both lora_a and lora_b")
        a, b = ab["a"], ab["b"]
        if arch in PERMUTED_ARCHS and module in ("q_proj", "k_proj"):
            b = _unpermute(b, shapes.num_heads if module == "q_proj" else shapes.num_kv_heads)
        rank = a.shape[0] if a.dim() == 2 else 0
        # llama.cpp: a file without alpha (or alpha 0) adds B A x unscaled.
        modules.append(AdapterModule(layer, module, a, b, alpha / rank if alpha and rank else 1.0))
    return modules


def _open(path: Path) -> Any:
    if not path.is_file():
        raise AdapterLoadError(f"{path}: no such adapter file")
    try:
        reader = open_whole_gguf(path)
    except Exception as exc:  # numpy/struct/ValueError on a truncated or foreign file
        raise AdapterLoadError(f"{path}: corrupt or truncated GGUF file: {exc}") from None
    return reader


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _tensor(path: Path, t: Any) -> torch.Tensor:
    """De-quantised to float32, in torch's dim order (the reverse of GGUF's)."""
    from gguf import quants

    if t.tensor_type.name not in _READABLE:
        raise AdapterLoadError(f"{path}: tensor {t.name!r} is {t.tensor_type.name}: LoRA tensors are read in "
                               f"{', '.join(_READABLE)} only")
    data = quants.dequantize(t.data, t.tensor_type)
    # A copy: the reader maps the file read-only.
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))))


def _unpermute(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's LlamaModel.permute on lora_b's output rows, as transformers undoes it
    on a base model's attn_q / attn_k. A B that does not split into heads is left as it is:
    the shape check then refuses it."""
    out = b.shape[0] if b.dim() == 2 else 0
    if not n_head or out % (2 * n_head):
        return b
    return b.reshape(n_head, out // n_head // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)
