"""Serve: online (Clipper), pipelines (InferLine) and offline (DuckDB) prediction serving."""
