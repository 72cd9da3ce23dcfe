"""DecoderEmbedder: a generation model as an embedder (service/engine/embedder.py). Each input is a
prefill-only request on the model's own engine, scheduled beside generation under the same token
budget (AsyncEngine.embed); the final hidden states (after the last norm) are pooled: the last
token's (the default, as decoder embedding models are trained) or the mean over the input."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from service.engine.async_engine import AsyncEngine


class DecoderEmbedder:
    def __init__(self, engine: AsyncEngine, pooling: str = "last") -> None:
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be last or mean, got {pooling!r}")
        core = engine.core
        self.engine = engine
        self.pooling = pooling
        self.normalize = True
        self.name = core.model_name
        self.architecture = (getattr(core.loaded.config, "architectures", None) or [""])[0]
        self.dimension = int(core.loaded.config.hidden_size)
        self.vocab_size = core.vocab_size
        self.max_input_tokens = core.max_model_len
        self.tokenizer = core.tokenizer
        self.device = core.device
        self.dtype = core.config.torch_dtype()

    def tokenize(self, texts: Sequence[str], truncate: bool) -> list[list[int]]:
        """As Generate tokenizes text (the model's BOS added); `truncate` keeps the first tokens."""
        ids = [self.tokenizer.encode(t) for t in texts]
        return [s[: self.max_input_tokens] for s in ids] if truncate else ids

    async def embed(self, seqs: Sequence[Sequence[int]], request_id: str = "") -> torch.Tensor:
        return await self.engine.embed([list(s) for s in seqs], self.pooling, request_id or None)
