"""Online serving: HTTP frontend, adaptive batching, cache, model selection (not built yet)."""
