"""The REST shim (OpenAI- and Ollama-compatible HTTP over the gRPC API): `app` (routing, errors,
auth, the HTTP server), `openai` and `ollama` (the routes of each protocol), `tools` (tool
calls in both shapes), `translate` (request fields and answers <-> weft.v1), `models` (request
bodies), `backend` and `base` (the gRPC channel and the plumbing every route shares)."""
