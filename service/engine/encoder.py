"""EncoderCore: an embedding model (BERT family) and what it takes to turn token lists into
pooled vectors: padding-free batches under a token budget, pooling as the model's
sentence-transformers config says. No KV cache, no scheduler: a batch runs whole, in one forward
per budget's worth of tokens. Thread-agnostic (AsyncEncoder gives it its own thread)."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from common.errors import ModelLoadError
from service.encoder_loader import LoadedEncoder
from service.models.bert import ENCODER_CLASSES, BertEncoder
from service.models.pooling import pool

log = logging.getLogger("weft.engine")

# Tokens of one forward: large enough that the projections run as big GEMMs, small enough that
# one forward (and the activations it holds) stays bounded whatever a request sends.
DEFAULT_MAX_BATCH_TOKENS = 8192


class EncoderCore:
    def __init__(self, loaded: LoadedEncoder, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> None:
        arch = (getattr(loaded.config, "architectures", None) or ["BertModel"])[0]
        cls = ENCODER_CLASSES.get(arch)
        if cls is None:
            raise ModelLoadError(f"unsupported encoder architecture {arch!r}; supported: {sorted(ENCODER_CLASSES)}")
        self.device = torch.device(device)
        self.dtype = dtype
        try:
            model: BertEncoder = cls(loaded.config)
            model.load_weights(loaded.weights)
        except ValueError as exc:
            raise ModelLoadError(f"{loaded.path}: {exc}") from exc
        self.model = model.to(device=self.device, dtype=dtype).eval()
        loaded.weights.clear()   # the model holds its own (fused) copies now
        self.loaded = loaded
        self.name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.architecture = arch
        self.pooling = loaded.pooling
        self.normalize = loaded.normalize
        self.dimension = int(loaded.config.hidden_size)
        self.vocab_size = int(loaded.config.vocab_size)
        self.max_input_tokens = min(loaded.max_seq_length, model.max_positions)
        self.max_batch_tokens = max(max_batch_tokens, self.max_input_tokens)

    def tokenize(self, texts: Sequence[str], truncate: bool) -> list[list[int]]:
        """Texts -> token ids with the model's special tokens ([CLS] ... [SEP]), the way
        sentence-transformers tokenizes them; with `truncate`, cut to max_input_tokens (the
        closing [SEP] kept), else as long as they are (the caller checks the length)."""
        if self.loaded.lowercase:
            texts = [t.lower() for t in texts]
        enc = self.tokenizer.hf(list(texts), add_special_tokens=True, truncation=truncate,
                                max_length=self.max_input_tokens if truncate else None)
        return [list(ids) for ids in enc["input_ids"]]

    def embed(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Pooled vectors [len(seqs), dimension] (float32, CPU, not normalised) of valid token lists,
        in forwards of at most max_batch_tokens tokens each."""
        out: list[torch.Tensor] = []
        start = 0
        while start < len(seqs):
            end, tokens = start, 0
            while end < len(seqs) and (end == start or tokens + len(seqs[end]) <= self.max_batch_tokens):
                tokens += len(seqs[end])
                end += 1
            out.append(self._forward(seqs[start:end]))
            start = end
        return torch.cat(out) if len(out) > 1 else out[0]

    def _forward(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        ids: list[int] = []
        positions: list[int] = []
        cu = [0]
        for s in seqs:
            ids.extend(s)
            positions.extend(range(len(s)))
            cu.append(cu[-1] + len(s))
        packed = torch.tensor(ids + positions, dtype=torch.long).to(self.device)
        ids_t, pos_t = packed.split([len(ids), len(ids)])
        hidden = self.model(ids_t, pos_t, cu)
        return pool(hidden, cu, self.pooling).cpu()
