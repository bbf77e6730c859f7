"""Low-bit training that stays unbiased: stochastic rounding, ActNN (not built yet)."""
