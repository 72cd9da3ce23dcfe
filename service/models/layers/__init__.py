"""Building blocks every family composes: norms, rotary tables, paged attention, MLPs, MoE, the
decoder-layer shapes and the causal-LM shell (embedding, final norm, logits, weight loading)."""
