"""Compute ops. Each op has one signature: a torch reference (CPU, and the oracle in tests)
and, on CUDA, a Triton implementation chosen by the tensors' device.

The exception is sampling.py / triton_sampling.py: a tested and benchmarked sampler that the
engine does not use (it samples with decoding.sampling.Sampler; NOTES.md, "Sampler")."""
