"""make bench BENCH=guided: guided decoding on jsonschemabench-dev with the default model.

Six measurements, one results file (bench/results/guided.json):

1. Compile every dev-set schema three ways, in one run: Weft ("auto": the normaliser's exact
   rewrites in front of llguidance, then outlines-core), llguidance alone and outlines-core
   alone (the schema as sent, no normaliser): compiled / refused, with every refusal's reason
   counted by keyword; compile time p50/p99 over the schemas that compile (wall clock, and
   the process's CPU time p50: on a shared machine the wall clock includes waiting for a core).
2. Token-level conformance of each: each compiled schema's instances are serialised (compact
   separators, UTF-8) and tokenised with the model's tokenizer; a valid instance must be
   accepted token by token and be complete at the end, an invalid one must not. Objects are
   unordered and the backends write properties in the schema's order, so other key orders are
   searched when the instance's own is refused (bench/conformance.py; `reordered` counts the
   valid ones that needed it). Mask time per token (fill of one bitmask row) p50/p99.
   Then the official JSON-Schema-Test-Suite's Draft 2020-12 files, per keyword file
   (bench/guided_suite.py): schemas compiled / refused, instances accepted / rejected.
3. Throughput at concurrency 32, guided vs unguided, same prompts and same number of output
   tokens per request (max_tokens, EOS ignored; the constraints below never complete earlier):
   - json: `{"type":"array","items":{"type":"string"},"minItems":1000}` (jump-forward active),
   - regex: `[a-zA-Z ,.]+` (no forced tokens: the pure cost of masks; EOS is allowed, so a
     request may end early: tokens per second, not per request, are compared).
4. Closing without a model (--closing-seeds): a random-token "model" (uniform, preferring
   `{ [ ,`, or repeating itself) on every compiled schema must end complete within max_tokens
   (bench/guided_closing.py).
5. End to end: for every schema that "auto" compiles, generate (greedy, then sampled at
   temperature 1.0 with each of --seeds; chat template, the schema in the prompt, at most
   --max-tokens) at concurrency 32 and validate every output with `jsonschema` (formats
   checked). Outputs cut by max_tokens (finish_reason "length" and not valid) are counted apart
   as truncated; they are failures. The guides close outputs before
   max_tokens (GuidedSpec.close_before_max_tokens, on by default; --no-close turns it off);
   a schema whose shortest output does not fit max_tokens is refused by Weft with the length it
   needs, and retried with that much room plus 64 (counted as retried_max_tokens);
   "closed_by_budget" counts the outputs whose guide narrowed its mask to finish in time. On 2
   CPU cores the whole set takes longer than the default --budget-s; what has not finished by
   then is counted as not run.

Usage: python -m bench guided [--limit N] [--max-tokens 256] [--budget-s 900] [--seeds 1,2,3] [--sampled-budget-s S]
       [--closing-seeds 0,1] [--no-close] [--skip-e2e] [--skip-throughput] [--skip-conformance]
       [--skip-suite] [--merge] [--outlines-limit N] [--requests 64] [--tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import glob
import json
import re
import os
import statistics
import time
from pathlib import Path

import torch

from bench.common import percentile, print_table, write_results
from bench.conformance import accepts
from bench.guided_closing import closing_stress
from bench.guided_suite import SUITE, suite_conformance
from bench.workload import make_workload
from decoding.guided import GuidedSpec
from decoding.sampling import SamplingParams
from service.config import EngineConfig
from service.engine.async_engine import AsyncEngine
from service.engine.core import EngineCore
from common.errors import InvalidArgumentError

DATA = Path(os.environ.get("WEFT_GUIDED_DATA", Path(__file__).resolve().parents[2] / "shared/data/jsonschemabench-dev"))
BACKENDS = ("llguidance", "outlines-core")


def load_dev(limit: int | None = None) -> list[tuple[str, dict]]:
    files = sorted(glob.glob(str(DATA / "*.json")))
    if not files:
        raise SystemExit(f"no data set at {DATA} (set WEFT_GUIDED_DATA)")
    docs = [(Path(f).stem, json.loads(Path(f).read_text())) for f in files]
    return docs[:limit] if limit else docs


def conformance(core: EngineCore, docs, backend: str, limit_compile: int | None = None) -> dict:
    """Compile every schema one way ("auto": Weft's policy, the normaliser included; a backend's
    name: that backend alone, on the schema as sent) and replay the instances."""
    compiler = core.guide_compiler
    tok = core.tokenizer
    words = compiler.bitmask_words
    res = collections.Counter()
    reasons = collections.Counter()
    compile_s: list[float] = []
    compile_cpu_s: list[float] = []     # the process's CPU time: what the compile costs on a shared machine
    mask_s: list[float] = []
    compiled_names: list[str] = []
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    for i, (name, doc) in enumerate(docs):
        if limit_compile is not None and i >= limit_compile:
            break
        spec = GuidedSpec("json_schema", doc["schema"])
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            if backend == "auto":
                grammar = compiler.compile_uncached(spec)
            else:
                grammar = compiler.compile_uncached(spec, backend, normalize=False)
        except InvalidArgumentError as exc:
            res["rejected"] += 1
            reasons[_reason(exc.message)] += 1
            continue
        compile_s.append(time.perf_counter() - t0)
        compile_cpu_s.append(time.process_time() - c0)
        res["compiled"] += 1
        compiled_names.append(name)
        for test in doc["tests"]:
            ok, reordered = accepts(grammar, test["data"], encode, tok.decode, words, mask_s if test["valid"] else None,
                                   schema=doc["schema"])
            res[("valid_" if test["valid"] else "invalid_") + ("accepted" if ok else "rejected")] += 1
            res["valid_reordered"] += ok and reordered and test["valid"]
    return {
        "backend": backend if backend != "auto" else "weft (auto: normaliser, llguidance, outlines-core)",
        "schemas": res["compiled"] + res["rejected"], "compiled": res["compiled"],
        "rejected": res["rejected"], "valid_accepted": res["valid_accepted"], "valid_rejected": res["valid_rejected"],
        "valid_reordered": res["valid_reordered"],
        "invalid_accepted": res["invalid_accepted"], "invalid_rejected": res["invalid_rejected"],
        "compile_p50_ms": 1e3 * percentile(compile_s, 50), "compile_p99_ms": 1e3 * percentile(compile_s, 99),
        "compile_cpu_p50_ms": 1e3 * percentile(compile_cpu_s, 50),
        "mask_p50_us": 1e6 * percentile(mask_s, 50), "mask_p99_us": 1e6 * percentile(mask_s, 99),
        "mask_samples": len(mask_s),
        "refusals": dict(reasons.most_common()), "_compiled_names": compiled_names,
    }


def _reason(message: str) -> str:
    """A refusal's reason, by keyword where it names one."""
    m = message.split(" (at ")[0]
    if "oneOf constraints are not supported" in m:
        return "oneOf (branches not provably exclusive)"
    for prefix in ("Unknown format", "Unimplemented keys", "unsupported keyword", "the regex"):
        if prefix in m:
            return m[:80]
    return m[:60]


