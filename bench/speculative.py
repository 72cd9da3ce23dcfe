"""make bench BENCH=speculative: single-stream speed with and without speculative decoding.

Two workloads on the default model (chat template, greedy, 128 new tokens):
- copy: the answer copies the input (JSON re-formatting, code edits, extraction, quoting);
- chat: free-form questions.
For each prompt the same engine decodes without speculation, with n-gram prompt lookup, and —
unless --no-draft — with a draft model (by default the target itself: the most a draft can
accept, at the cost of a second model's forwards, which is what a draft costs on a CPU without
a smaller model of the same tokenizer). Runs interleave per prompt; each ratio is total time
without / total time with, over the prompts of a workload. Outputs must be identical (greedy):
the suite reports how many were.

Usage: python -m bench speculative [--model PATH] [--draft-model PATH] [--k 4] [--max-tokens 128]
"""
from __future__ import annotations

import argparse
import time

from bench.common import median, print_table, write_results
from decoding.sampling import SamplingParams
from service.llm import LLM
from service.loader import load_model

COPY_TASKS = [
    "Reformat this JSON with one key per line and keys in the same order:\n"
    '{"id": 4821, "name": "Ada Lovelace", "email": "ada@example.com", "roles": ["admin", "editor"], '
    '"address": {"street": "12 Loom Lane", "city": "London", "zip": "N1 9GU"}, "active": true}',
    "Rename the variable `total` to `sum_of_items` in this code and return the whole code:\n"
    "def add_all(items):\n    total = 0\n    for item in items:\n        total = total + item\n"
    "    return total\n\n\ndef average(items):\n    total = add_all(items)\n    return total / len(items)\n",
    "Extract every sentence that mentions the loom, word for word:\n"
    "The history of weaving goes back thousands of years. Early looms were simple frames. "
    "The Jacquard loom read patterns from punched cards. Punched cards later stored programs. "
    "The flying shuttle made the loom faster. Weavers still use the words warp and weft.",
    "Copy this list exactly, then add one more fruit at the end:\n"
    "1. apples\n2. pears\n3. plums\n4. cherries\n5. grapes\n6. melons\n7. lemons\n8. limes\n9. figs\n10. dates",
    "Fix the spelling mistakes and return the corrected text in full:\n"
    "The quik brown fox jumpd over the lazzy dog. The dog was not amused, and it barkd at the fox "
    "untill the fox ran back into the forrest behind the old farm house.",
    "Convert this CSV to a JSON array of objects:\nname,age,city\nAlice,31,Paris\nBob,25,Berlin\n"
    "Carol,40,Rome\nDave,35,Madrid",
]

CHAT_TASKS = [
    "What are three good habits for staying healthy?",
    "Write a short poem about the sea.",
    "Explain what a computer network is to a child.",
    "Give me some ideas for a weekend trip.",
    "Why is the sky blue?",
    "Tell me a short story about a brave cat.",
]


def _prompt(tok, task: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": task}]), add_special_tokens=False)


def _run(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[float, list[int], dict | None]:
    t0 = time.perf_counter()
    out = llm.generate([prompt], params)[0].outputs[0]
    return time.perf_counter() - t0, out.token_ids, out.spec


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench speculative")
    ap.add_argument("--model", default=None)
    ap.add_argument("--draft-model", default=None, help="default: the target itself")
    ap.add_argument("--no-draft", action="store_true", help="skip the draft-model runs")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--k", type=int, default=4, help="k of the headline ratios (the server's default)")
    ap.add_argument("--extra-k", default="2", help="comma list of other n-gram k to run alongside (rows only)")
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args(argv)

    common = dict(dtype=a.dtype, kv_cache_gb=0.5, progress=False, spec_disable_window=0)
    engines = {"ngram": LLM(a.model, speculative_method="ngram", num_speculative_tokens=a.k, **common)}
    tok = engines["ngram"].engine.tokenizer
    extra = [int(k) for k in a.extra_k.split(",") if k.strip() and int(k) != a.k]
    if not a.no_draft:
        draft = a.draft_model or str(load_model(a.model, progress=False).source)
        engines["draft"] = LLM(a.model, speculative_method="draft", draft_model=draft,
                               num_speculative_tokens=a.k, **common)
    off = SamplingParams(temperature=0, max_tokens=a.max_tokens, num_speculative_tokens=0)
    on = SamplingParams(temperature=0, max_tokens=a.max_tokens)
    # Other k: the same n-gram engine, k set per request.
    variants = {"ngram": (engines["ngram"], on)} | {
        f"ngram_k{k}": (engines["ngram"], SamplingParams(temperature=0, max_tokens=a.max_tokens, num_speculative_tokens=k))
        for k in extra}
    if "draft" in engines:
        variants["draft"] = (engines["draft"], on)
    _run(engines["ngram"], _prompt(tok, "Hello"), off)   # warm-up: first-call allocations

    rows: list[dict] = []
    ratios: dict[str, float] = {}
    for workload, tasks in (("copy", COPY_TASKS), ("chat", CHAT_TASKS)):
        times: dict[str, list[float]] = {"off": []} | {m: [] for m in variants}
        tokens = 0
        identical = {m: 0 for m in variants}
        stats: dict[str, list[dict]] = {m: [] for m in variants}
        for task in tasks:
            prompt = _prompt(tok, task)
            # The plain run uses the n-gram engine with speculation off for the request: same
            # engine, same weights, so the difference is speculation alone.
            t_off, ids_off, _ = _run(engines["ngram"], prompt, off)
            times["off"].append(t_off)
            tokens += len(ids_off)
            for method, (llm, params) in variants.items():
                t, ids, spec = _run(llm, prompt, params)
                times[method].append(t)
                identical[method] += ids == ids_off
                stats[method].append(spec or {})
        total_off = sum(times["off"])
        rows.append({"workload": workload, "method": "none", "tok_per_s": tokens / total_off,
                     "ms_per_token": 1000 * total_off / tokens})
        for method in variants:
            drafted = sum(s.get("num_draft_tokens", 0) for s in stats[method])
            accepted = sum(s.get("num_accepted_tokens", 0) for s in stats[method])
            drafts = sum(s.get("num_drafts", 0) for s in stats[method])
            total = sum(times[method])
            rows.append({
                "workload": workload,
                "method": f"ngram k={method.removeprefix('ngram_k')}" if method.startswith("ngram_k") else f"{method} k={a.k}", "tok_per_s": tokens / total,
                "ms_per_token": 1000 * total / tokens, "speedup": total_off / total,
                "speedup_median_prompt": median([o / t for o, t in zip(times["off"], times[method])]),
                "acceptance_rate": accepted / drafted if drafted else 0.0,
                "mean_acceptance_length": 1 + accepted / drafts if drafts else 1.0,
                "identical_outputs": f"{identical[method]}/{len(tasks)}",
            })
        ratios[f"spec_speedup_c1_{workload}"] = total_off / sum(times["ngram"])
        if "draft" in engines:
            ratios[f"draft_speedup_c1_{workload}"] = total_off / sum(times["draft"])
    print_table(rows)
    print(ratios)
    workload_desc = {"copy_prompts": len(COPY_TASKS), "chat_prompts": len(CHAT_TASKS), "max_tokens": a.max_tokens,
                     "k": a.k, "greedy": True, "dtype": a.dtype, "concurrency": 1,
                     "draft_model": "target itself" if not a.draft_model else a.draft_model,
                     "spec_speedup": "n-gram proposer; draft_speedup: draft model"}
    print("wrote", write_results("speculative", workload_desc, rows, ratios, "make bench BENCH=speculative"))
    return 0
