"""Speculative decoding: proposers (n-gram, suffix decoding; a draft model in the engine) and the lossless
rejection sampler. See DESIGN.md here for how the engine drives them."""
from decoding.speculative.ngram import NgramProposer, ngram_propose
from decoding.speculative.proposer import Draft, ProposeContext, Proposer, constrain_to_guide
from decoding.speculative.rejection import (
    SpeculativeVerifier,
    VerifyResult,
    VerifyRow,
    greedy_accept,
    rejection_sample,
)
from decoding.speculative.stats import AutoDisablePolicy, SpecStats, SpecTracker
from decoding.speculative.suffix import SuffixProposer, SuffixTree

__all__ = [
    "AutoDisablePolicy",
    "Draft",
    "NgramProposer",
    "ProposeContext",
    "Proposer",
    "SpecStats",
    "SpecTracker",
    "SpeculativeVerifier",
    "SuffixProposer",
    "SuffixTree",
    "VerifyResult",
    "VerifyRow",
    "constrain_to_guide",
    "greedy_accept",
    "ngram_propose",
    "rejection_sample",
]
