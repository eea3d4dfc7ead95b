"""Analyses over the IR that passes and applications share, computed once and cached per module (`cache`):
the model map (`model_map`), the per-op axis rules (`axes`) that token-axis propagation (`token_axes`) and the
query independence of field decoders (`query_independence`) both read."""
