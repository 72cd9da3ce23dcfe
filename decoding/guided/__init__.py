"""Guided decoding: output guaranteed to match a JSON Schema, a regex, a choice list or a grammar.

    spec = GuidedSpec("json_schema", {"type": "object", ...})
    grammar = compiler.compile_sync(spec)          # or: await compiler.compile(spec)
    guide = grammar.new_guide(params)              # one per generated sequence; knows max_tokens
    guide.fill_bitmask(row); ...; guide.advance(token_id)

Backends: llguidance (default) and outlines-core; see compiler.py. Closing the output before
max_tokens would cut it: budget.py.
"""
from decoding.guided.base import CompiledGrammar, Guide
from decoding.guided.compiler import AUTO_ORDER, GuideCompiler
from decoding.guided.spec import BACKENDS, KINDS, WHITESPACE, GuidedSpec

__all__ = ["AUTO_ORDER", "BACKENDS", "KINDS", "WHITESPACE", "CompiledGrammar", "Guide", "GuideCompiler", "GuidedSpec"]
