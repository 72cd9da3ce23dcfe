"""Constants both sampler implementations (`kernels.sampling`, `kernels.triton_sampling`) must
share bit for bit: the greedy cut-off and the counter-based hash behind the uniforms.

A module of its own so that the Triton file reads them without importing the torch reference.
"""
from __future__ import annotations

# Temperatures below this are greedy (the value decoding/sampling.py uses too).
GREEDY_TEMPERATURE = 1e-5

# Hash constants: murmur3's 32-bit finalizer multipliers and two golden-ratio-like offsets that
# key a row's stream by the seed and each token id.
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
SEED_SALT = 0x9E3779B9
TOKEN_SALT = 0x632BE5AB