# ---- throughput -----------------------------------------------------------------------------------

THROUGHPUT_SPECS = {
    # A constraint that cannot complete within the tokens asked for (the pure cost of masks and
    # jump-forward): closing before max_tokens off, so it is not refused as too short.
    "json": GuidedSpec("json_schema", {"type": "array", "items": {"type": "string"}, "minItems": 1000},
                       close_before_max_tokens=False),
    "regex": GuidedSpec("regex", r"[a-zA-Z ,.]+"),
}


async def _run_level(engine: AsyncEngine, items, conc: int, guided: GuidedSpec | None) -> tuple[float, int]:
    sem = asyncio.Semaphore(conc)
    total = 0

    async def one(item) -> None:
        nonlocal total
        async with sem:
            params = SamplingParams(temperature=0, max_tokens=item.max_tokens, ignore_eos=True, guided=guided)
            n = 0
            async for out in engine.generate(item.prompt_ids, params):
                n += len(out.token_ids)
            total += n

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in items))
    return time.perf_counter() - t0, total


def throughput(core: EngineCore, requests: int, tokens: int, conc: int = 32, rounds: int = 5) -> list[dict]:
    items = make_workload(core.tokenizer, requests, seed=7, min_out=tokens, max_out=tokens)

    async def run() -> list[dict]:
        engine = AsyncEngine(core)
        rows = []
        try:
            # Warm-up over every prompt at full width: the first 32-row steps (allocations, thread
            # pools) are slow, and every measured round then finds the same prompts in the prefix
            # cache (otherwise the first round alone pays for their prefill).
            await _run_level(engine, items, conc, None)
            for spec in THROUGHPUT_SPECS.values():                          # compile once (cached)
                await core.guide_compiler.compile(spec)
            walls: dict[str, list[float]] = collections.defaultdict(list)
            counts: dict[str, int] = {}
            for _ in range(rounds):                                         # interleaved: fair under noise
                for label, spec in [("unguided", None), *THROUGHPUT_SPECS.items()]:
                    wall, n = await _run_level(engine, items, conc, spec)
                    walls[label].append(wall)
                    counts[label] = n
                    print(f"  {label}: {n} tokens in {wall:.1f} s")
            for label in walls:
                rows.append({"workload": label, "concurrency": conc, "requests": len(items),
                             "output_tokens": counts[label],
                             "tok_per_s": counts[label] / statistics.median(walls[label]),
                             "wall_s_runs": [round(w, 2) for w in walls[label]]})
        finally:
            await engine.shutdown()
        return rows

    return asyncio.run(run())


