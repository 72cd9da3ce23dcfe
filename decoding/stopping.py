"""Per-sequence stopping and incremental detokenization.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas with vLLM's
prefix/read-offset window: each step decodes only the tokens since the last emitted text (plus
the group before it, for context), so a sequence costs O(n) decoding, not O(n^2). Text is
held back while it ends in U+FFFD, i.e. while the last tokens are an incomplete UTF-8 character
(byte-level BPE splits emoji and CJK characters across tokens).

`StopChecker` adds EOS / stop token ids / stop strings / max_tokens on top, holding back only
the text that could still become a stop string.

`tokenizer` is anything with `decode(ids, skip_special_tokens=...) -> str`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from decoding.sampling import SamplingParams

# Prompt tokens decoded as context in front of the output (vLLM's
# INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET): tokenizers that drop a word's leading space at
# the start of a decode (SentencePiece, Metaspace) then still give the first output word its space.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas; never emits a broken UTF-8 character (U+FFFD
    from a partial byte sequence) unless the sequence finishes on one (then `flush` emits it).

    For byte-level BPE tokenizers the concatenated deltas equal `decode(output_ids)`. For
    tokenizers that strip a leading space at the start of a decode, the first word keeps its
    space (as in vLLM), because the last prompt tokens are decoded as context.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = [int(t) for t in prompt_ids[-_CONTEXT_TOKENS:]]
        context_text = self._decode(context) if context else ""
        if context_text.endswith(_REPLACEMENT):
            # The prompt ends inside a character: slicing the decoded window at the context's
            # length would then cut through that character. Decode the output on its own.
            context, context_text = [], ""
        self._ids: list[int] = context          # context + output; only [prefix_offset:] is decoded
        self._prefix_offset = 0                 # start of the window decoded each step
        self._read_offset = len(context)        # end of the text already emitted
        self._prefix_text = context_text        # decode(ids[prefix_offset:read_offset])
        self._chunks: list[str] = []

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def step(self, token_id: int) -> str:
        """Add one token; return the text that became final."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """At finish: whatever is still held (an incomplete character decodes to U+FFFD here)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(self._prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            # Nothing new (e.g. a skipped special token) or a character still incomplete: wait.
            return ""
        delta = new_text[len(self._prefix_text):]
        # The next window starts at the tokens just emitted: they are its context.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        self._chunks.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""


class StopChecker:
    """Per-sequence stopping: EOS, stop token ids, stop strings (also across token boundaries), max_tokens.

    Precedence for one token: EOS, then stop token id, then stop string, then length. Among stop
    strings the one that is complete earliest in the text wins (ties: the one starting earlier),
    exactly as if the text were checked after every character; so the output never contains a
    whole stop string (unless `include_stop_str_in_output`, where it ends with the winning one).
    """

    def __init__(
        self, params: SamplingParams, tokenizer: Decoder, prompt_ids: Sequence[int], eos_token_ids: Sequence[int]
    ) -> None:
        self._params = params
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self._eos = frozenset() if params.ignore_eos else frozenset(int(t) for t in eos_token_ids)
        self._stop_ids = frozenset(int(t) for t in params.stop_token_ids)
        self._stops = tuple(params.stop)
        self._include_stop = params.include_stop_str_in_output
        # Emitted text a stop string could still start in: only with include_stop_str_in_output,
        # where nothing is held back (the cut lands after the stop string anyway).
        longest = max((len(s) for s in self._stops), default=1)
        self._tail_len = longest - 1 if self._include_stop else 0
        self._tail = ""
        self._pending = ""                     # decoded, not emitted: could begin a stop string
        self._chunks: list[str] = []
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """All emitted text."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def append(self, token_id: int) -> tuple[str, str | None]:
        """Feed one generated token; return (text safe to emit now, finish_reason or None)."""
        if self.finished:
            raise RuntimeError(f"sequence already finished ({self.finish_reason}); no more tokens")
        self.num_tokens += 1
        token_id = int(token_id)
        if token_id in self._eos:
            return self._finish("eos", None, self._flush_all())
        if token_id in self._stop_ids:
            return self._finish("stop", token_id, self._flush_all())
        new_text = self._detok.step(token_id)
        delta = self._check_stops(new_text) if self._stops else new_text
        if self.finished:
            return self._emit(delta), self.finish_reason
        if self.num_tokens >= self._params.max_tokens:
            return self._finish("length", None, delta + self._flush_all())
        return self._emit(delta), None

    def finish_complete(self) -> str:
        """Finish with "stop" although no stop condition matched (a guided output is complete and
        its grammar allows nothing more); returns the text still held, now safe to emit."""
        text, _ = self._finish("stop", None, self._flush_all())
        return text

    def _check_stops(self, new_text: str) -> str:
        """Look for a stop string ending in `new_text`; return what can be emitted now."""
        if not new_text:
            return ""
        window = self._tail + self._pending + new_text
        base = len(self._tail)                  # window index where unemitted text begins
        match = _earliest_stop(window, self._stops)
        if match is not None:
            start, end, stop = match
            cut = end if self._include_stop else start
            self.finish_reason, self.stop_reason = "stop", stop
            self._pending = ""
            return window[base:cut] if cut > base else ""
        unemitted = self._pending + new_text
        hold = 0 if self._include_stop else _stop_prefix_len(unemitted, self._stops)
        self._pending = unemitted[len(unemitted) - hold:] if hold else ""
        return unemitted[: len(unemitted) - hold]

    def _flush_all(self) -> str:
        """Everything still held: the detokenizer's incomplete bytes and the stop-string prefix.

        Text flushed here is not checked for stop strings (it only adds U+FFFD characters)."""
        held, self._pending = self._pending, ""
        return held + self._detok.flush()

    def _finish(self, reason: str, stop_reason: str | int | None, delta: str) -> tuple[str, str]:
        self.finish_reason, self.stop_reason = reason, stop_reason
        return self._emit(delta), reason

    def _emit(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
            if self._tail_len:
                self._tail = (self._tail + delta)[-self._tail_len:]
        return delta


def _earliest_stop(text: str, stops: Sequence[str]) -> tuple[int, int, str] | None:
    """(start, end, stop) of the stop string whose first occurrence ends earliest (then starts earliest)."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start < 0:
            continue
        end = start + len(stop)
        if best is None or (end, start) < (best[1], best[0]):
            best = (start, end, stop)
    return best


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        # Candidate suffixes start with stop[0]; try them longest first.
        lo = max(0, len(text) - len(stop) + 1)
        pos = text.find(stop[0], lo)
        while pos >= 0:
            if len(text) - pos <= longest:
                break
            if stop.startswith(text[pos:]):
                longest = len(text) - pos
                break
            pos = text.find(stop[0], pos + 1)
    return longest
