"""`weft` command line: serve | worker | generate | client | models | create | list | show | rm | cp | pull | ps | stop |
run."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import NoReturn

from service.config_cli import add_engine_args, engine_config_from_args


def cmd_generate(a: argparse.Namespace) -> int:
    from decoding.sampling import SamplingParams
    from service.llm import LLM

    cfg = engine_config_from_args(a, progress=a.progress and not a.json)
    llm = LLM(**{k: getattr(cfg, k) for k in cfg.__slots__})
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed,
                            top_p=a.top_p, top_k=a.top_k)
    tok = llm.tokenizer
    if tok.has_chat_template and not a.raw:
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True)
        prompt: str | list[int] = tok.encode(text, add_special_tokens=False)
    else:
        prompt = a.prompt
    out = llm.generate(prompt, params)[0].outputs[0]
    if a.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}))
    else:
        print(out.text)
    return 0


def cmd_worker(a: argparse.Namespace) -> NoReturn:
    from service.engine.tp_worker import run_rank

    run_rank(engine_config_from_args(a, progress=False))


def cmd_models(a: argparse.Namespace) -> int:
    from service.loader import default_model_path

    print(default_model_path())
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="weft", description="Weft LLM inference engine")
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="complete one prompt offline")
    add_engine_args(g)
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--raw", action="store_true", help="no chat template")
    g.add_argument("--json", action="store_true", help='print {"text", "token_ids", "finish_reason"}')
    g.set_defaults(func=cmd_generate)

    w = sub.add_parser("worker", help="run a tensor-parallel rank >= 1 for a `weft serve --tensor-parallel-size N` "
                       "on another host (rendezvous from MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK)")
    add_engine_args(w)
    w.set_defaults(func=cmd_worker)

    m = sub.add_parser("models", help="show the default model path")
    m.set_defaults(func=cmd_models)

    from service import run_cli, store_cli
    store_cli.add_commands(sub)
    run_cli.add_commands(sub)

    try:
        from service import server_cli
        server_cli.add_commands(sub, add_engine_args, engine_config_from_args)
    except ImportError:
        pass

    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except Exception as exc:  # clear one-line errors for user mistakes
        from common.errors import WeftError

        if isinstance(exc, WeftError):
            print(f"weft: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
