"""Compute ops. Each op has one signature: a torch reference (CPU, and the oracle in tests)
and, on CUDA, a Triton implementation chosen by the tensors' device."""