# ---- end to end on the dev set --------------------------------------------------------------------

PROMPT_SCHEMA_CHARS = 1200


def _prompt(tok, schema: dict, chars: int | None = None) -> list[int]:
    # The schema is in the prompt only as a hint (the guide enforces it): long ones are cut,
    # which keeps prefill and attention over 300 prompts affordable on a CPU.
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    chars = chars or PROMPT_SCHEMA_CHARS
    if len(text) > chars:
        text = text[:chars] + " ..."
    messages = [{"role": "user", "content": f"Reply with a JSON value that is valid under this JSON Schema:\n{text}"}]
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def end_to_end(core: EngineCore, docs, max_tokens: int, conc: int = 32, budget_s: float | None = None,
               prompt_chars: int | None = None, close: bool = True, temperature: float = 0.0,
               seed: int | None = None) -> dict:
    """Schemas are started in order; with a time budget, whatever has not finished when it runs
    out is cancelled and counted as "not_run" (the counts say exactly what was measured).
    `close`: the guides close the output before max_tokens (the default); False: the old
    behaviour, outputs cut mid-value by max_tokens. Outputs whose guide narrowed its mask to
    finish in time are counted as "closed_by_budget" (they are validated like the others)."""
    import jsonschema

    tok = core.tokenizer
    results: dict[str, dict] = {}

    async def run() -> None:
        engine = AsyncEngine(core)
        sem = asyncio.Semaphore(conc)

        async def generate(name: str, doc: dict, limit: int) -> dict:
            params = SamplingParams(temperature=temperature, seed=seed, max_tokens=limit, guided=GuidedSpec(
                "json_schema", doc["schema"], close_before_max_tokens=close))
            rid = f"e2e-{name}-{seed}"
            text, reason, guide, ntok = "", None, None, 0
            async for out in engine.generate(_prompt(tok, doc["schema"], prompt_chars), params, request_id=rid):
                text += out.text
                ntok += len(out.token_ids)
                if guide is None:   # the running request's guide (read-only, for its count)
                    family = core.requests.get(rid)
                    guide = family[0].guide if family else None
                if out.finished:
                    reason = out.finish_reason
            return dict(text=text, finish_reason=reason, tokens=ntok, closed_by_budget=getattr(guide, "narrowed", 0) > 0)

        async def one(name: str, doc: dict) -> None:
            async with sem:
                r = {"name": name}
                try:
                    try:
                        r.update(await generate(name, doc, max_tokens))
                    except InvalidArgumentError as exc:
                        # Weft refuses a max_tokens that no complete output fits in and says how many
                        # tokens the shortest one takes: retry with that much room, as a client would.
                        need = re.search(r"output Weft finds is (\d+) tokens", exc.message)
                        if exc.field != "max_tokens" or not need:
                            raise
                        r.update(await generate(name, doc, int(need.group(1)) + 64), retried_max_tokens=int(need.group(1)))
                except InvalidArgumentError as exc:
                    r.update(error=exc.message)
                results[name] = r
                if len(results) % 20 == 0:
                    print(f"  e2e: {len(results)}/{len(docs)} done, {time.perf_counter() - t0:.0f} s", flush=True)

        t0 = time.perf_counter()
        try:
            tasks = [asyncio.ensure_future(one(n, d)) for n, d in docs]
            done, pending = await asyncio.wait(tasks, timeout=budget_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for t in done:
                t.result()
            results["_wall_s"] = {"wall": time.perf_counter() - t0}
        finally:
            await engine.shutdown()

    asyncio.run(run())
    wall = results.pop("_wall_s")["wall"]
    counts = collections.Counter()
    invalid_examples, truncated_examples, retried = [], [], []
    for name, doc in docs:
        r = results.get(name)
        if r is None:
            counts["not_run"] += 1
            continue
        if "error" in r:
            counts["not_compiled"] += 1
            continue
        counts["compiled"] += 1
        if "retried_max_tokens" in r:
            counts["retried_max_tokens"] += 1
            retried.append({"name": name, "shortest_output_tokens": r["retried_max_tokens"]})
        counts["closed_by_budget"] += r["closed_by_budget"]
        counts["finish_length"] += r["finish_reason"] == "length"
        try:
            value = json.loads(r["text"])
            cls = jsonschema.validators.validator_for(doc["schema"], default=jsonschema.Draft202012Validator)
            # formats are assertions here, as in the data set's own labels
            errors = list(cls(doc["schema"], format_checker=cls.FORMAT_CHECKER).iter_errors(value))
        except Exception as exc:  # not JSON, or the validator cannot handle the schema
            errors = [exc]
        if errors and r["finish_reason"] == "length":
            # cut by max_tokens (an output that is complete and valid at max_tokens counts as valid)
            counts["truncated"] += 1
            truncated_examples.append({"name": name, "text": r["text"][-200:], "tokens": r["tokens"]})
        elif errors:
            counts["invalid"] += 1
            invalid_examples.append({"name": name, "text": r["text"][:300], "error": str(errors[0])[:300],
                                     "finish_reason": r["finish_reason"]})
        else:
            counts["valid"] += 1
            counts["valid_closed_by_budget"] += r["closed_by_budget"]
    return {"schemas": len(docs), "run": len(docs) - counts["not_run"], "not_run": counts["not_run"],
            "compiled": counts["compiled"], "valid": counts["valid"], "truncated": counts["truncated"],
            "invalid": counts["invalid"], "not_compiled": counts["not_compiled"],
            "closed_by_budget": counts["closed_by_budget"], "valid_closed_by_budget": counts["valid_closed_by_budget"],
            "finish_length": counts["finish_length"], "retried_max_tokens": counts["retried_max_tokens"],
            "retried_examples": retried[:10],
            "close_before_max_tokens": close, "wall_s": wall, "temperature": temperature, "seed": seed,
            "max_tokens": max_tokens, "budget_s": budget_s, "invalid_examples": invalid_examples[:10],
            "truncated_examples": truncated_examples[:10]}


def _merge(rows: list[dict], ratios: dict, workload: dict, cmd: str):
    from bench.common import RESULTS

    path = RESULTS / "guided.json"
    if not path.exists():
        return rows, ratios, workload, cmd
    old = json.loads(path.read_text())
    ran = {r["section"] for r in rows}
    # End-to-end runs are kept per (temperature, seed): the greedy run and the sampled ones can
    # be recorded by separate invocations.
    runs = {(r["temperature"], r["seed"]) for r in rows if r["section"] == "end_to_end"}
    kept = [r for r in old["rows"] if r.get("section") not in ran or
            (r["section"] == "end_to_end" and "temperature" in r and (r["temperature"], r["seed"]) not in runs)]
    old_workload = {k: v for k, v in old["workload"].items() if k not in ("machine",)}
    prev_cmd = old_workload.pop("command", "")
    merged_ratios = {**old["ratios"], **ratios}
    merged = kept + rows
    e2e = [r for r in merged if r["section"] == "end_to_end"]
    merged_workload = {**old_workload, **workload}
    if runs and e2e:
        merged_ratios.update(_e2e_ratios(e2e))
        merged_workload["e2e_sampled_seeds"] = sorted({r["seed"] for r in e2e if r["temperature"] != 0})
    return merged, merged_ratios, merged_workload, f"{prev_cmd}; then {cmd}"


def _e2e_ratios(runs: list[dict]) -> dict[str, float]:
    """The end-to-end figures over the greedy run and the sampled ones."""
    greedy = next((r for r in runs if r["temperature"] == 0), None)
    sampled = [r for r in runs if r["temperature"] != 0]
    out = {"dev_outputs_cut_by_max_tokens": sum(r["truncated"] for r in runs),
           "dev_invalid_outputs": sum(r["invalid"] for r in runs)}
    if sampled:
        out["dev_valid_output_fraction_sampled_min"] = min(r["valid"] / max(1, r["compiled"]) for r in sampled)
    if greedy is None:
        return out
    return {**out, "dev_valid_output_fraction": greedy["valid"] / max(1, greedy["compiled"]),
           "dev_valid_output_fraction_untruncated": greedy["valid"] / max(1, greedy["compiled"] - greedy["truncated"]),
           "dev_truncated_fraction": greedy["truncated"] / max(1, greedy["compiled"]),
           "dev_closed_by_budget_fraction": greedy["closed_by_budget"] / max(1, greedy["compiled"])}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench guided")
    ap.add_argument("--model", default=None)
    ap.add_argument("--limit", type=int, default=None, help="end-to-end: first N dev-set schemas (default: all)")
    ap.add_argument("--start", type=int, default=0,
                    help="end-to-end: begin at this dev-set schema (a run that covers the rest of an earlier one)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prompt-schema-chars", type=int, default=PROMPT_SCHEMA_CHARS)
    ap.add_argument("--budget-s", type=float, default=900.0, help="end-to-end: stop after this long (0: no limit)")
    ap.add_argument("--sampled-budget-s", type=float, default=None,
                    help="end-to-end: the time budget of each sampled run (default: --budget-s; 0: no limit)")
    ap.add_argument("--outlines-limit", type=int, default=None, help="conformance: first N schemas for outlines-core")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-close", action="store_true",
                    help="end-to-end: guides do not close outputs before max_tokens (the old behaviour)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-conformance", action="store_true")
    ap.add_argument("--skip-suite", action="store_true", help="skip the JSON-Schema-Test-Suite section")
    ap.add_argument("--closing-seeds", default="",
                    help="closing: a random-token 'model' per seed and policy on every compiled schema "
                         "(bench/guided_closing.py); '' (the default) skips it")
    ap.add_argument("--seeds", default="1,2,3",
                    help="end-to-end: after the greedy run, one sampled run (temperature 1.0) per seed; '' for none")
    ap.add_argument("--no-greedy", action="store_true", help="end-to-end: the sampled runs only")
    ap.add_argument("--merge", action="store_true",
                    help="keep the sections of the existing results file that this run skips")
    a = ap.parse_args(argv)

    core = EngineCore(EngineConfig(model=a.model, dtype="float32", kv_cache_gb=2.0, progress=False))
    docs = load_dev()
    rows: list[dict] = []
    ratios: dict[str, float] = {}
    workload: dict = {"data": str(DATA), "schemas": len(docs), "model": str(core.loaded.source),
                      "whitespace": "compact", "auto_order": "llguidance, then outlines-core"}

    if not a.skip_conformance:
        by_backend: dict[str, dict] = {}
        for backend in ("auto", *BACKENDS):
            t0 = time.perf_counter()
            r = conformance(core, docs, backend, a.outlines_limit if backend == "outlines-core" else None)
            by_backend[backend] = r
            r["wall_s"] = time.perf_counter() - t0
            print_table([{k: v for k, v in r.items() if k not in ("refusals", "_compiled_names")}])
            print("  refused:", r["refusals"])
            if backend == "auto":
                ratios["dev_compiled_fraction"] = r["compiled"] / r["schemas"]
                ratios["dev_invalid_instances_accepted"] = r["invalid_accepted"]
                ratios["dev_valid_instances_rejected"] = r["valid_rejected"]
                ratios["dev_compile_p50_ms"] = r["compile_p50_ms"]
                ratios["dev_compile_cpu_p50_ms"] = r["compile_cpu_p50_ms"]
                ratios["dev_mask_p50_us"] = r["mask_p50_us"]
            else:
                key = backend.replace("-", "_")
                ratios[f"{key}_compiled_fraction"] = r["compiled"] / r["schemas"]
                ratios[f"{key}_mask_p50_us"] = r["mask_p50_us"]
                ratios[f"{key}_compile_p50_ms"] = r["compile_p50_ms"]
                ratios[f"{key}_compile_cpu_p50_ms"] = r["compile_cpu_p50_ms"]
                ratios[f"{key}_invalid_instances_accepted"] = r["invalid_accepted"]
                ratios[f"{key}_valid_instances_rejected"] = r["valid_rejected"]
        # Which schemas only the normaliser's rewrites made compile.
        alone = set().union(*(by_backend[b]["_compiled_names"] for b in BACKENDS))
        by_backend["auto"]["compiled_by_rewrite"] = sorted(set(by_backend["auto"]["_compiled_names"]) - alone)
        for r in by_backend.values():
            r.pop("_compiled_names")
            rows.append({"section": "conformance", **r})

    if not a.skip_suite:
        t0 = time.perf_counter()
        srows = suite_conformance(core)
        print_table([{k: v for k, v in r.items() if k != "refusals"} for r in srows])
        total = {k: sum(r[k] for r in srows) for k in ("groups", "compiled", "refused", "valid_accepted",
                                                       "valid_rejected", "invalid_accepted", "invalid_rejected")}
        print("  test suite:", total, f"{time.perf_counter() - t0:.0f} s")
        rows += [{"section": "test_suite", **r} for r in srows]
        ratios["suite_compiled_fraction"] = total["compiled"] / max(1, total["groups"])
        ratios["suite_invalid_instances_accepted"] = total["invalid_accepted"]
        workload["suite"] = str(SUITE)

    closing_seeds = [int(x) for x in a.closing_seeds.split(",") if x.strip()]
    if closing_seeds:
        r = closing_stress(core, docs, a.max_tokens, closing_seeds)
        print({k: v for k, v in r.items() if k != "cut_examples"})
        for ex in r["cut_examples"]:
            print("  CUT:", ex)
        rows.append({"section": "closing", **r})
        ratios["closing_runs_cut"] = r.get("cut", 0)

    if not a.skip_throughput:
        trows = throughput(core, a.requests, a.tokens)
        print_table(trows)
        by = {r["workload"]: r for r in trows}
        ratios["guided_vs_unguided_c32"] = by["json"]["tok_per_s"] / by["unguided"]["tok_per_s"]
        ratios["guided_regex_vs_unguided_c32"] = by["regex"]["tok_per_s"] / by["unguided"]["tok_per_s"]
        rows += [{"section": "throughput", **r} for r in trows]
        workload.update(throughput_requests=a.requests, throughput_tokens=a.tokens,
                        throughput_specs={k: v.cache_key()[:2] for k, v in THROUGHPUT_SPECS.items()})

    if not a.skip_e2e:
        e2e_docs = docs[a.start:][: a.limit] if a.limit else docs[a.start:]
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
        runs = []
        for temperature, seed in [*([] if a.no_greedy else [(0.0, None)]), *((1.0, sd) for sd in seeds)]:
            budget = a.budget_s if temperature == 0 or a.sampled_budget_s is None else a.sampled_budget_s
            r = end_to_end(core, e2e_docs, a.max_tokens, budget_s=budget or None,
                           prompt_chars=a.prompt_schema_chars, close=not a.no_close, temperature=temperature, seed=seed)
            print({k: v for k, v in r.items() if not k.endswith("_examples")})
            for ex in r["invalid_examples"]:
                print("  INVALID:", ex)
            for ex in r["truncated_examples"]:
                print("  TRUNCATED:", ex)
            r["first_schema"] = a.start
            rows.append({"section": "end_to_end", **r})
            runs.append(r)
        ratios.update(_e2e_ratios(runs))
        workload.update(e2e_schemas=len(docs[: a.limit] if a.limit else docs), e2e_max_tokens=a.max_tokens,
                        e2e_prompt_schema_chars=a.prompt_schema_chars, e2e_close_before_max_tokens=not a.no_close)
        if not a.no_greedy:
            workload.update(e2e_greedy=True, e2e_budget_s=a.budget_s)
        if seeds:
            workload.update(e2e_sampled_seeds=seeds, e2e_sampled_temperature=1.0,
                            e2e_sampled_budget_s=a.budget_s if a.sampled_budget_s is None else a.sampled_budget_s)

    cmd = "make bench BENCH=guided" + (f" ARGS='{' '.join(argv)}'" if argv else "")
    if a.merge:
        rows, ratios, workload, cmd = _merge(rows, ratios, workload, cmd)
    print(ratios)
    path = write_results("guided", workload, rows, ratios, cmd)
    print(f"wrote {path}")
    return 0
