"""Train: beyond the GPU memory wall (:mod:`.remat`, Checkmate) and low-bit (:mod:`.lowbit`)."""
