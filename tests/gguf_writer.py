"""Write a tiny HF checkpoint as a GGUF file (what llama.cpp's converter produces, for the few
architectures the tests need), so that GGUF loading is tested on more than the one shipped file.

Tensor names come from gguf-py's own HF -> GGUF name map; the tokenizer is the first tokens of
another GGUF's byte-level BPE (`small_tokenizer`: a few hundred tokens keep transformers' GGUF
tokenizer conversion, which walks every token and merge in Python, fast). Each 2-D weight is
stored in the quantisation type `qtypes` assigns it (gguf-py quantises Q8_0, Q4_0/1, Q5_0/1, F16,
BF16; it has no K-quant quantiser), norms and 1-D tensors in F32.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# HF model_type -> gguf-py architecture name.
_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rotary halves in attn_q / attn_k (transformers'
    GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class TokenizerFields:
    """GGUF tokenizer.* metadata: key -> (value, GGUFValueType, array item type or None)."""
    fields: dict[str, tuple[Any, Any, Any]]


def small_tokenizer(source_gguf: Path, vocab_size: int) -> TokenizerFields:
    """The first `vocab_size` tokens of `source_gguf`'s BPE vocabulary and the merges that build
    them (byte-level BPE numbers merge i's result after the byte tokens, so a prefix of the merges
    only makes tokens of the prefix), plus its other tokenizer settings."""
    import gguf

    reader = gguf.GGUFReader(str(source_gguf))
    fields: dict[str, tuple[Any, Any, Any]] = {}
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer.") or name == "tokenizer.chat_template":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields[name] = (field.contents(), vtype, sub)
    tokens = fields["tokenizer.ggml.tokens"][0][:vocab_size]
    known = set(tokens)
    merges = []
    for merge in fields["tokenizer.ggml.merges"][0]:
        if merge.replace(" ", "", 1) not in known:
            break
        merges.append(merge)
    fields["tokenizer.ggml.tokens"] = (tokens, *fields["tokenizer.ggml.tokens"][1:])
    fields["tokenizer.ggml.token_type"] = (fields["tokenizer.ggml.token_type"][0][:vocab_size],
                                           *fields["tokenizer.ggml.token_type"][1:])
    fields["tokenizer.ggml.merges"] = (merges, *fields["tokenizer.ggml.merges"][1:])
    return TokenizerFields(fields)


def write_gguf(hf_dir: Path, out: Path, tokenizer: TokenizerFields, qtype_of: Callable[[str], str]) -> Path:
    """`qtype_of(gguf_tensor_name)` -> a GGMLQuantizationType name for each 2-D tensor."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    model_type = cfg["model_type"]
    arch = _GGUF_ARCH[model_type]
    n_layers, heads, kv_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name("tiny " + model_type)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg["vocab_size"])

    for name, (value, vtype, sub) in tokenizer.fields.items():
        writer.add_key_value(name, value, vtype, sub_type=sub)

    name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    weights = load_file(str(hf_dir / "model.safetensors"))
    for hf_name, tensor in weights.items():
        data = tensor.to(torch.float32).numpy()
        if model_type == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            data = _llama_permute(data, heads if "q_proj" in hf_name else kv_heads)
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        _add(writer, gguf_name, data, qtype_of)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add(writer, name: str, data: np.ndarray, qtype_of: Callable[[str], str]) -> None:
    import gguf
    from gguf import GGMLQuantizationType as Q

    qtype = Q[qtype_of(name)] if data.ndim >= 2 else Q.F32
    if qtype == Q.F32:
        writer.add_tensor(name, data.astype(np.float32))
        return
    packed = gguf.quants.quantize(data.astype(np.float32), qtype)
    writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
