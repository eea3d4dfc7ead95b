"""Analyses over the IR that passes and applications share, computed once and cached per module (`cache`):
the model map (`model_map`), token-axis propagation (`token_axes`), query independence of field decoders
(`query_independence`)."""
