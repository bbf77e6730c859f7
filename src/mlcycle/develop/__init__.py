"""Develop: many experiments under a deadline (HyperSched on Ray Tune; not built yet)."""
