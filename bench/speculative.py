"""make bench BENCH=speculative: single-stream speed with and without speculative decoding.

Four workloads on the default model (chat template, greedy):
- copy: the answer copies the input (JSON re-formatting, code edits, extraction, quoting);
- chat: free-form questions;
- json: JSON generation under dev-set schemas (guided decoding; the schema is in the prompt);
- agent: the same tool-call shape over and over (an agent calling one tool for many inputs,
  under the call's JSON schema): what suffix decoding's store of earlier outputs is for.
For each prompt the same engine decodes without speculation, then each method: n-gram prompt
lookup and suffix decoding (both with adaptive k: the draft length each step is chosen from the
request's acceptance and the measured cost of a step per row count), n-gram with a fixed k, and
— unless --no-draft — a draft model (by default the target itself: the most a draft can accept,
at the cost of a second model's forwards). Runs interleave per prompt, each prompt `--repeats`
times (the engines' order reversed every other time), and a prompt's time is the median of its
runs: one pass moved ±4% pass to pass on a shared machine, more than the gains on chat. Each
repetition is its own tenant (cache salt), so suffix decoding's store of earlier outputs holds
that repetition's earlier prompts only, never the same prompt's output from a previous
repetition. Each ratio is total time without / total time with, over the prompts of a workload.
Outputs must be identical (greedy), in every repetition: the suite reports how many were.
Plain decoding of a guided request already appends the tokens its grammar forces without a
forward pass each (jump-forward: the grammar-aware drafts that need no proposer). For the guided
workloads (json, agent) a fifth engine decodes with that off, one token per forward as vLLM
does, and each method's `speedup_vs_one_token_per_step` is taken against it: what grammar-forced
drafts and a proposer give together. `speedup` stays against plain decoding with jump-forward.

Usage: python -m bench speculative [--model PATH] [--draft-model PATH] [--dtype auto] [--k 4] [--max-tokens 128]
       [--cached-prompts] [--suite-name speculative]
"""
from __future__ import annotations

import argparse
import json
import time

from bench.common import median, print_table, write_results
from bench.guided import load_dev
from decoding.guided import GuidedSpec
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


# Dev-set schemas for the json workload (small enough that 160 tokens finish a document).
JSON_SCHEMAS = ("Glaiveai2K---calculate", "Github_easy", "Kubernetes---kb", "Snowplow---sp", "WashingtonPost---wp",
                "JME")
CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Lisbon", "Vienna", "Prague", "Dublin"]
WEATHER_CALL = {"type": "object", "properties": {
    "name": {"const": "get_weather"},
    "arguments": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["city", "unit", "days"], "additionalProperties": False}},
    "required": ["name", "arguments"], "additionalProperties": False}


