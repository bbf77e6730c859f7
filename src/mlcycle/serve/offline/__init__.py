"""Offline serving: pre-materialized predictions in DuckDB (not built yet)."""
