"""make bench BENCH=spec_bound: the most speculation could gain on this machine, whatever chooses k.

The speculative suite measures what adaptive k gets; this one asks what *any* draft-length
policy could get from the same proposers, to tell a weak policy from a wall. For each unguided
workload of the speculative suite (copy, chat) it decodes every prompt plainly (greedy), then
replays the output against each proposer with an oracle that knows the output: at each step it
drafts exactly the tokens that will be accepted (none when the first would be rejected), so
every verify row pays and none is wasted. The step costs are the engine's own start-up
measurement of a lone sequence's steps by row count (`Speculator.calibrate`). Two bounds per
proposer, both on decode time alone (no prefill, no proposer or Python cost):
- `bound_speedup`: plain decoding's time / the oracle's, with this machine's cost per row count;
- `bound_speedup_free_rows`: the same if verify rows cost nothing over a one-row step (a GPU at
  small batch): tokens per step. The gap between the two is what the CPU's rows cost.
Suffix decoding replays the prompts in order, each output joining the shared store after its
prompt (as a finished request's does), so later prompts can draft from earlier outputs.

Usage: python -m bench spec_bound [--model PATH] [--max-tokens 96] [--k 8]
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from bench.common import print_table, write_results
from bench.speculative import workloads
from decoding.sampling import SamplingParams
from decoding.speculative import NgramProposer, ProposeContext, SuffixProposer
from service.llm import LLM

Propose = Callable[[str, list[int], int, int], list[int]]


def replay(prompt: Sequence[int], out: Sequence[int], propose: Propose, rid: str, k: int,
           cost: Callable[[int], float]) -> tuple[float, int]:
    """The oracle's decode time and steps for `out` after `prompt`: each step verifies the draft's
    accepted prefix (cut where the output has no room left for the bonus token)."""
    seq = list(prompt) + list(out)
    n0, i, seconds, steps = len(prompt), 0, 0.0, 0
    while i < len(out):
        draft = propose(rid, seq[:n0 + i], n0, min(k, len(out) - i - 1))
        a = 0
        while a < len(draft) and draft[a] == out[i + a]:
            a += 1
        seconds += cost(a + 1)
        steps += 1
        i += a + 1
    return seconds, steps


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench spec_bound")
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=8, help="the most draft tokens per step")
    a = ap.parse_args(argv)
    llm = LLM(a.model, speculative_method="ngram", num_speculative_tokens=a.k, progress=False, kv_cache_gb=0.5,
              enable_prefix_caching=False)
    table = llm.engine.spec.cost.table()
    cost = table.__getitem__
    rows: list[dict] = []
    ratios: dict[str, float] = {}
    for workload, tasks in workloads(llm.engine.tokenizer).items():
        if any(g is not None for _, g in tasks):
            continue   # guided: forced tokens change what a step costs; not replayed here
        outs = [llm.generate([p], SamplingParams(temperature=0, max_tokens=a.max_tokens, num_speculative_tokens=0))[0]
                .outputs[0].token_ids for p, _ in tasks]
        ngram, suffix = NgramProposer(a.k), SuffixProposer(a.k)
        proposers: dict[str, Propose] = {
            "ngram": lambda rid, toks, n0, k: ngram.propose_one(rid, toks, k),
            "suffix": lambda rid, toks, n0, k: suffix.draft([ProposeContext(rid, toks, n0, k)])[0].tokens,
        }
        tokens = sum(len(o) for o in outs)
        plain = tokens * cost(1)
        for name, propose in proposers.items():
            seconds = steps = 0
            for j, ((prompt, _), out) in enumerate(zip(tasks, outs)):
                s, n = replay(prompt, out, propose, f"{workload}-{j}", a.k, cost)
                seconds, steps = seconds + s, steps + n
                if name == "suffix":
                    suffix.complete(f"{workload}-{j}", list(prompt) + list(out), len(prompt), "")
                    suffix.free(f"{workload}-{j}")
            rows.append({"workload": workload, "proposer": f"{name} oracle k<={a.k}", "tokens": tokens,
                         "bound_speedup": plain / seconds, "bound_speedup_free_rows": tokens / steps,
                         "tokens_per_step": tokens / steps})
            ratios[f"{name}_bound_c1_{workload}"] = plain / seconds
            ratios[f"{name}_bound_free_rows_c1_{workload}"] = tokens / steps
    print_table(rows)
    print({r: round(1000 * t, 2) for r, t in table.items()})
    workload_desc = {"workloads": "the speculative suite's copy and chat prompts (unguided), greedy, c1",
                     "max_tokens": a.max_tokens, "k": a.k, "dtype": llm.engine.config.dtype,
                     "step_ms_by_rows": {r: round(1000 * t, 3) for r, t in table.items()},
                     "oracle": "drafts exactly the tokens that will be accepted (none if the first would not be)",
                     "counts": "decode time only: no prefill, no proposer or Python cost"}
    cmd = "make bench BENCH=spec_bound" + (f" ARGS='{' '.join(argv)}'" if argv else "")
    print("wrote", write_results("spec_bound", workload_desc, rows, ratios, cmd))
    return 0
