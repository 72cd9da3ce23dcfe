"""Guided decoding: output guaranteed to match a JSON Schema, a regex, a choice list or a grammar.

    spec = GuidedSpec("json_schema", {"type": "object", ...})
    grammar = compiler.compile_sync(spec)          # or: await compiler.compile(spec)
    guide = grammar.new_guide()                    # one per generated sequence
    guide.fill_bitmask(row); ...; guide.advance(token_id)

Backends: llguidance (default) and outlines-core; see compiler.py and docs/guided.md.
"""
from decoding.guided.base import CompiledGrammar, Guide
from decoding.guided.compiler import AUTO_ORDER, GuideCompiler
from decoding.guided.spec import BACKENDS, KINDS, WHITESPACE, GuidedSpec

__all__ = ["AUTO_ORDER", "BACKENDS", "KINDS", "WHITESPACE", "CompiledGrammar", "Guide", "GuideCompiler", "GuidedSpec"]
