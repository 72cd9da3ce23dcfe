"""make bench BENCH=tools: tool calling on the function-like schemas of jsonschemabench-dev.

The BFCL, MCPspec and Glaive(ai2K) schemas of the dev set become tools: a BFCL schema is
{"type": "object", "properties": {"<function>": <arguments schema>}} (or an anyOf of such), so
each function is a tool with that arguments schema as its parameters (a request then offers all
of a schema's functions); an MCPspec or Glaive schema is the arguments schema itself, and the
tool is named after the file. Names are sanitised to [a-zA-Z0-9_-] (64 characters at most).
Schemas whose top level does not describe an object are skipped (with the reason); schemas
that Weft refuses (INVALID_ARGUMENT on tools[i].parameters: a keyword it cannot enforce) are
counted as refused.

Each schema is one chat request (one user message asking for a typical call of the tool) sent
to a real `weft serve` subprocess on the default model (SmolLM2, whose template knows nothing of
tools: Weft's tool prompt shows them), greedy, at concurrency 32, once with tool_choice
"required" and once with "auto" (parallel_tool_calls left at its default). Measured:

- every returned call: its name is one of the request's tools and json.loads(arguments)
  validates under that tool's parameters (jsonschema, the schema's $schema or Draft 2020-12,
  formats checked): fraction_valid = valid / calls, per mode and subset (target 1.0);
- auto: answers_with_calls / answers (how often the model chooses to call);
- throughput: the "required" requests vs the same requests unguided (the very prompt token ids
  the server rendered for "required", Weft's tool prompt included, sent as token_ids; max_tokens = the tokens that request produced under "required", EOS ignored: the
  same output tokens per request). Both sides run
  after a warm-up pass (grammars compiled, prompts in the prefix cache), A-B-B-A (tools,
  unguided, unguided, tools) so drift hits both alike: each step is half of the requests, or
  all of them when a half would not fill the concurrency (the dev set's 45 at 32: every step
  runs all, 2x each side). --rounds repeats that; walls and tokens are summed, and each round's
  ratio is kept. The server's CPU time per step gives tools_vs_unguided_tok_per_cpu_s as well:
  on a shared machine other work stretches wall time, not the CPU time the server spends.
  tools_vs_unguided_tok_s = tool-call tok/s ÷ unguided tok/s (completion tokens / wall time of
  the level; target >= 0.9).

--budget-s bounds the two validation passes: requests not started by then are counted as
not_run; the throughput section then runs over the requests that completed under "required".

Usage: python -m bench tools [--limit N] [--max-tokens 256] [--concurrency 32] [--budget-s 900]
                             [--rounds 1] [--model PATH] [--kv-cache-gb 4]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jsonschema

from bench.common import print_table, write_results
from bench.guided import DATA, load_dev
from bench.load import ServerProcess

# File-name prefixes of the function-like subsets of jsonschemabench-dev.
SUBSETS = {"BFCL": "BFCL_", "MCPspec": "MCPspec---", "Glaive": "Glaiveai2K---"}
MODES = ("required", "auto")
DESCRIPTION_CHARS = 300   # long MCP descriptions are cut: the full schema is in the tool prompt anyway


@dataclass(slots=True)
class Case:
    """One dev-set schema as one tool-calling request."""
    subset: str
    name: str                    # the file's stem
    tools: list[dict[str, Any]]  # {"name", "description", "parameters"}
    messages: list[dict[str, str]]


@dataclass(slots=True)
class Outcome:
    """What one request came back with."""
    status: str                                  # ok | refused | error | not_run
    reason: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = ""
    text: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)   # (name, arguments)
    retried_max_tokens: int | None = None


# ---- the data set as tools ------------------------------------------------------------------------

def sanitise(name: str) -> str:
    """A tool name Weft (and OpenAI) accept: [a-zA-Z0-9_-], 1-64 characters."""
    out = re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64]
    return out or "tool"


def _resolve(schema: dict, root: dict) -> dict:
    """Follow top-level local $refs (#/definitions/X, #/$defs/X): MCPspec schemas are one."""
    seen = 0
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#/"):
        target: Any = root
        for part in schema["$ref"][2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                return schema
            target = target[part]
        schema, seen = target, seen + 1
        if seen > 16:
            break
    return schema


def object_reason(schema: Any, root: dict | None = None, depth: int = 0) -> str | None:
    """None when `schema` describes an object (arguments must be one), else why not."""
    if not isinstance(schema, dict):
        return f"top level is {type(schema).__name__}, not a schema object"
    root = schema if root is None else root
    s = _resolve(schema, root)
    kind = s.get("type")
    if kind is not None:
        if kind == "object" or (isinstance(kind, list) and "object" in kind):
            return None
        return f"top-level type {kind!r}"
    if any(k in s for k in ("properties", "required", "additionalProperties", "patternProperties")):
        return None
    for key in ("anyOf", "oneOf"):
        if isinstance(s.get(key), list) and depth < 4:
            bad = [r for b in s[key] if (r := object_reason(b, root, depth + 1))]
            return None if not bad else f"{key} branch: {bad[0]}"
    return "top level does not describe an object"


def _description(schema: dict) -> str:
    s = _resolve(schema, schema)
    text = s.get("description") or s.get("title") or schema.get("description") or schema.get("title") or ""
    text = " ".join(str(text).split())
    return text[:DESCRIPTION_CHARS]


def bfcl_tools(schema: dict) -> list[dict[str, Any]] | str:
    """Each function of a BFCL schema as a tool, or why the schema has none."""
    branches = schema["anyOf"] if isinstance(schema.get("anyOf"), list) else [schema]
    tools: list[dict[str, Any]] = []
    used: set[str] = set()
    for b in branches:
        props = b.get("properties") if isinstance(b, dict) else None
        if not isinstance(props, dict) or not props:
            return "a branch without function properties"
        for fname, args in props.items():
            if reason := object_reason(args):
                return f"{fname}: {reason}"
            name = sanitise(fname)
            while name in used:   # two functions whose names sanitise alike stay apart
                name = sanitise(name[:60] + "_" + str(len(used)))
            used.add(name)
            tools.append({"name": name, "description": _description(args), "parameters": args})
    return tools


def file_tool(subset: str, stem: str, schema: dict) -> list[dict[str, Any]] | str:
    """The schema as the arguments of one tool named after the file (Glaive's hash suffix off)."""
    if reason := object_reason(schema):
        return reason
    base = stem[len(SUBSETS[subset]):]
    if subset == "Glaive":
        base = re.sub(r"_[0-9a-f]{8}$", "", base)
    return [{"name": sanitise(base), "description": _description(schema), "parameters": schema}]


def prompt(tools: list[dict[str, Any]]) -> list[dict[str, str]]:
    def one(t: dict[str, Any]) -> str:
        return f"`{t['name']}` ({t['description']})" if t["description"] else f"`{t['name']}`"

    if len(tools) == 1:
        ask = f"Use the tool {one(tools[0])} to answer: make a typical call."
    else:
        ask = f"Use one of the tools {', '.join(one(t) for t in tools)} to answer: make a typical call."
    return [{"role": "user", "content": ask}]


def load_cases(limit: int | None) -> tuple[list[Case], list[dict[str, str]]]:
    """The requests, and the schemas skipped (with why)."""
    cases: list[Case] = []
    skipped: list[dict[str, str]] = []
    taken: collections.Counter[str] = collections.Counter()
    for stem, doc in load_dev():
        subset = next((s for s, p in SUBSETS.items() if stem.startswith(p)), None)
        if subset is None or (limit and taken[subset] >= limit):
            continue
        taken[subset] += 1
        schema = doc.get("schema", doc)
        tools = bfcl_tools(schema) if subset == "BFCL" else file_tool(subset, stem, schema)
        if isinstance(tools, str):
            skipped.append({"subset": subset, "name": stem, "reason": tools})
            continue
        cases.append(Case(subset, stem, tools, prompt(tools)))
    return cases, skipped


# ---- requests -------------------------------------------------------------------------------------

_NEED = re.compile(r"output Weft finds is (\d+) tokens")


def _finish_name(reason: int) -> str:
    from clients.weft.v1 import inference_pb2 as pb
    return pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


async def call_tools(client, case: Case, mode: str, max_tokens: int) -> Outcome:
    """One request in `mode`; a refusal of the schema (tools[i].parameters) is an outcome, not an error."""
    async def once(limit: int) -> Outcome:
        resp = await client.generate(case.messages, tools=case.tools, tool_choice=mode, temperature=0,
                                     max_tokens=limit)
        c = resp.choices[0]
        return Outcome("ok", tokens=resp.usage.completion_tokens, prompt_tokens=resp.usage.prompt_tokens,
                       finish_reason=_finish_name(c.finish_reason),
                       text=c.text, calls=[(t.name, t.arguments) for t in c.tool_calls])

    try:
        try:
            return await once(max_tokens)
        except grpc.RpcError as exc:
            # Weft refuses a max_tokens no complete call fits in and says how many tokens the
            # shortest takes: retry with that much room, as a client would (as bench guided does).
            need = _NEED.search(exc.details() or "") if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else None
            if not need:
                raise
            out = await once(int(need.group(1)) + 64)
            out.retried_max_tokens = int(need.group(1))
            return out
    except grpc.RpcError as exc:
        details = exc.details() or ""
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and re.match(r"tools\[\d+\]\.parameters:", details):
            return Outcome("refused", reason=details)
        return Outcome("error", reason=f"{exc.code().name}: {details}")


def required_prompts(cases: list[Case], model: str | None) -> list[list[int]]:
    """Each case's prompt as the server renders it under tool_choice "required" (its chat
    template, Weft's tool prompt, the format the template implies), as token ids: the unguided
    side sends exactly these, so both sides attend over the same context. (tool_choice "none"
    would leave Weft's tool prompt out: a far shorter prompt, and a faster decode.)"""
    from decoding.tools import ToolChoice, ToolRequest, ToolSpec
    from service.loader import default_model_path, resolve_hf_dir
    from service.tokenizer import Tokenizer
    from service.tool_calls import render_messages, resolve_format

    tok = Tokenizer.from_dir(resolve_hf_dir(model or default_model_path(), progress=False))
    template = getattr(tok.hf, "chat_template", None)
    fmt = resolve_format("auto", template)
    out = []
    for case in cases:
        req = ToolRequest(tuple(ToolSpec(t["name"], t["description"], t["parameters"]) for t in case.tools),
                          ToolChoice("required"))
        messages, tools = render_messages(case.messages, req, fmt, template)
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        out.append(tok.encode(text, add_special_tokens=False))
    return out


async def call_unguided(client, case: Case, prompt_ids: list[int], tokens: int) -> int:
    """The "required" request's exact prompt ids, no grammar, exactly `tokens` out."""
    resp = await client.generate(prompt_ids, temperature=0, max_tokens=tokens, ignore_eos=True)
    n = resp.usage.completion_tokens
    if n != tokens:
        raise RuntimeError(f"{case.name}: unguided run gave {n} tokens, expected {tokens}")
    return n


async def drive(jobs: list, conc: int, deadline: float | None = None) -> tuple[float, list]:
    """Run coroutine factories at `conc` at a time; a job not started by `deadline` gives None."""
    sem = asyncio.Semaphore(conc)

    async def one(job):
        async with sem:
            if deadline is not None and time.monotonic() > deadline:
                return None
            return await job()

    t0 = time.perf_counter()
    out = await asyncio.gather(*(one(j) for j in jobs))
    return time.perf_counter() - t0, list(out)


# ---- validation -----------------------------------------------------------------------------------

def check_call(name: str, arguments: str, tools: dict[str, dict]) -> str | None:
    """None when the call names one of the tools and its arguments validate; else why not."""
    if name not in tools:
        return f"names {name!r}, not one of the tools ({', '.join(tools)})"
    try:
        args = json.loads(arguments)
    except ValueError as exc:
        return f"arguments are not JSON: {exc}"
    schema = tools[name]["parameters"]
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        err = jsonschema.exceptions.best_match(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(args))
    except Exception as exc:  # the validator cannot handle the schema: reported, never counted valid
        return f"validator failed: {type(exc).__name__}: {exc}"
    return None if err is None else f"{err.message[:200]} (at {'/'.join(map(str, err.absolute_path)) or 'top'})"


def duplicate_keys(arguments: str) -> list[str]:
    """Keys that occur twice in one object of the arguments: json.loads keeps the last silently,
    and JSON Schema cannot forbid it (a key the schema does not declare, under additionalProperties)."""
    dups: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict:
        seen: set[str] = set()
        for k, _ in items:
            if k in seen:
                dups.append(k)
            seen.add(k)
        return dict(items)

    try:
        json.loads(arguments, object_pairs_hook=pairs)
    except ValueError:
        return []
    return dups


def summarise(mode: str, subset: str, cases: list[Case], outs: list[Outcome | None],
              invalid: list[dict], notes: list[dict]) -> dict:
    """One row: counts over `cases` (their outcomes in `outs`); invalid calls appended to
    `invalid`, valid calls with duplicate keys and auto answers without calls to `notes`."""
    c: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    for case, out in zip(cases, outs):
        if out is None:
            c["not_run"] += 1
            continue
        c[out.status] += 1
        if out.status != "ok":
            reasons[out.reason.split(" (at ")[0][:90]] += 1
            continue
        c["answers"] += 1
        c["tokens"] += out.tokens
        c["answers_with_calls"] += bool(out.calls)
        if not out.calls:
            notes.append({"kind": "no_call", "mode": mode, "schema": case.name, "finish_reason": out.finish_reason,
                          "text": out.text[:300]})
        c["finish_length"] += out.finish_reason == "length"
        c["retried_max_tokens"] += out.retried_max_tokens is not None
        by_name = {t["name"]: t for t in case.tools}
        for name, arguments in out.calls:
            c["calls"] += 1
            why = check_call(name, arguments, by_name)
            if why is None:
                c["valid"] += 1
                if dups := duplicate_keys(arguments):
                    c["duplicate_keys"] += 1
                    notes.append({"kind": "duplicate_keys", "mode": mode, "schema": case.name, "tool": name,
                                  "keys": sorted(set(dups)), "arguments": arguments[:400]})
            else:
                invalid.append({"mode": mode, "schema": case.name, "tool": name, "arguments": arguments,
                                "error": why, "finish_reason": out.finish_reason})
    return {"mode": mode, "subset": subset, "schemas": len(cases), "not_run": c["not_run"],
            "refused": c["refused"], "errors": c["error"], "answers": c["answers"], "calls": c["calls"],
            "valid": c["valid"], "fraction_valid": c["valid"] / c["calls"] if c["calls"] else None,
            "valid_with_duplicate_keys": c["duplicate_keys"], "answers_with_calls": c["answers_with_calls"],
            "call_fraction": c["answers_with_calls"] / c["answers"] if c["answers"] else None,
            "finish_length": c["finish_length"], "retried_max_tokens": c["retried_max_tokens"],
            "completion_tokens": c["tokens"], "_reasons": dict(reasons.most_common(6))}


# ---- the run --------------------------------------------------------------------------------------

async def validation_pass(client, cases: list[Case], mode: str, a: argparse.Namespace,
                          deadline: float) -> tuple[float, list[Outcome | None]]:
    jobs = [lambda c=c: call_tools(client, c, mode, a.max_tokens) for c in cases]
    wall, outs = await drive(jobs, a.concurrency, deadline)
    done = sum(o is not None for o in outs)
    print(f"  {mode}: {done}/{len(cases)} requests in {wall:.1f} s", flush=True)
    return wall, outs


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ratio(steps: list[dict], per: str) -> float:
    """tools tok per `per` ÷ unguided tok per `per`, over `steps`."""
    rate = {s: sum(x["tokens"] for x in steps if x["system"] == s) / sum(x[per] for x in steps if x["system"] == s)
            for s in ("tools", "unguided")}
    return rate["tools"] / rate["unguided"]


async def throughput(client, cases: list[Case], first: list[Outcome], a: argparse.Namespace,
                     server_pid: int) -> tuple[list[dict], list[float]]:
    """Tool calls ("required") vs unguided on the same requests and output lengths, A-B-B-A.
    Rows per system, and the ratio of each A-B-B-A round. The server's CPU time is recorded
    per step too: on a shared machine other work stretches wall time, not the CPU time spent."""
    budget = [o.retried_max_tokens + 64 if o.retried_max_tokens else a.max_tokens for o in first]
    prompts = required_prompts(cases, a.model)
    for case, ids, o in zip(cases, prompts, first):
        if len(ids) != o.prompt_tokens:
            raise RuntimeError(f"{case.name}: rendered {len(ids)} prompt tokens, the server {o.prompt_tokens}")

    def tools_jobs(idx: list[int]) -> list:
        return [lambda i=i: call_tools(client, cases[i], "required", budget[i]) for i in idx]

    def plain_jobs(idx: list[int]) -> list:
        return [lambda i=i: call_unguided(client, cases[i], prompts[i], first[i].tokens) for i in idx]

    # Warm-up: the unguided prompts (one token each) into the prefix cache, as the validation
    # pass put the "required" ones there, so neither side pays for prefill the other skips.
    await drive([lambda i=i: call_unguided(client, cases[i], prompts[i], 1) for i in range(len(cases))],
                a.concurrency)
    order = list(range(len(cases)))
    # Halves as bench grpc runs them, when each still fills the concurrency; with fewer requests
    # each step runs all of them, so the batches are as wide as the level asks.
    half = (len(order) + 1) // 2
    parts = (order[:half], order[half:]) if len(order) - half >= a.concurrency else (order, order)
    abba = [("tools", parts[0]), ("unguided", parts[0]), ("unguided", parts[1]), ("tools", parts[1])]
    steps: list[dict] = []
    mismatched = 0
    for rnd in range(a.rounds):
        for system, part in abba:
            cpu0 = cpu_seconds(server_pid)
            wall, outs = await drive(tools_jobs(part) if system == "tools" else plain_jobs(part), a.concurrency)
            cpu = cpu_seconds(server_pid) - cpu0
            if system == "tools":
                n = [o.tokens if o.status == "ok" else 0 for o in outs]
                # greedy and the same batch shapes give the same tokens; count any request that did not
                mismatched += sum(k != first[i].tokens for k, i in zip(n, part))
            else:
                n = outs
            steps.append({"round": rnd, "system": system, "tokens": sum(n), "wall": wall, "cpu": cpu})
            print(f"  round {rnd} {system}: {sum(n)} tokens in {wall:.1f} s (server CPU {cpu:.1f} s)", flush=True)
    per_round = [_ratio([x for x in steps if x["round"] == r], "wall") for r in range(a.rounds)]
    rows = []
    for s in ("tools", "unguided"):
        mine = [x for x in steps if x["system"] == s]
        tokens, wall, cpu = (sum(x[k] for x in mine) for k in ("tokens", "wall", "cpu"))
        rows.append({"system": s, "concurrency": a.concurrency, "requests": len(cases), "output_tokens": tokens,
                     "wall_s": wall, "tok_per_s": tokens / wall, "server_cpu_s": cpu, "tok_per_cpu_s": tokens / cpu,
                     "rounds": a.rounds, "halves": parts[0] != parts[1],
                     "wall_s_steps": [round(x["wall"], 2) for x in mine],
                     **({"requests_tokens_differ_from_first_pass": mismatched} if s == "tools" else {})})
    return rows, per_round


async def run(server: ServerProcess, cases: list[Case], a: argparse.Namespace) -> dict:
    from clients.client import AsyncWeftClient

    async with AsyncWeftClient(server.target, timeout=3600) as client:
        await client.wait_ready(120)
        await client.generate([{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)  # first-call costs
        deadline = time.monotonic() + a.budget_s if a.budget_s else None
        passes = {mode: await validation_pass(client, cases, mode, a, deadline) for mode in MODES}
        first = passes["required"][1]
        ok = [i for i, o in enumerate(first) if o is not None and o.status == "ok" and o.tokens > 0]
        trows, per_round = ([], [])
        if ok:
            trows, per_round = await throughput(client, [cases[i] for i in ok], [first[i] for i in ok], a,
                                                server.proc.pid)
    return {"passes": passes, "throughput": trows, "per_round": per_round}


def mode_rows(cases: list[Case], passes: dict, invalid: list[dict], notes: list[dict]) -> list[dict]:
    rows = []
    for mode in MODES:
        wall, outs = passes[mode]
        for subset in SUBSETS:
            idx = [i for i, c in enumerate(cases) if c.subset == subset]
            rows.append(summarise(mode, subset, [cases[i] for i in idx], [outs[i] for i in idx], invalid, notes))
        row = summarise(mode, "all", cases, outs, [], [])   # calls already listed by subset
        row.update(wall_s=wall, tok_per_s=row["completion_tokens"] / wall if wall else float("nan"))
        rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench tools")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--limit", type=int, default=None, help="first N schemas of each subset (default: all)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--budget-s", type=float, default=900.0,
                    help="validation passes: start no request after this long (0: no limit)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="throughput: repeat the A-B-B-A halves this often (walls and tokens summed)")
    ap.add_argument("--kv-cache-gb", type=float, default=4.0,
                    help="room for every prompt (MCPspec tool prompts run to thousands of tokens) in the prefix cache")
    a = ap.parse_args(argv)

    cases, skipped = load_cases(a.limit)
    print(f"{len(cases)} requests ({collections.Counter(c.subset for c in cases)}), {len(skipped)} schemas skipped")
    for s in skipped:
        print("  skipped:", s)
    server = ServerProcess(a.model, "auto", a.kv_cache_gb)
    try:
        res = asyncio.run(run(server, cases, a))
    finally:
        server.stop()

    invalid: list[dict] = []
    notes: list[dict] = []
    rows = mode_rows(cases, res["passes"], invalid, notes)
    for r in rows:
        r["skipped"] = sum(s["subset"] == r["subset"] or r["subset"] == "all" for s in skipped)
    refusals = {r["mode"] + "/" + r["subset"]: r.pop("_reasons") for r in rows}
    print()
    print_table(rows)
    for k, v in refusals.items():
        if v and not k.endswith("/all"):
            print(f"  refused or failed, {k}: {v}")
    for ex in invalid:
        print("  INVALID CALL:", json.dumps(ex, ensure_ascii=False))
    for ex in notes:
        if ex["kind"] == "duplicate_keys":
            print("  valid, but duplicate keys:", json.dumps(ex, ensure_ascii=False))
    no_call = [ex for ex in notes if ex["kind"] == "no_call"]
    for ex in no_call[:3]:
        print("  answer without a call:", json.dumps(ex, ensure_ascii=False))
    trows = res["throughput"]
    print_table(trows)

    by = {(r["mode"], r["subset"]): r for r in rows}
    ratios: dict[str, float | None] = {f"fraction_valid_{m}": by[(m, "all")]["fraction_valid"] for m in MODES}
    ratios["auto_call_fraction"] = by[("auto", "all")]["call_fraction"]
    ratios["required_call_fraction"] = by[("required", "all")]["call_fraction"]
    ratios["invalid_calls"] = float(len(invalid))
    ratios["valid_calls_with_duplicate_keys"] = float(sum(ex["kind"] == "duplicate_keys" for ex in notes))
    if trows:
        t = {r["system"]: r for r in trows}
        ratios["tools_vs_unguided_tok_s"] = t["tools"]["tok_per_s"] / t["unguided"]["tok_per_s"]
        # the same per second of the server's CPU: what the tool grammar costs, whatever else runs
        ratios["tools_vs_unguided_tok_per_cpu_s"] = t["tools"]["tok_per_cpu_s"] / t["unguided"]["tok_per_cpu_s"]
        for r, v in enumerate(res["per_round"]):
            ratios[f"tools_vs_unguided_tok_s_round{r}"] = v
    print(ratios)
    # A fraction over no calls (auto mode where the model never calls) is undefined: left out
    # of the ratios (write_results rounds them), null in its rows.
    defined = {k: v for k, v in ratios.items() if v is not None}

    out_rows = [{"section": "calls", **r, "refusal_reasons": refusals[r["mode"] + "/" + r["subset"]]} for r in rows]
    out_rows += [{"section": "throughput", **r} for r in trows]
    out_rows.append({"section": "skipped", "schemas": skipped})
    out_rows.append({"section": "invalid_calls", "calls": invalid})
    out_rows.append({"section": "duplicate_keys", "calls": [ex for ex in notes if ex["kind"] == "duplicate_keys"]})
    out_rows.append({"section": "answers_without_calls", "answers": no_call})
    workload = {"data": str(DATA), "subsets": SUBSETS, "limit_per_subset": a.limit, "requests": len(cases),
                "skipped": len(skipped), "modes": list(MODES), "greedy": True, "max_tokens": a.max_tokens,
                "concurrency": a.concurrency, "budget_s": a.budget_s, "throughput_rounds": a.rounds, "parallel_tool_calls": "default (true)",
                "model": a.model or "default (SmolLM2-135M-Instruct)", "dtype": "auto (float32 on CPU)",
                "server": "weft serve subprocess on loopback; client AsyncWeftClient.generate (unary)",
                "throughput": "required vs the same prompt token ids unguided + ignore_eos, the same "
                              "output tokens per request; warm-up pass first; A-B-B-A (halves, or all "
                              "requests per step when a half would not fill the concurrency)"}
    cmd = "make bench BENCH=tools" + (f" ARGS='{' '.join(argv)}'" if argv else "")
    path = write_results("tools", workload, out_rows, defined, cmd)
    print(f"wrote {path}")
    return 0
