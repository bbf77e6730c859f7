"""Secure: differential privacy and coopetitive learning (not built yet)."""