def _prompt(tok, task: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": task}]), add_special_tokens=False)


def workloads(tok) -> dict[str, list[tuple[list[int], GuidedSpec | None]]]:
    dev = load_dev()
    json_docs = []
    for prefix in JSON_SCHEMAS:
        name, doc = next((n, d) for n, d in dev if n.startswith(prefix))
        text = json.dumps(doc["schema"], separators=(",", ":"))[:1200]
        json_docs.append((_prompt(tok, f"Reply with a JSON value that is valid under this JSON Schema:\n{text}"),
                          GuidedSpec("json_schema", json.dumps(doc["schema"]))))
    tool = json.dumps({"name": "get_weather", "description": "Weather forecast for a city",
                       "parameters": WEATHER_CALL["properties"]["arguments"]})
    agent = [(_prompt(tok, f"You can call this tool: {tool}\nCall it as {{\"name\": ..., \"arguments\": ...}} "
                           f"for a {1 + i % 5}-day forecast in {city}."),
              GuidedSpec("json_schema", json.dumps(WEATHER_CALL))) for i, city in enumerate(CITIES)]
    return {"copy": [(_prompt(tok, t), None) for t in COPY_TASKS], "chat": [(_prompt(tok, t), None) for t in CHAT_TASKS],
            "json": json_docs, "agent": agent}


def _run(llm: LLM, prompt: list[int], params: SamplingParams, salt: str | None = None
         ) -> tuple[float, list[int], dict | None]:
    t0 = time.perf_counter()
    out = llm.generate([prompt], params, cache_salt=salt)[0].outputs[0]
    return time.perf_counter() - t0, out.token_ids, out.spec


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench speculative")
    ap.add_argument("--model", default=None)
    ap.add_argument("--draft-model", default=None, help="default: the target itself")
    ap.add_argument("--no-draft", action="store_true", help="skip the draft-model runs")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: what weft serve runs (bfloat16 prefill where bf16 GEMM is faster on this CPU)")
    ap.add_argument("--k", type=int, default=8, help="the most draft tokens per step (adaptive k picks fewer)")
    ap.add_argument("--fixed-k", type=int, default=4, help="k of the fixed-k n-gram row (the old default)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each prompt per engine (the median counts)")
    ap.add_argument("--cached-prompts", action="store_true",
                    help="prefix caching on, every prompt cached in every engine before it is timed: what a "
                         "client that resends the same prompt (an agent's tools and instructions) gets")
    ap.add_argument("--suite-name", default="speculative", help="results file name (bench/results/<name>.json)")
    a = ap.parse_args(argv)

    # Prefix caching off by default: the plain run and the n-gram run share an engine, and a
    # cached prompt would make the second run of each prompt look faster for a reason that is not
    # speculation. With --cached-prompts every run of a prompt, plain or not, finds it cached.
    common = dict(dtype=a.dtype, kv_cache_gb=0.5, progress=False, spec_disable_window=0,
                  enable_prefix_caching=a.cached_prompts)
    # Plain decoding, one token per forward (no jump-forward), for the guided workloads only: for
    # the others it is plain decoding itself.
    one_each = LLM(a.model, guided_jump_forward=False, **common)
    engines = {"ngram": LLM(a.model, speculative_method="ngram", num_speculative_tokens=a.k, **common),
               "suffix": LLM(a.model, speculative_method="suffix", num_speculative_tokens=a.k, **common),
               "ngram_fixed": LLM(a.model, speculative_method="ngram", num_speculative_tokens=a.fixed_k,
                                  spec_adaptive_k=False, **common)}
    tok = engines["ngram"].engine.tokenizer
    if not a.no_draft:
        draft = a.draft_model or str(load_model(a.model, progress=False).source)
        engines["draft"] = LLM(a.model, speculative_method="draft", draft_model=draft,
                               num_speculative_tokens=a.fixed_k, **common)
    labels = {"ngram": f"ngram adaptive k<={a.k}", "suffix": f"suffix adaptive k<={a.k}",
              "ngram_fixed": f"ngram fixed k={a.fixed_k}", "draft": f"draft (target) adaptive k<={a.fixed_k}"}

    def params(guided: GuidedSpec | None, spec: bool) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=a.max_tokens, guided=guided,
                              num_speculative_tokens=None if spec else 0)

    # Warm-up, the same in every engine: first-call allocations, and, with prefix caching, the
    # same cached chat-template block everywhere. A block's KV is that of the step that computed
    # it (a short step's packed float32 products or a long prefill's GEMM, equal only within
    # rounding), so engines whose caches were filled differently may decode differently — for a
    # reason that is not speculation (seen as 5/6 identical copy outputs in the cached run).
    # A guided request too: an engine's first grammar compile sets its compiler up (~0.5 s), which
    # the first guided run timed would otherwise pay.
    warm_guide = GuidedSpec("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    for llm in [*engines.values(), one_each]:
        _run(llm, _prompt(tok, "Hello"), params(None, False))
        _run(llm, _prompt(tok, "Hello"), params(warm_guide, False))
    rows: list[dict] = []
    ratios: dict[str, float] = {}
    for workload, tasks in workloads(tok).items():
        times: dict[str, list[float]] = {"off": [], "one_each": []} | {m: [] for m in engines}
        tokens = 0
        identical = {m: 0 for m in engines} | {"one_each": 0}
        guided_workload = any(g is not None for _, g in tasks)
        stats: dict[str, list[dict]] = {m: [] for m in engines}
        for prompt, guided in tasks:
            # The plain run uses the n-gram engine with speculation off for the request: same
            # engine, same weights, so the difference is speculation alone.
            arms = [("off", engines["ngram"], False)] + ([("one_each", one_each, False)] if guided_workload else [])
            arms += [(method, llm, True) for method, llm in engines.items()]
            runs: dict[str, list[tuple[float, list[int], dict | None]]] = {name: [] for name, _, _ in arms}
            for r in range(a.repeats):
                salt = f"repeat-{r}"
                if a.cached_prompts:   # one token each, unguided and plain: the prompt's blocks are cached
                    for llm in [*engines.values(), one_each] if guided_workload else engines.values():
                        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, num_speculative_tokens=0),
                                     cache_salt=salt)
                for name, llm, spec in arms if r % 2 == 0 else arms[::-1]:
                    runs[name].append(_run(llm, prompt, params(guided, spec), salt))
            ids_off = runs["off"][0][1]
            tokens += len(ids_off)
            for name, results in runs.items():
                times[name].append(median([t for t, _, _ in results]))
                if name != "off":
                    identical[name] += all(ids == ids_off for _, ids, _ in results)
                if name in stats:
                    stats[name].extend(spec or {} for _, _, spec in results)
        total_off = sum(times["off"])
        total_one = sum(times["one_each"])
        if guided_workload:
            rows.append({"workload": workload, "method": "none, one token per forward (no jump-forward)",
                         "tok_per_s": tokens / total_one, "ms_per_token": 1000 * total_one / tokens,
                         "identical_outputs": f"{identical['one_each']}/{len(tasks)}"})
            ratios[f"jump_forward_speedup_c1_{workload}"] = total_one / total_off
        rows.append({"workload": workload, "method": "none" + (" (jump-forward)" if guided_workload else ""),
                     "tok_per_s": tokens / total_off, "ms_per_token": 1000 * total_off / tokens})
        if guided_workload:
            rows[-1]["speedup_vs_one_token_per_step"] = total_one / total_off
        for method in engines:
            drafted = sum(s.get("num_draft_tokens", 0) for s in stats[method])
            accepted = sum(s.get("num_accepted_tokens", 0) for s in stats[method])
            drafts = sum(s.get("num_drafts", 0) for s in stats[method])
            total = sum(times[method])
            rows.append({
                "workload": workload, "method": labels[method], "tok_per_s": tokens / total,
                "ms_per_token": 1000 * total / tokens, "speedup": total_off / total,
                "speedup_median_prompt": median([o / t for o, t in zip(times["off"], times[method])]),
                "acceptance_rate": accepted / drafted if drafted else 0.0,
                "mean_acceptance_length": 1 + accepted / drafts if drafts else 1.0,
                "identical_outputs": f"{identical[method]}/{len(tasks)}",
            })
            ratios[f"{method}_speedup_c1_{workload}"] = total_off / total
            if guided_workload:
                rows[-1]["speedup_vs_one_token_per_step"] = total_one / total
                ratios[f"{method}_speedup_vs_one_token_per_step_c1_{workload}"] = total_one / total
        print_table(rows[-len(engines) - 1 - guided_workload:])
    print_table(rows)
    print(ratios)
    workload_desc = {"copy_prompts": len(COPY_TASKS), "chat_prompts": len(CHAT_TASKS), "json_schemas": JSON_SCHEMAS,
                     "agent_prompts": len(CITIES), "max_tokens": a.max_tokens, "k": a.k, "fixed_k": a.fixed_k,
                     "repeats": a.repeats, "timing": "each prompt's median over its repeats, summed per workload",
                     "greedy": True, "dtype": a.dtype if a.dtype != "auto" else f"auto: {engines['ngram'].engine.config.dtype}",
                     "concurrency": 1,
                     "prompts": ("prefix caching on, each prompt cached in every engine before its timed runs"
                                 if a.cached_prompts else "prefix caching off: every run prefills its whole prompt"),
                     "draft_model": "target itself" if not a.draft_model else a.draft_model,
                     "baselines": "speedup: against plain decoding, which appends grammar-forced tokens without a "
                                  "forward each (jump-forward); speedup_vs_one_token_per_step (json, agent): "
                                  "against plain decoding with jump-forward off (guided_jump_forward=False)"}
    cmd = "make bench BENCH=speculative" + (f" ARGS='{' '.join(argv)}'" if argv else "")
    print("wrote", write_results(a.suite_name, workload_desc, rows, ratios, cmd))
    return 0
