"""What the server needs from a model that embeds: an embedding model on its own thread
(AsyncEncoder) or a generation model's engine running prefill-only requests (DecoderEmbedder)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from service.tokenizer import Tokenizer


class Embedder(Protocol):
    name: str                  # the model's own name (the server may serve it under another)
    architecture: str          # e.g. "BertModel", "LlamaForCausalLM"
    dimension: int             # components of a pooled vector
    vocab_size: int            # token ids are in [0, vocab_size)
    max_input_tokens: int      # the longest input, special tokens included
    normalize: bool            # L2-normalise unless a request says otherwise
    pooling: str               # "mean" | "cls" | "last"
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype

    def tokenize(self, texts: Sequence[str], truncate: bool) -> list[list[int]]:
        """Texts as the model tokenizes them; cut to max_input_tokens when `truncate`."""
        ...

    async def embed(self, seqs: Sequence[Sequence[int]], request_id: str) -> torch.Tensor:
        """Pooled vectors [len(seqs), dimension] (float32, CPU, not normalised) of valid token lists."""
        ...
