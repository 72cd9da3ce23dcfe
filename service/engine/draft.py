"""The draft-model proposer: a smaller model with the target's tokenizer drafts k tokens per step.

It has its own paged KV (a `KVCacheManager` and `ModelRunner` of its own, as many blocks as the
target) and runs inside the engine's step: one catch-up forward over the tokens it has not seen
(usually the 1-2 tokens committed last step; a whole prompt the first time), then k-1
single-token forwards over the whole speculating batch. Each draft step chooses the way the
target will verify: greedy requests take the argmax (q one-hot), sampled ones draw from the
same processed distribution the target uses (penalties, temperature, top-k/p, min-p), so the
rejection sampler keeps the target's distribution exactly. Guided requests draft under their
grammar's mask, and keep each position's mask for the verification.

It is never told how many drafts were accepted: its KV at a position stays valid only while
the token it fed there equals the committed token, which it checks at the next call.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
import torch

from decoding.sampling import SampleRequest, probs_for
from decoding.speculative import Draft, ProposeContext, Proposer
from kernels.mask import apply_token_bitmask_
from common.errors import ModelLoadError
from service.config import EngineConfig
from service.engine.kv_cache import KVCacheManager
from service.engine.runner import ModelRunner
from service.engine.step import SeqInput
from service.loader import load_model
from service.models.bf16_packed import load_dtype
from service.models.build import build_model
from service.tokenizer import Tokenizer


@dataclass(slots=True)
class _Seq:
    """A request as the draft model sees it: its own tokens and KV progress."""
    request_id: str
    token_ids: list[int] = field(default_factory=list)   # committed tokens + drafts fed
    num_computed_tokens: int = 0                           # draft KV valid up to here
    num_committed: int = 0                                 # len of the committed part at the last call
    cache_salt: str = ""
    block_hashes: list[bytes] = field(default_factory=list)   # its committed blocks' chained hashes
    num_registered_blocks: int = 0                            # of its blocks, those in the draft's prefix cache

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class DraftModelProposer(Proposer):
    deterministic = False
    cheap = False

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 device: torch.device, vocab_size: int, bitmask_words: int, eos_token_ids: Sequence[int],
                 token_budget: int, enable_prefix_caching: bool = True) -> None:
        # Its own prefix cache: a prompt prefix the draft has computed for one request is reused by
        # the next, exactly as the target's is (same hashes, its own blocks).
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.runner = ModelRunner(model, self.kv, num_blocks, block_size, kv_dtype, device)
        self.num_blocks = num_blocks
        self.vocab_size = vocab_size          # the target's: q rows and masks are this wide
        self.words = bitmask_words
        self.eos = frozenset(eos_token_ids)
        self.budget = token_budget
        self._seqs: dict[str, _Seq] = {}

    @classmethod
    def load(cls, path: str | None, *, config: EngineConfig, device: torch.device, num_blocks: int,
             tokenizer: Tokenizer, vocab_size: int, bitmask_words: int) -> DraftModelProposer:
        """Load the draft model at `path` for a target with this tokenizer, vocabulary and pool size."""
        dtype = config.torch_dtype()   # the target's (what `--dtype auto` resolved to)
        loaded = load_model(path, dtype=load_dtype(device, dtype), progress=config.progress)
        check_same_tokenizer(tokenizer, loaded.tokenizer)
        model, _ = build_model(loaded, device, dtype)
        # The KV cache as the target's: bf16 blocks for bf16 weights unless --kv-cache-dtype says otherwise.
        return cls(model, num_blocks, config.block_size, config.kv_torch_dtype(dtype), device, vocab_size,
                   bitmask_words, tokenizer.eos_token_ids, config.max_num_batched_tokens, config.enable_prefix_caching)

    def pool_is_whole(self) -> bool:
        return self.kv.num_free_blocks == self.num_blocks

    # ---- Proposer ------------------------------------------------------------------------------

    def propose(self, contexts: Sequence[ProposeContext]) -> list[list[int]]:
        return [d.tokens for d in self.draft(contexts)]

    def draft(self, contexts: Sequence[ProposeContext]) -> list[Draft]:
        drafts: list[list[int]] = [[] for _ in contexts]
        probs: list[list[torch.Tensor]] = [[] for _ in contexts]
        masks: list[torch.Tensor | None] = [None] * len(contexts)
        advanced = [0] * len(contexts)
        live = [i for i, c in enumerate(contexts) if c.k > 0 and self._sync(c)]
        for i in live:
            if contexts[i].guide is not None:
                masks[i] = torch.full((contexts[i].k + 1, self.words), -1, dtype=torch.int32)
        try:
            logits = self._catch_up(live, contexts)
            while live:
                keep = []
                for row, tok, q in self._choose(logits, live, contexts, drafts, masks):
                    i, ctx = live[row], contexts[live[row]]
                    if tok is None:
                        continue            # the grammar allows nothing here: stop drafting
                    drafts[i].append(tok)
                    if q is not None:
                        probs[i].append(q)
                    if tok in self.eos:
                        continue            # the request would end here: nothing to draft after it
                    if ctx.guide is not None:
                        if not ctx.guide.advance(tok):
                            drafts[i].pop()     # the mask allowed it, so this should not happen
                            if q is not None:
                                probs[i].pop()
                            continue
                        advanced[i] += 1
                    if len(drafts[i]) < ctx.k:
                        self._seqs[ctx.request_id].token_ids.append(tok)   # fed next forward
                        keep.append(i)
                    elif ctx.guide is not None:
                        ctx.guide.fill_bitmask(masks[i][len(drafts[i])])   # the bonus position's mask
                live = keep
                if live:
                    logits = self._forward_last(live, contexts)
        finally:
            for i, c in enumerate(contexts):
                if advanced[i]:
                    c.guide.rollback(advanced[i])
        out = []
        for i in range(len(contexts)):
            n = len(drafts[i])
            q = torch.stack(probs[i]) if probs[i] else None
            bitmask = None if masks[i] is None or not n else masks[i][: n + 1]
            if bitmask is not None and drafts[i][-1] in self.eos:
                bitmask[n].fill_(-1)     # nothing is sampled after an accepted EOS
            out.append(Draft(drafts[i], q, bitmask))
        return out

    def _choose(self, logits: torch.Tensor, live: list[int], contexts: Sequence[ProposeContext],
                drafts: list[list[int]], masks: list[torch.Tensor | None]):
        """Per live row: (row, token or None, q row or None) — the next draft token and, for a
        sampled request, the distribution it was drawn from."""
        logits = self._fit(logits)
        guided = [r for r, i in enumerate(live) if contexts[i].guide is not None]
        if guided:
            m = torch.full((len(live), self.words), -1, dtype=torch.int32)
            for r in guided:
                i = live[r]
                contexts[i].guide.fill_bitmask(masks[i][len(drafts[i])])
                m[r] = masks[i][len(drafts[i])]
            apply_token_bitmask_(logits, m, torch.tensor(guided, dtype=torch.long))
        ok = torch.isfinite(logits).any(dim=1).tolist()
        greedy = [r for r, i in enumerate(live) if ok[r] and contexts[i].params.greedy]
        sampled = [r for r, i in enumerate(live) if ok[r] and not contexts[i].params.greedy]
        if greedy:
            best = logits[greedy].argmax(dim=1).tolist()
            yield from ((r, t, None) for r, t in zip(greedy, best))
        if sampled:
            reqs = []
            for r in sampled:
                c = contexts[live[r]]
                reqs.append(SampleRequest(c.params, c.token_ids[: c.num_prompt_tokens],
                                          list(c.output_ids) + drafts[live[r]]))
            q = probs_for(logits[sampled], reqs)
            for j, r in enumerate(sampled):
                tok = int(torch.multinomial(q[j], 1, generator=contexts[live[r]].generator))
                yield r, tok, q[j]
        yield from ((r, None, None) for r in range(len(live)) if not ok[r])

    def _fit(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits to the target's vocabulary width (embedding tables may be padded differently)."""
        v = logits.shape[1]
        if v == self.vocab_size:
            return logits.clone()
        if v > self.vocab_size:
            return logits[:, : self.vocab_size].clone()
        pad = logits.new_full((logits.shape[0], self.vocab_size - v), float("-inf"))
        return torch.cat([logits, pad], dim=1)

    def free(self, request_id: str) -> None:
        self._seqs.pop(request_id, None)
        self.kv.free(request_id)

    def reset(self) -> None:
        for rid in list(self._seqs):
            self.free(rid)

    # ---- internals -----------------------------------------------------------------------------

    def _sync(self, ctx: ProposeContext) -> bool:
        """Bring a request's draft state up to its committed tokens; False if its KV cannot fit."""
        seq = self._seqs.get(ctx.request_id)
        committed = ctx.token_ids
        if seq is None:
            return self._start(ctx)
        # Positions < num_committed were committed last time and cannot have changed; of the
        # drafts fed after them, those equal to what was committed since keep their KV.
        valid = min(seq.num_committed, seq.num_computed_tokens)
        while valid < seq.num_computed_tokens and valid < len(committed) and seq.token_ids[valid] == committed[valid]:
            valid += 1
        seq.token_ids = list(committed)
        seq.num_committed = len(committed)
        seq.num_computed_tokens = min(valid, len(committed) - 1)   # the last token is always fed
        # Room for the catch-up and k-1 drafts fed; a draft that does not fit is skipped, never preempts.
        if not self.kv.allocate(ctx.request_id, len(committed) + ctx.k - 1):
            return False
        # Every position below num_computed holds a committed token's KV: its full blocks may be shared.
        seq.num_registered_blocks = self.kv.cache_full_blocks(
            seq.request_id, seq.token_ids, seq.num_computed_tokens, seq.block_hashes,
            seq.num_registered_blocks, seq.cache_salt)
        return True

    def _start(self, ctx: ProposeContext) -> bool:
        """First sight of a request: start from the longest prefix in the draft's prefix cache."""
        seq = _Seq(ctx.request_id, list(ctx.token_ids), cache_salt=ctx.cache_salt)
        cached = self.kv.cached_prefix(seq.token_ids, seq.block_hashes, seq.cache_salt)
        if not self.kv.allocate(seq.request_id, seq.num_tokens + ctx.k - 1, cached):
            return False
        self.kv.record_lookup(seq.num_tokens, len(cached) * self.kv.block_size)
        seq.num_computed_tokens = len(cached) * self.kv.block_size
        seq.num_committed = seq.num_tokens
        seq.num_registered_blocks = len(cached)
        self._seqs[seq.request_id] = seq
        return True

    def _execute(self, seqs: list[_Seq], counts: list[int]) -> list[torch.Tensor | None]:
        """Forward each seq's next `counts` tokens; per seq, the next position's logits row if
        that reached its last token (None for a chunk mid-way)."""
        inputs = []
        for s, n in zip(seqs, counts):
            start = s.num_computed_tokens
            inputs.append(SeqInput(s.request_id, s.token_ids[start:start + n], start,
                                   1 if start + n == s.num_tokens else 0))
        out = self.runner.run(inputs)
        for s, n in zip(seqs, counts):
            s.num_computed_tokens += n
        return [out.logits[out.layout.first[j]] if out.layout.count[j] else None for j in range(len(seqs))]

    def _forward_last(self, live: list[int], contexts: Sequence[ProposeContext]) -> torch.Tensor:
        """Feed each live request's newest draft token; next-position logits in `live` order."""
        seqs = [self._seqs[contexts[i].request_id] for i in live]
        return torch.stack(self._execute(seqs, [1] * len(seqs)))

    def _catch_up(self, live: list[int], contexts: Sequence[ProposeContext]) -> torch.Tensor:
        """Forward every live request's unseen tokens (in chunks under the token budget); returns
        the logits of the next position for each, rows in `live` order."""
        rows: dict[int, torch.Tensor] = {}
        todo = list(live)
        while todo:
            chosen, seqs, counts, budget = [], [], [], self.budget
            for i in todo:
                seq = self._seqs[contexts[i].request_id]
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if n <= 0:
                    break
                chosen.append(i)
                seqs.append(seq)
                counts.append(n)
                budget -= n
            for i, row in zip(chosen, self._execute(seqs, counts)):
                if row is not None:
                    rows[i] = row
                    todo.remove(i)
        return torch.stack([rows[i] for i in live]) if live else torch.empty(0)


def check_same_tokenizer(target, draft) -> None:
    """A draft's tokens are verified as the target's ids: the vocabularies must be the same."""
    tv, dv = target.hf.get_vocab(), draft.hf.get_vocab()
    if tv != dv:
        diff = len(set(tv.items()) ^ set(dv.items()))
        raise ModelLoadError(f"draft model's tokenizer differs from the target's: vocabularies of {len(tv)} and "
                             f"{len(dv)} tokens, {diff} (token, id) pairs not shared")
    if set(target.eos_token_ids) != set(draft.eos_token_ids):
        raise ModelLoadError(f"draft model's tokenizer differs from the target's: EOS ids "
                             f"{list(draft.eos_token_ids)} vs {list(target.eos_token_ids)}")
