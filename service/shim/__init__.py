"""Helpers of the REST shim (service/openai_shim.py): request models and HTTP <-> gRPC translation."""
